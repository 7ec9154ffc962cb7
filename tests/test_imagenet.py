"""Tests of the streamed imagenet2012 input under tfds.testing.mock_data."""

import dataclasses

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ddlr import data as data_lib
from ddlr import input_pipeline
from ddlr.data import imagenet

NUM_RECORDS, IMAGE_SIZE, BATCH_SIZE = 24, 16, 8


def _config(**overrides):
  config = data_lib.default_config()
  config.name = "imagenet2012"
  config.augmentation = "inception_crop"
  config.image_size = IMAGE_SIZE
  for field, value in overrides.items():
    config[field] = value
  return config


@pytest.fixture(scope="module")
def loaded():
  """The mocked imagenet2012 loaded twice, and the labels read straight from tfds."""
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    first = data_lib.load_dataset(_config())
    second = data_lib.load_dataset(_config())
    builder = tfds.builder("imagenet2012")
    records = builder.as_dataset(split="train", shuffle_files=False)
    labels = np.array([int(example["label"]) for example in records])
    validation = builder.as_dataset(split="validation", shuffle_files=False)
    validation_labels = np.array([int(example["label"]) for example in validation])
  return first, second, labels, validation_labels


def _epoch(data, epoch, skip_batches=0, seed=0):
  batches = list(data.stream.train_batches(seed, epoch, BATCH_SIZE, skip_batches=skip_batches))
  ids = np.concatenate([batch[0] for batch in batches])
  images = np.concatenate([batch[1] for batch in batches])
  labels = np.concatenate([batch[2] for batch in batches])
  return ids, images, labels


def test_ids_stable_across_loads(loaded):
  first, second, labels, _ = loaded
  assert first.images is None
  np.testing.assert_array_equal(first.source_index, np.arange(NUM_RECORDS))
  np.testing.assert_array_equal(first.labels, labels)
  np.testing.assert_array_equal(second.labels, labels)
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    ids_first, images_first, _ = _epoch(first, 1)
    ids_second, images_second, _ = _epoch(second, 1)
  np.testing.assert_array_equal(ids_first, ids_second)
  np.testing.assert_array_equal(images_first, images_second)


def test_epoch_covers_every_id_with_its_label(loaded):
  data, _, labels, _ = loaded
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    ids, images, batch_labels = _epoch(data, 1)
  np.testing.assert_array_equal(np.sort(ids), np.arange(NUM_RECORDS))
  np.testing.assert_array_equal(batch_labels, labels[ids])
  assert images.shape == (NUM_RECORDS, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert images.dtype == np.float32


def test_epoch_order_reproducible_and_resumable(loaded):
  data, _, _, _ = loaded
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    ids, images, _ = _epoch(data, 2)
    ids_again, images_again, _ = _epoch(data, 2)
    ids_resumed, images_resumed, _ = _epoch(data, 2, skip_batches=2)
    ids_next, _, _ = _epoch(data, 3)
  np.testing.assert_array_equal(ids, ids_again)
  np.testing.assert_array_equal(images, images_again)
  # A run resumed after two batches gets exactly the rest of the epoch.
  np.testing.assert_array_equal(ids_resumed, ids[2 * BATCH_SIZE :])
  np.testing.assert_array_equal(images_resumed, images[2 * BATCH_SIZE :])
  assert not np.array_equal(ids, ids_next)


def test_streamed_inputs_on_device(loaded):
  data, _, _, _ = loaded
  inputs = input_pipeline.StreamedInputs(data, seed=0, batch_size=BATCH_SIZE)
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    ids, images, labels = _epoch(data, 2, skip_batches=1)
    streamed = list(inputs.train_inputs(epoch=2, first_index=1))
  assert len(streamed) == NUM_RECORDS // BATCH_SIZE - 1
  for batch_ids, (batch_images, batch_labels) in streamed:
    assert all(isinstance(a, jax.Array) for a in (batch_ids, batch_images, batch_labels))
  np.testing.assert_array_equal(np.concatenate([b[0] for b in streamed]), ids)
  np.testing.assert_array_equal(np.concatenate([b[1][0] for b in streamed]), images)
  np.testing.assert_array_equal(np.concatenate([b[1][1] for b in streamed]), labels)


def test_reference_positions_leave_training(loaded):
  data, _, labels, _ = loaded
  # Records 0, 5 and 9 are held out by hand, and the others become ids 0..20 in order.
  instance_of_position = np.full(NUM_RECORDS, -1, np.int32)
  training_positions = np.setdiff1d(np.arange(NUM_RECORDS), [0, 5, 9])
  instance_of_position[training_positions] = np.arange(len(training_positions))
  stream = dataclasses.replace(
    data.stream, instance_of_position=instance_of_position, labels=labels[training_positions]
  )
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    batches = list(stream.train_batches(0, 1, 7))
  ids = np.concatenate([batch[0] for batch in batches])
  np.testing.assert_array_equal(np.sort(ids), np.arange(len(training_positions)))
  np.testing.assert_array_equal(
    np.concatenate([b[2] for b in batches]), labels[training_positions][ids]
  )


def test_eval_covers_every_validation_example(loaded):
  data, _, _, validation_labels = loaded
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    batches = list(data.stream.eval_batches(10))
  assert [len(labels) for _, labels in batches] == [10, 10, 4]
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), validation_labels)
  assert batches[0][0].shape == (10, IMAGE_SIZE, IMAGE_SIZE, 3)


