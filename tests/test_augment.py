"""Tests of the on-device crop_flip augmentation and of the train step that applies it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddlr import optim, steps
from ddlr.data import augment
from ddlr.models import SmallCNN

PADDING = augment.CROP_PADDING


def _matching_windows(output: np.ndarray, image: np.ndarray) -> list[tuple[int, int, bool]]:
  """Returns every (top, left, flipped) whose window of the zero-padded `image` equals `output`."""
  height, width, _ = image.shape
  padded = np.pad(image, ((PADDING, PADDING), (PADDING, PADDING), (0, 0)))
  matches = []
  for top in range(2 * PADDING + 1):
    for left in range(2 * PADDING + 1):
      window = padded[top : top + height, left : left + width]
      for flipped, candidate in ((False, window), (True, window[:, ::-1])):
        if np.array_equal(candidate, output):
          matches.append((top, left, flipped))
  return matches


def test_crop_flip_is_padded_window_or_mirror():
  # Non-square, distinct positive pixels, so every window and mirror is unique.
  images = np.arange(1, 1 + 16 * 5 * 7 * 2, dtype=np.float32).reshape(16, 5, 7, 2)
  outputs = np.asarray(augment.crop_flip(jax.random.key(0), jnp.asarray(images)))

  assert outputs.shape == images.shape
  assert outputs.dtype == images.dtype
  draws = []
  for output, image in zip(outputs, images, strict=True):
    matches = _matching_windows(output, image)
    assert len(matches) == 1, matches
    draws.append(matches[0])
  # With key 0 the 16 draws include both flip states and more than 4 of the 81 offsets.
  assert {flipped for _, _, flipped in draws} == {False, True}
  assert len({(top, left) for top, left, _ in draws}) > 4


def test_crop_flip_draws_differ_per_example():
  image = np.arange(1, 1 + 6 * 6, dtype=np.float32).reshape(1, 6, 6, 1)
  batch = jnp.asarray(np.repeat(image, 32, axis=0))
  outputs = np.asarray(augment.crop_flip(jax.random.key(3), batch))
  distinct = {output.tobytes() for output in outputs}
  assert len(distinct) > 8


def test_crop_flip_same_key_same_result():
  images = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
  first = augment.crop_flip(jax.random.key(5), images)
  again = augment.crop_flip(jax.random.key(5), images)
  other = augment.crop_flip(jax.random.key(6), images)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_augment_batch_none_and_unknown():
  images = jnp.ones((2, 4, 4, 1))
  np.testing.assert_array_equal(augment.augment_batch("none", jax.random.key(0), images), images)
  with pytest.raises(ValueError, match=r"'inception_crop' does not run on device"):
    augment.augment_batch("inception_crop", jax.random.key(0), images)


def _step_setup(augmentation):
  model = SmallCNN(num_classes=3, width=2, hidden=8)
  keys = jax.random.split(jax.random.key(0), 4)
  data = steps.DeviceData(
    train_images=jax.random.normal(keys[0], (16, 8, 8, 1)),
    train_labels=jax.random.randint(keys[1], (16,), 0, 3),
    reference_images=jax.random.normal(keys[2], (4, 8, 8, 1)),
    reference_labels=jnp.arange(4) % 3,
  )
  params = model.init(keys[3], data.train_images[:1], train=False)["params"]
  tx = optim.ddlr(optax.sgd(0.1), num_instances=16, learning_rate=0.1, hyper_learning_rate=0.5)
  state = steps.TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
      opt_state=tx.init(params), rng=jax.random.key(1),
  )  # fmt: skip
  settings = steps.StepSettings(
    reference="reference", reference_batch_size=4, augmentation=augmentation
  )
  return model, data, tx, state, settings


def test_train_step_with_crop_flip_traces_once():
  model, data, tx, state, settings = _step_setup("crop_flip")
  traces = []

  def counted_step(state, data, ids):
    traces.append(1)
    return steps.train_step(state, data, ids, model=model, tx=tx, settings=settings)

  step = jax.jit(counted_step)
  for index in range(3):
    state, metrics = step(state, data, jnp.arange(6) + index)
  assert len(traces) == 1
  assert int(state.step) == 3
  assert all(bool(jnp.isfinite(value)) for value in metrics.values())


def test_train_step_trains_on_cropped_batch():
  # crop_flip on gathered ids must equal a plain step on the batch that
  # augment.crop_flip makes with the key the step splits off its carried key.
  model, data, tx, state, settings = _step_setup("crop_flip")
  ids = jnp.arange(6)
  augmented_state, augmented_metrics = steps.train_step(
    state, data, ids, model=model, tx=tx, settings=settings
  )

  carried, _ = jax.random.split(state.rng)
  carried, augment_rng = jax.random.split(carried)
  images = augment.crop_flip(augment_rng, data.train_images[ids])
  plain = steps.StepSettings(reference="reference", reference_batch_size=4)
  plain_state, plain_metrics = steps.train_step(
    state, data, ids, (images, data.train_labels[ids]), model=model, tx=tx, settings=plain
  )

  # The two steps carry different keys, so the augmented step's key is checked on its own.
  np.testing.assert_array_equal(
    jax.random.key_data(augmented_state.rng), jax.random.key_data(carried)
  )
  for a, b in zip(
    jax.tree.leaves((augmented_state.params, augmented_state.opt_state)),
    jax.tree.leaves((plain_state.params, plain_state.opt_state)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(augmented_metrics["train/loss"], plain_metrics["train/loss"])
