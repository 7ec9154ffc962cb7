"""Tests of small-loss selection: the forget-rate schedule and the kept set."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddlr import steps
from ddlr.baselines import BaselineSettings, small_loss

SETTINGS = small_loss.SmallLossSettings(forget_rate=0.5, ramp_epochs=2.0, steps_per_epoch=10)
LOSSES = jnp.array([0.3, 2.0, 0.1, 1.5, 0.7, 0.2, 0.9, 3.0])


@pytest.mark.parametrize(
  "step, expected",
  [(0, 0.0), (9, 0.0), (10, 0.25), (19, 0.25), (20, 0.5), (35, 0.5)],
)
def test_forget_rate_ramps_per_completed_epoch(step, expected):
  assert float(small_loss.forget_rate(step, SETTINGS)) == pytest.approx(expected)


def test_zero_ramp_forgets_from_the_start():
  settings = small_loss.SmallLossSettings(forget_rate=0.3, ramp_epochs=0.0, steps_per_epoch=10)

  assert float(small_loss.forget_rate(0, settings)) == pytest.approx(0.3)


@pytest.mark.parametrize(
  "step, kept",
  [
    (0, [0, 1, 2, 3, 4, 5, 6, 7]),
    (10, [0, 2, 3, 4, 5, 6]),  # forget 0.25: the two largest losses (3.0, 2.0) go
    (20, [0, 2, 4, 5]),  # forget 0.5: 0.1, 0.2, 0.3 and 0.7 stay
  ],
)
def test_selection_keeps_lowest_losses(step, kept):
  weights = small_loss.select_small_loss(LOSSES, step, SETTINGS)

  expected = np.zeros(8)
  expected[kept] = 1.0 / len(kept)
  np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_equal_losses_are_ranked_by_position():
  weights = small_loss.select_small_loss(jnp.ones(4), 20, SETTINGS)

  np.testing.assert_allclose(weights, [0.5, 0.5, 0.0, 0.0])


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_train_step_averages_gradient_of_kept_examples():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 2, 2, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
  data = steps.DeviceData(images, labels, images[:0], labels[:0])
  model, tx = _Linear(), optax.sgd(0.1)
  params = model.init(jax.random.key(1), images[:1])["params"]
  state = steps.TrainState(
    step=jnp.asarray(20, jnp.int32), params=params, batch_stats={},
    opt_state=tx.init(params), rng=jax.random.key(2), baseline_state=small_loss.init_state(8),
  )  # fmt: skip
  settings = steps.StepSettings(
    enabled=False, baseline=BaselineSettings(name="small_loss", small_loss=SETTINGS)
  )
  ids = jnp.arange(8)

  new_state, _ = steps.train_step(state, data, ids, model=model, tx=tx, settings=settings)

  def losses_of(p):
    logits = model.apply({"params": p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  losses = np.asarray(losses_of(params))
  kept = np.argsort(losses, kind="stable")[:4]
  kept_grad = jax.grad(lambda p: jnp.mean(losses_of(p)[kept]))(params)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, kept_grad)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new_state.baseline_state.last_loss, losses, rtol=1e-6)
