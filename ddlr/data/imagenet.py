"""ImageNet (tfds `imagenet2012`) streamed through tf.data, with stable instance ids.

ImageNet does not fit in device memory, so its training and validation splits
stream from the tfds files, and only the small reference split is decoded and
held on the device.

Instance ids: the train split is read with its files in their fixed order,
before any shuffling, and its k-th record has source position k. The reference
split is held out of those positions, and training instance `i` is the i-th
remaining position, so ids are `[0, N)` and independent of the shuffle, the
batch size and the augmentation. Labels are read once without decoding any
image, so the label noise and the reference split are drawn in NumPy exactly
as for the in-memory datasets.

Each epoch's order is a tf.data shuffle seeded by the training seed and the
epoch, and every example's crop and flip are drawn from a stateless seed of
(training seed, epoch, id). A resumed run skips the batches already done
and then gets the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epy

# TensorFlow takes about 3 s to import and only the ImageNet stream uses it,
# so it is imported on first use: a command that stops at a config or flag
# error then ends sooner.
with epy.lazy_imports():
  import tensorflow as tf

from ddlr.data import catalog
from ddlr.data.errors import DataError

NAME = "imagenet2012"
# Size of the tf.data shuffle buffer of the training stream. tfds writes the
# records in a shuffled order when it prepares the dataset, so the buffer only
# has to vary the order between epochs, not undo a sorted order.
SHUFFLE_BUFFER = 16_384
# Evaluation resizes the shorter side to image_size / EVAL_CROP_FRACTION, then
# takes the central image_size square (224 from 256 at the default size).
EVAL_CROP_FRACTION = 0.875
# Random resized crop: area fraction and aspect ratio (width / height) ranges.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10
_LABEL_READ_BATCH = 10_000


def read_labels(builder, split: str, max_examples: int | None) -> np.ndarray:
  """Reads the labels of `split` in file order without decoding any image.

  Returns:
    int32 labels `[n]`; label k belongs to record k of the split, and only the
    first `max_examples` records are read when it is given.
  """
  dataset = _records(builder, split, max_examples)
  dataset = dataset.map(lambda example: example["label"]).batch(_LABEL_READ_BATCH)
  batches = [batch.astype(np.int32) for batch in tfds.as_numpy(dataset)]
  return np.concatenate(batches) if batches else np.zeros(0, np.int32)


def _records(builder, split: str, max_examples: int | None) -> tf.data.Dataset:
  """Returns the split's records in file order, with the image left JPEG-encoded."""
  try:
    dataset = builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(interleave_cycle_length=1, skip_prefetch=True),
    )
  except AssertionError as error:
    # tfds 4.9 raises AssertionError when the dataset directory does not exist.
    raise DataError(
      f"tfds dataset {NAME} is not prepared in {builder.data_dir_root} and ddlr does "
      "not download data: download the ILSVRC2012 archives into the tfds manual "
      f"directory and run `tfds build {NAME} --data_dir=DIR` (config.data.data_dir=DIR)"
    ) from error
  # Slicing with take, not the split string, because tfds.testing.mock_data
  # returns the same records for every slice.
  return dataset if max_examples is None else dataset.take(max_examples)


def decode_for_training(encoded, seed, image_size: int, augmentation: str, spec) -> tf.Tensor:
  """Decodes one JPEG and augments it for training.

  `inception_crop` takes a random crop with an area fraction in
  `CROP_AREA_RANGE` and an aspect ratio in `CROP_ASPECT_RATIO_RANGE`. After
  `_CROP_ATTEMPTS` failed draws TF's sampler returns the whole image. The crop
  is resized to `image_size` squared and flipped horizontally with
  probability 1/2. All draws come from the stateless `seed` [2]. `none`
  applies the evaluation transform instead.

  Returns:
    float32 `[image_size, image_size, 3]`, normalised per channel.
  """
  if augmentation == "none":
    return decode_for_evaluation(encoded, image_size, spec)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.image.extract_jpeg_shape(encoded),
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
    seed=crop_seed,
    min_object_covered=0.0,
    aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
    area_range=CROP_AREA_RANGE,
    max_attempts=_CROP_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return _normalize(image, spec)