def _jpeg(height, width, colour):
  image = np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3))
  return tf.io.encode_jpeg(image, quality=100)


def test_evaluation_transform_crops_center():
  spec = data_lib.get_spec("imagenet2012")
  # Left half black, right half white, 40x80: the shorter side goes to
  # round(16 / 0.875) = 18, so 18x36, and the central 16 columns are 10..25,
  # which straddle the edge at column 18 evenly: 8 dark, 8 bright.
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 40:] = 255
  output = imagenet.decode_for_evaluation(tf.io.encode_jpeg(image, quality=100), 16, spec).numpy()
  assert output.shape == (16, 16, 3)
  white = (1.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
  black = -np.asarray(spec.mean) / np.asarray(spec.std)
  np.testing.assert_allclose(output[:, :6], np.broadcast_to(black, (16, 6, 3)), atol=0.05)
  np.testing.assert_allclose(output[:, -6:], np.broadcast_to(white, (16, 6, 3)), atol=0.05)


def test_inception_crop_is_seeded_and_normalised():
  spec = data_lib.get_spec("imagenet2012")
  encoded = _jpeg(30, 50, (200, 100, 50))
  seed = tf.constant([3, 7], tf.int32)
  first = imagenet.decode_for_training(encoded, seed, 12, "inception_crop", spec).numpy()
  again = imagenet.decode_for_training(encoded, seed, 12, "inception_crop", spec).numpy()
  assert first.shape == (12, 12, 3)
  np.testing.assert_array_equal(first, again)
  # A uniform image stays uniform under any crop and flip.
  expected = (np.array([200, 100, 50]) / 255.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
  np.testing.assert_allclose(first, np.broadcast_to(expected, first.shape), atol=0.05)


def test_imagenet_rejects_idx_source():
  with pytest.raises(data_lib.DataError, match=r"source='idx' is invalid for imagenet2012"):
    data_lib.load_dataset(_config(source="idx"))


def test_decode_positions_matches_records(loaded):
  data, _, _, _ = loaded
  spec = data_lib.get_spec("imagenet2012")
  with tfds.testing.mock_data(num_examples=NUM_RECORDS):
    decoded = data.stream.decode_positions(np.array([1, 4]))
    records = tfds.builder("imagenet2012").as_dataset(
      split="train", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    encoded = [example["image"] for example in records.take(5)]
  assert decoded.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
  for row, position in enumerate([1, 4]):
    expected = imagenet.decode_for_evaluation(encoded[position], IMAGE_SIZE, spec).numpy()
    np.testing.assert_allclose(decoded[row], expected, rtol=1e-6)


def test_unprepared_imagenet_explains_fix(tmp_path):
  with pytest.raises(data_lib.DataError, match=r"imagenet2012 is not prepared in .*tfds build"):
    data_lib.load_dataset(_config(data_dir=str(tmp_path)))
