"""Tests of the small-loss references, which need no trusted data."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from ddlr import alignment, losses, optim, small_loss, steps
from ddlr.config_checks import ConfigError, validate_config
from ddlr.models import SmallCNN

NUM_INSTANCES, BATCH_SIZE, ETA = 16, 6, 0.2
IDS = jnp.array([3, 11, 0, 7, 14, 5])


@functools.cache
def _setup():
  model = SmallCNN(num_classes=3, width=2, hidden=8)
  keys = jax.random.split(jax.random.key(0), 3)
  data = steps.DeviceData(
    train_images=jax.random.normal(keys[0], (NUM_INSTANCES, 8, 8, 1)),
    train_labels=jax.random.randint(keys[1], (NUM_INSTANCES,), 0, 3),
    reference_images=jnp.zeros((0, 8, 8, 1)),
    reference_labels=jnp.zeros((0,), jnp.int32),
  )
  params = jax.jit(lambda k: model.init(k, data.train_images[:1], train=False))(keys[2])["params"]
  return model, data, params


def _sgd_state(params, *, normalize):
  tx = optim.ddlr(
      optax.sgd(ETA), num_instances=NUM_INSTANCES, learning_rate=ETA, hyper_learning_rate=1.0,
      log_lr_min=-50.0, log_lr_max=50.0, normalize=normalize,
  )  # fmt: skip
  opt_state = tx.init(params)._replace(
    log_lr=0.3 * jax.random.normal(jax.random.key(7), (NUM_INSTANCES,))
  )
  state = steps.TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats={}, opt_state=opt_state,
      rng=jax.random.key(1),
  )  # fmt: skip
  return tx, state


def _per_example_losses(model, params, images, labels):
  logits = model.apply({"params": params}, images, train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _lowest(losses, candidates, count):
  """Returns the `count` candidates with the lowest loss, ties by position."""
  order = sorted(candidates, key=lambda k: (float(losses[k]), k))
  return order[:count]


def test_mask_keeps_lowest_share():
  losses = jnp.array([0.5, 0.1, 0.9, 0.3, 0.3, 0.7])
  zeros = jnp.zeros([6], jnp.int32)
  mask = small_loss.small_loss_mask(losses, zeros, fraction=0.5)
  np.testing.assert_array_equal(mask, [0, 1, 0, 1, 1, 0])


def test_mask_breaks_ties_by_position():
  losses = jnp.array([0.5, 0.1, 0.9, 0.3, 0.3, 0.7])
  zeros = jnp.zeros([6], jnp.int32)
  mask = small_loss.small_loss_mask(losses, zeros, fraction=2 / 6)
  np.testing.assert_array_equal(mask, [0, 1, 0, 1, 0, 0])


def test_mask_ranks_within_groups():
  losses = jnp.array([0.5, 0.1, 0.9, 0.3, 0.3, 0.7])
  groups = jnp.array([0, 0, 0, 1, 1, 1])
  # round(0.5 * 3) = 2 per group (half to even).
  mask = small_loss.small_loss_mask(losses, groups, fraction=0.5)
  np.testing.assert_array_equal(mask, [1, 1, 0, 1, 1, 0])


def test_mask_skips_ineligible_and_keeps_one():
  losses = jnp.array([0.5, 0.1, 0.9, 0.3, 0.3, 0.7])
  groups = jnp.array([0, 0, 0, 1, 1, 1])
  eligible = jnp.array([True, False, True, False, False, False])
  # Group 0 has two eligible examples and keeps max(1, round(0.1 * 2)) = 1;
  # group 1 has none and keeps none.
  mask = small_loss.small_loss_mask(losses, groups, fraction=0.1, eligible=eligible)
  np.testing.assert_array_equal(mask, [1, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("per_class", [False, True])
def test_small_loss_hypergradient_matches_autodiff(per_class):
  model, data, params = _setup()
  tx, state = _sgd_state(params, normalize=True)
  # A second batch of every training instance, drawn without replacement,
  # so the selection does not depend on the random draw.
  settings = steps.StepSettings(
    reference="small_loss", reference_batch_size=NUM_INSTANCES, small_loss_fraction=0.5,
    small_loss_per_class=per_class,
  )  # fmt: skip
  log_lr = state.opt_state.log_lr
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
  new_state, _ = step(state, data, IDS)

  images, labels = data.train_images, np.asarray(data.train_labels)

  def params_after(table):
    rates = jnp.exp(table[IDS])
    rates = rates / jnp.mean(rates)

    def weighted_loss(p):
      return jnp.mean(rates * _per_example_losses(model, p, images[IDS], labels[IDS]))

    grads = jax.grad(weighted_loss)(params)
    return jax.tree.map(lambda p, g: p - ETA * g, params, grads)

  # The selection: at the parameters after the step, among the instances
  # outside the current batch, the lowest-loss half (of each label).
  losses = np.asarray(_per_example_losses(model, params_after(log_lr), images, labels))
  outside = [k for k in range(NUM_INSTANCES) if k not in set(np.asarray(IDS).tolist())]
  groups = [[k for k in outside if labels[k] == c] for c in range(3)] if per_class else [outside]
  selected = []
  for group in groups:
    if group:
      selected += _lowest(losses, group, max(1, int(np.round(0.5 * len(group)))))
  selected = np.array(sorted(selected))

  def reference_loss_after_step(table):
    after = params_after(table)
    return jnp.mean(_per_example_losses(model, after, images[selected], labels[selected]))

  expected = jax.jit(jax.grad(reference_loss_after_step))(log_lr)
  computed = log_lr - new_state.opt_state.log_lr
  relative_error = float(jnp.linalg.norm(computed - expected) / jnp.linalg.norm(expected))
  assert float(jnp.linalg.norm(expected)) > 1e-5
  assert relative_error < 1e-4


@pytest.mark.parametrize("per_class", [False, True])
def test_small_loss_split_scores_against_other_half(per_class):
  model, data, params = _setup()
  tx, state = _sgd_state(params, normalize=False)
  settings = steps.StepSettings(
    reference="small_loss_split", normalize=False, small_loss_fraction=0.5,
    small_loss_per_class=per_class,
  )  # fmt: skip
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
  new_state, _ = step(state, data, IDS)

  images, labels = data.train_images[IDS], np.asarray(data.train_labels[IDS])
  losses = np.asarray(_per_example_losses(model, params, images, labels))
  jacobian = jax.jit(jax.jacrev(lambda p: _per_example_losses(model, p, images, labels)))(params)
  flat = np.concatenate(
    [np.asarray(g).reshape(BATCH_SIZE, -1) for g in jax.tree.leaves(jacobian)], 1
  )

  halves = [list(range(3)), list(range(3, 6))]
  references = []
  for half in halves:
    groups = [[k for k in half if labels[k] == c] for c in range(3)] if per_class else [half]
    selected = []
    for group in groups:
      if group:
        selected += _lowest(losses, group, max(1, int(np.round(0.5 * len(group)))))
    references.append(flat[selected].mean(0))
  # Each half against the other half's selection: no example meets its own gradient.
  expected_alignment = np.concatenate([flat[:3] @ references[1], flat[3:] @ references[0]])
  rates = np.exp(np.asarray(state.opt_state.log_lr[IDS]))
  expected_step = (ETA / BATCH_SIZE) * rates * expected_alignment  # -h with normalize off
  computed_step = new_state.opt_state.log_lr[IDS] - state.opt_state.log_lr[IDS]
  np.testing.assert_allclose(computed_step, expected_step, rtol=1e-4, atol=1e-7)


def test_split_directions_ignore_own_half():
  model, data, params = _setup()
  images, labels = data.train_images[IDS], data.train_labels[IDS]

  def directions(batch_images, batch_labels):
    loss_fn = losses.make_loss_fn(model, {}, batch_images, batch_labels)
    lin = alignment.linearize_losses(loss_fn, params)
    return small_loss.split_small_loss_directions(lin, batch_labels, fraction=0.5, per_class=False)

  for_first, for_second, _ = directions(images, labels)
  # Replacing the first half's examples changes only the second half's reference.
  changed_images = images.at[:3].set(data.train_images[8:11])
  changed_labels = labels.at[:3].set((labels[:3] + 1) % 3)
  new_first, new_second, _ = directions(changed_images, changed_labels)
  for old, new in zip(jax.tree.leaves(for_first), jax.tree.leaves(new_first), strict=True):
    np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-7)
  difference = max(
    float(jnp.max(jnp.abs(old - new)))
    for old, new in zip(jax.tree.leaves(for_second), jax.tree.leaves(new_second), strict=True)
  )
  assert difference > 1e-4


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"small_loss_fraction": 0.0}, "config.ddlr.small_loss_fraction=0.0 is invalid"),
    ({"small_loss_fraction": 1.5}, "config.ddlr.small_loss_fraction=1.5 is invalid"),
    ({"small_loss_per_class": "yes"}, "config.ddlr.small_loss_per_class='yes' is invalid"),
    (
      {"reference": "small_loss", "reference_every_steps": 2},
      "config.ddlr.reference_every_steps=2 is invalid with config.ddlr.reference='small_loss'",
    ),
  ],
)
def test_invalid_small_loss_config_raises(overrides, message):
  config = default.get_config("quick")
  for field, value in overrides.items():
    # Deleting first lets a value of another type in, as a hand-written config could.
    del config.ddlr[field]
    config.ddlr[field] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate_config(config)
