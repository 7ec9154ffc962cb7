"""Tests of learning to reweight against per-example gradients from jax.jacrev."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddlr import steps
from ddlr.baselines import BaselineSettings, learning_to_reweight

BATCH, REFERENCE, CLASSES, LEARNING_RATE = 8, 6, 3, 0.1


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


def _setup():
  rng = np.random.default_rng(0)
  data = steps.DeviceData(
    train_images=jnp.asarray(rng.normal(size=(20, 2, 2, 1)), jnp.float32),
    train_labels=jnp.asarray(rng.integers(0, CLASSES, 20), jnp.int32),
    reference_images=jnp.asarray(rng.normal(size=(REFERENCE, 2, 2, 1)), jnp.float32),
    reference_labels=jnp.asarray(rng.integers(0, CLASSES, REFERENCE), jnp.int32),
  )
  model, tx = _Linear(), optax.sgd(LEARNING_RATE)
  params = model.init(jax.random.key(1), data.train_images[:1])["params"]
  state = steps.TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    batch_stats={},
    opt_state=tx.init(params),
    rng=jax.random.key(2),
    baseline_state=learning_to_reweight.init_state(20),
  )
  return data, model, tx, state


def _per_example_losses(model, params, images, labels):
  logits = model.apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def test_weights_are_normalised_positive_alignment():
  data, model, tx, state = _setup()
  ids = jnp.array([4, 0, 17, 9, 12, 3, 8, 15])
  # The whole reference split, drawn without replacement, so its mean
  # gradient does not depend on which permutation the step draws.
  settings = steps.StepSettings(
    enabled=False, reference="reference", reference_at="current",
    reference_batch_size=REFERENCE, baseline=BaselineSettings(name="learning_to_reweight"),
  )  # fmt: skip

  new_state, _ = jax.jit(steps.train_step, static_argnames=("model", "tx", "settings"))(
    state, data, ids, model=model, tx=tx, settings=settings
  )

  images, labels = data.train_images[ids], data.train_labels[ids]
  jacobian = jax.jacrev(lambda p: _per_example_losses(model, p, images, labels))(state.params)
  per_example = np.concatenate(
    [np.asarray(leaf).reshape(BATCH, -1) for leaf in jax.tree.leaves(jacobian)], axis=1
  )
  reference_grad = jax.grad(
    lambda p: jnp.mean(_per_example_losses(model, p, data.reference_images, data.reference_labels))
  )(state.params)
  reference_flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(reference_grad)])
  alignment = per_example @ reference_flat
  assert (alignment > 0).any()
  assert (alignment < 0).any()
  expected_weights = np.maximum(alignment, 0) / np.maximum(alignment, 0).sum()
  np.testing.assert_allclose(
    new_state.baseline_state.last_weight[ids], BATCH * expected_weights, rtol=1e-4, atol=1e-6
  )
  expected_params = (
    np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])
    - LEARNING_RATE * expected_weights @ per_example
  )
  new_params = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(new_state.params)])
  np.testing.assert_allclose(new_params, expected_params, rtol=1e-4, atol=1e-6)
  unseen = np.setdiff1d(np.arange(20), np.asarray(ids))
  np.testing.assert_array_equal(new_state.baseline_state.last_weight[unseen], 1.0)


def test_weights_without_positive_alignment_are_zero():
  weights = learning_to_reweight.weights_from_alignment(jnp.array([-1.0, 0.0, -0.5]))

  np.testing.assert_array_equal(weights, [0.0, 0.0, 0.0])


def test_weights_of_hand_made_alignment():
  weights = learning_to_reweight.weights_from_alignment(jnp.array([3.0, -2.0, 1.0, 0.0]))

  np.testing.assert_allclose(weights, [0.75, 0.0, 0.25, 0.0])
