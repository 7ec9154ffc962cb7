"""Training and evaluation batches, from device memory or streamed from the host.

The training loop takes from an input the extra arguments of each train step
after `(state, device_data)`, and the evaluation batches:

- `DeviceInputs` (every dataset but imagenet2012) holds the whole training
  split on the device; a step receives only the batch's ids and gathers the
  rows inside the jitted step.
- `StreamedInputs` (imagenet2012) reads each batch through tf.data; a step
  receives the ids and the batch's images and labels, which are copied to
  the device `PREFETCH_BATCHES` batches ahead of the step that takes them.

Both return, for epoch `e`, the same batches whatever step a run resumes at.
"""

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ddlr import data as data_lib
from ddlr import steps

# Batches of a stream on the device ahead of the step that takes them: while
# the device runs one step, the next batches' host-to-device copies are queued.
PREFETCH_BATCHES = 2


def prefetch_to_device(elements, size: int = PREFETCH_BATCHES):
  """Yields the elements of an iterable, each a pytree of arrays, as device arrays.

  While the caller works on one element, the next `size` have already been
  read and passed to `jax.device_put`. Steps run asynchronously, so those
  copies are queued while the device still runs the current step, and the
  source (a tf.data pipeline) keeps preparing batches meanwhile. flax's
  `jax_utils.prefetch_to_device` prefetches for data-parallel steps: it
  splits each array's first axis across all local devices, while a ddlr
  step runs on one device.

  When the caller asks for the next element while it still keeps the current
  one, up to `size` + 2 elements are on the device. An error of the source
  (e.g. a damaged record) is raised when its element is read, which is
  `size` elements before the caller would reach it.

  Raises:
    ValueError: if `size` is below 1.
  """
  if size < 1:
    raise ValueError(f"prefetch size={size} is invalid; expected at least 1.")
  elements = iter(elements)
  queue = collections.deque(jax.device_put(e) for e in itertools.islice(elements, size))
  while queue:
    queue.extend(jax.device_put(e) for e in itertools.islice(elements, 1))
    yield queue.popleft()


def epoch_batches(order_rng, epoch: int, num_instances: int, batch_size: int) -> jax.Array:
  """Returns the instance ids of every batch of `epoch`, [steps_per_epoch, batch_size].

  The order depends only on the seed and the epoch, so a resumed run gets the
  same batches as an uninterrupted one.
  """
  order = jax.random.permutation(jax.random.fold_in(order_rng, epoch), num_instances)
  steps_per_epoch = num_instances // batch_size
  return order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)


def _reference_arrays(data: data_lib.TrainingData) -> dict[str, jax.Array]:
  return {
    "reference_images": jnp.asarray(data.reference_images),
    "reference_labels": jnp.asarray(data.reference_labels),
  }


class DeviceInputs:
  """Batches of a dataset held in device memory, gathered by id inside the train step."""

  def __init__(self, data: data_lib.TrainingData, order_rng: jax.Array, batch_size: int):
    self._data = data
    self._order_rng = order_rng
    self._batch_size = batch_size

  def device_data(self) -> steps.DeviceData:
    """Copies the training and reference arrays to the device and returns them."""
    return steps.DeviceData(
      train_images=jnp.asarray(self._data.images),
      train_labels=jnp.asarray(self._data.labels),
      **_reference_arrays(self._data),
    )

  def sample_images(self) -> np.ndarray:
    """Returns one training image, [1, H, W, C], to initialise the model with."""
    return self._data.images[:1]

  def train_inputs(self, epoch: int, first_index: int):
    """Yields `(ids,)` for the batches of `epoch` from batch `first_index` on."""
    batches = epoch_batches(self._order_rng, epoch, len(self._data.labels), self._batch_size)
    for index in range(first_index, len(batches)):
      yield (batches[index],)

  def eval_batches(self, batch_size: int):
    """Yields `(images, labels)` batches covering every test example; the last may be smaller."""
    images, labels = self._data.test_images, self._data.test_labels
    for start in range(0, len(labels), batch_size):
      yield images[start : start + batch_size], labels[start : start + batch_size]


class StreamedInputs:
  """Batches of a streamed dataset, decoded and augmented by tf.data on the host."""

  def __init__(self, data: data_lib.TrainingData, seed: int, batch_size: int):
    self._data = data
    self._seed = seed
    self._batch_size = batch_size

  def device_data(self) -> steps.DeviceData:
    """Returns the reference split on the device, with empty training arrays."""
    size = self._data.stream.image_size
    return steps.DeviceData(
      train_images=jnp.zeros((0, size, size, 3), jnp.float32),
      train_labels=jnp.zeros((0,), jnp.int32),
      **_reference_arrays(self._data),
    )

  def sample_images(self) -> np.ndarray:
    """Returns a zero image of the stream's size, [1, S, S, 3], to initialise the model with."""
    size = self._data.stream.image_size
    return np.zeros((1, size, size, 3), np.float32)

  def train_inputs(self, epoch: int, first_index: int):
    """Yields `(ids, (images, labels))` for the batches of `epoch` from batch `first_index` on."""
    batches = self._data.stream.train_batches(
      self._seed, epoch, self._batch_size, skip_batches=first_index
    )
    yield from prefetch_to_device((ids, (images, labels)) for ids, images, labels in batches)

  def eval_batches(self, batch_size: int):
    """Yields `(images, labels)` batches covering the whole validation split."""
    yield from self._data.stream.eval_batches(batch_size)


def create_inputs(data: data_lib.TrainingData, order_rng: jax.Array, seed: int, batch_size: int):
  """Returns `StreamedInputs` when `data` streams, else `DeviceInputs`.

  `order_rng` orders the in-memory epochs; `seed` seeds the streamed ones.
  """
  if data.stream is not None:
    return StreamedInputs(data, seed, batch_size)
  return DeviceInputs(data, order_rng, batch_size)