def decode_for_evaluation(encoded, image_size: int, spec) -> tf.Tensor:
  """Decodes one JPEG, resizes its shorter side to image_size / 0.875 and crops the center.

  Returns:
    float32 `[image_size, image_size, 3]`, normalised per channel.
  """
  image = tf.io.decode_jpeg(encoded, channels=3)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  resize_to = tf.round(image_size / EVAL_CROP_FRACTION)
  scale = resize_to / tf.reduce_min(shape)
  # At least image_size in each dimension, so rounding never leaves too few rows for the crop.
  new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
  image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
  top = (new_shape[0] - image_size) // 2
  left = (new_shape[1] - image_size) // 2
  image = image[top : top + image_size, left : left + image_size]
  return _normalize(image, spec)


def _normalize(image, spec) -> tf.Tensor:
  mean = tf.constant(spec.mean, tf.float32)
  std = tf.constant(spec.std, tf.float32)
  image = tf.ensure_shape(image, [None, None, 3])
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def epoch_seed(seed: int, epoch: int) -> int:
  """Returns the 31-bit seed of one epoch's shuffle and augmentation, a function of both."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageNetStream:
  """The training and validation streams of one run.

  `instance_of_position[k]` is the instance id of train record k, or -1 for a
  reference record; `labels[i]` is instance i's observed (possibly noisy) label.
  """

  builder: object
  image_size: int
  augmentation: str
  instance_of_position: np.ndarray  # [num_train_records] int32
  labels: np.ndarray  # [N] int32
  num_train_records: int
  num_test: int

  @property
  def spec(self) -> catalog.DatasetSpec:
    """The statistics used to normalise the images."""
    return catalog.get_spec(NAME)

  def train_batches(self, seed: int, epoch: int, batch_size: int, skip_batches: int = 0):
    """Returns an iterator over the epoch's batches after the first `skip_batches`.

    Each element is `(ids [B] int32, images [B, S, S, 3] float32, labels [B]
    int32)` as NumPy arrays; the last partial batch is dropped, so an epoch
    has `N // batch_size` batches.
    """
    positions = tf.constant(self.instance_of_position)
    labels = tf.constant(self.labels)
    shuffle_seed = epoch_seed(seed, epoch)

    def to_instance(position, example):
      return tf.gather(positions, tf.cast(position, tf.int32)), example["image"]

    def decode(instance, encoded):
      image = decode_for_training(
        encoded,
        tf.stack([tf.constant(shuffle_seed, tf.int32), instance]),
        self.image_size,
        self.augmentation,
        self.spec,
      )
      return instance, image, tf.gather(labels, instance)

    dataset = _records(self.builder, "train", self.num_train_records).enumerate()
    dataset = dataset.map(to_instance).filter(lambda instance, _: instance >= 0)
    dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=False)
    # Skipping before decoding makes a resumed epoch cheap.
    dataset = dataset.skip(skip_batches * batch_size)
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return tfds.as_numpy(dataset)

  def eval_batches(self, batch_size: int):
    """Returns an iterator over `(images, labels)` batches covering the whole validation split.

    The last batch may be smaller than `batch_size`.
    """

    def decode(example):
      image = decode_for_evaluation(example["image"], self.image_size, self.spec)
      return image, tf.cast(example["label"], tf.int32)

    dataset = _records(self.builder, "validation", self.num_test)
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return tfds.as_numpy(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))

  def decode_positions(self, positions: np.ndarray) -> np.ndarray:
    """Decodes the train records at sorted `positions` with the evaluation transform.

    Returns:
      float32 `[len(positions), S, S, 3]`, in the order of `positions`.
    """
    shape = (0, self.image_size, self.image_size, 3)
    if len(positions) == 0:
      return np.zeros(shape, np.float32)
    # NOTE: this reads every train record once (without decoding the others);
    # for the full ImageNet that is a pass over about 140 GB at start-up.
    is_selected = np.zeros(self.num_train_records, bool)
    is_selected[positions] = True
    selected_table = tf.constant(is_selected)
    dataset = _records(self.builder, "train", self.num_train_records).enumerate()
    dataset = dataset.filter(lambda position, _: tf.gather(selected_table, position))
    dataset = dataset.map(
      lambda _, example: decode_for_evaluation(example["image"], self.image_size, self.spec),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    return np.concatenate(list(tfds.as_numpy(dataset.batch(_LABEL_READ_BATCH))))
