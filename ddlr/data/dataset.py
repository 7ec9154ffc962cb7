"""Build the training, reference and test arrays that a ddlr run uses."""

import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ddlr.data import catalog, imagenet, sources, targets
from ddlr.data.config import check_config, check_reference_size
from ddlr.data.errors import DataError
from ddlr.data.noise import corrupt_labels
from ddlr.data.splits import hold_out_reference


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingData:
  """Training, reference and test arrays of one run, with the label noise record.

  Row k of the training arrays is the example with instance id k, for k in
  `[0, N)`. `source_index[k]` is its position in the tfds train split.
  Images are float32 NHWC, normalized with the dataset's per-channel mean
  and std. A streamed dataset (imagenet2012) has `images` and `test_images`
  None and its training and test batches come from `stream`.
  """

  name: str
  images: np.ndarray | None
  labels: np.ndarray  # observed labels, possibly noisy (int32)
  true_labels: np.ndarray
  is_noisy: np.ndarray  # bool, labels != true_labels
  source_index: np.ndarray
  reference_images: np.ndarray
  reference_labels: np.ndarray
  reference_source_index: np.ndarray
  test_images: np.ndarray | None
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  noise_kind: str
  # Realized fraction of training labels that differ from the true labels.
  # For 'uniform' noise it is about (C - 1) / C times the configured noise.rate.
  noise_rate: float
  # Target distribution of personalisation (`targets.TARGET_KINDS`) and which
  # training and test examples come from it; None means no example does.
  target_kind: str = "none"
  is_target_domain: np.ndarray | None = None  # bool [N]
  test_is_target: np.ndarray | None = None  # bool [T]
  # The imagenet.ImageNetStream of a streamed dataset, None when held in memory.
  stream: Any = None

  def __post_init__(self):
    for field, length in (
      ("is_target_domain", len(self.labels)),
      ("test_is_target", len(self.test_labels)),
    ):
      if getattr(self, field) is None:
        object.__setattr__(self, field, np.zeros(length, dtype=bool))
    groups = {
      "training": (
        "images",
        "labels",
        "true_labels",
        "is_noisy",
        "source_index",
        "is_target_domain",
      ),
      "reference": (
        "reference_images",
        "reference_labels",
        "reference_source_index",
      ),
      "test": ("test_images", "test_labels", "test_is_target"),
    }
    for group, fields in groups.items():
      lengths = {
        field: len(getattr(self, field)) for field in fields if getattr(self, field) is not None
      }
      if len(set(lengths.values())) > 1:
        raise DataError(f"{group} arrays differ in length: {lengths}")

  @property
  def num_examples(self) -> int:
    """Number of training examples N, so instance ids are `[0, N)`."""
    return len(self.labels)


def load_dataset(config) -> TrainingData:
  """Load a dataset, hold out the reference set and corrupt training labels.

  Steps: load the first `num_train` train examples and `num_test` test
  examples, hold out `reference_size` class-balanced examples by their true
  labels, corrupt the labels of the remaining training examples, and
  normalize all images. The reference and test labels stay clean.

  With a target distribution (`target.kind` other than 'none') the held-out
  examples are a pool, and the reference split is the target sample drawn
  from it (`targets.sample_target`). The training ids, labels and noise do
  not depend on the target. For `transform` the training images of the
  target domain, the target sample and the target test images carry the
  transformation, so the training images differ between two targets exactly
  at the rows that either target's domain mask marks.

  Args:
    config: mapping or ConfigDict with exactly the fields of
      `default_config()`.

  Returns:
    The TrainingData of the run.

  Raises:
    DataError: a field is missing, unknown or invalid (the message names
      it), a file or directory is missing or invalid, or a loaded split is
      too small for the config (e.g. a target fraction that marks no test
      image).
  """
  check_config(config)
  name = config["name"]
  spec = catalog.get_spec(name)
  num_train, num_test = int(config["num_train"]), int(config["num_test"])
  reference_size, seed = int(config["reference_size"]), int(config["seed"])
  noise_kind, noise_rate = config["noise"]["kind"], float(config["noise"]["rate"])
  target = config["target"]

  if name == imagenet.NAME:
    return _load_imagenet(config, spec)
  load = dict(
    source=config["source"],
    data_dir=config["data_dir"],
    manual_dir=config["manual_dir"],
  )
  train_images, train_labels, class_names = sources.load_split(
    name, "train", max_examples=num_train or None, **load
  )
  test_images, test_labels, _ = sources.load_split(
    name, "test", max_examples=num_test or None, **load
  )
  _check_loaded_count("num_train", num_train, len(train_labels), name, "train")
  _check_loaded_count("num_test", num_test, len(test_labels), name, "test")
  train_index, reference_index, observed, is_noisy = _split_and_corrupt(
    train_labels, spec, reference_size, seed, noise_kind, noise_rate
  )
  if target["kind"] != "none":
    sample = targets.sample_target(train_labels[reference_index], target, seed)
    reference_index = reference_index[sample]
  true_labels = train_labels[train_index]
  is_target_domain, test_is_target = targets.domain_masks(true_labels, test_labels, target, seed)
  targets.check_domain_masks(target, is_target_domain, test_is_target)
  images, reference_images, test_images = _transform_target_domain(
    train_images[train_index],
    train_images[reference_index],
    test_images,
    target,
    masks=(is_target_domain, test_is_target),
  )

  training = dict(
    images=normalize_images(images, spec),
    labels=observed,
    true_labels=true_labels,
    is_noisy=is_noisy,
    source_index=train_index,
    is_target_domain=is_target_domain,
  )
  reference = dict(
    reference_images=normalize_images(reference_images, spec),
    reference_labels=train_labels[reference_index],
    reference_source_index=reference_index,
  )
  if target["train_on"] == "target_sample":
    training = _target_sample_as_training(reference)
  return TrainingData(
    name=name,
    **training,
    **reference,
    test_images=normalize_images(test_images, spec),
    test_labels=test_labels,
    num_classes=spec.num_classes,
    class_names=tuple(class_names),
    noise_kind=noise_kind,
    noise_rate=float(training["is_noisy"].mean()),
    target_kind=target["kind"],
    test_is_target=test_is_target,
  )


def _transform_target_domain(images, reference_images, test_images, target, masks):
  """Return the uint8 training, reference and test images with the target transformation.

  Without a `transform` target the images are returned unchanged. Otherwise
  every reference image and the training and test images of the two domain
  masks carry it.
  """
  if target["kind"] != "transform":
    return images, reference_images, test_images
  transform = target["transform"]
  is_target_domain, test_is_target = masks
  return (
    targets.transform_masked(images, is_target_domain, transform),
    targets.apply_transform(reference_images, transform),
    targets.transform_masked(test_images, test_is_target, transform),
  )


def _target_sample_as_training(reference: dict) -> dict:
  """Return the training fields of a run that trains on the target sample alone.

  The target sample's labels are clean and all of it is from the target distribution.
  """
  count = len(reference["reference_labels"])
  return dict(
    images=reference["reference_images"],
    labels=reference["reference_labels"],
    true_labels=reference["reference_labels"],
    is_noisy=np.zeros(count, bool),
    source_index=reference["reference_source_index"],
    is_target_domain=np.ones(count, bool),
  )


def _split_and_corrupt(train_labels, spec, reference_size, seed, noise_kind, noise_rate):
  """Holds out the reference split and corrupts the remaining labels.

  Returns:
    `(train_index, reference_index, observed labels, is_noisy)`.
  """
  check_reference_size(reference_size, len(train_labels))
  train_index, reference_index = hold_out_reference(
    train_labels, reference_size, seed, num_classes=spec.num_classes
  )
  observed, is_noisy = corrupt_labels(
    train_labels[train_index],
    kind=noise_kind,
    rate=noise_rate,
    num_classes=spec.num_classes,
    seed=seed,
  )
  return train_index, reference_index, observed, is_noisy


def _load_imagenet(config, spec: catalog.DatasetSpec) -> TrainingData:
  """Reads imagenet2012's labels, draws the split and noise, and decodes the reference images.

  The training and validation images stay on disk; `TrainingData.stream`
  reads them batch by batch.
  """
  image_size = config["image_size"]
  sources.check_directory("data_dir", config["data_dir"])
  num_train, num_test = int(config["num_train"]), int(config["num_test"])
  builder = tfds.builder(imagenet.NAME, data_dir=config["data_dir"])
  train_labels = imagenet.read_labels(builder, "train", num_train or None)
  test_labels = imagenet.read_labels(builder, "validation", num_test or None)
  _check_loaded_count("num_train", num_train, len(train_labels), spec.name, "train")
  _check_loaded_count("num_test", num_test, len(test_labels), spec.name, "validation")

  train_index, reference_index, observed, is_noisy = _split_and_corrupt(
    train_labels,
    spec,
    int(config["reference_size"]),
    int(config["seed"]),
    config["noise"]["kind"],
    float(config["noise"]["rate"]),
  )
  instance_of_position = np.full(len(train_labels), -1, np.int32)
  instance_of_position[train_index] = np.arange(len(train_index), dtype=np.int32)
  stream = imagenet.ImageNetStream(
    builder=builder,
    image_size=int(image_size),
    augmentation=config["augmentation"],
    instance_of_position=instance_of_position,
    labels=observed,
    num_train_records=len(train_labels),
    num_test=len(test_labels),
  )
  return TrainingData(
    name=spec.name,
    images=None,
    labels=observed,
    true_labels=train_labels[train_index],
    is_noisy=is_noisy,
    source_index=train_index,
    reference_images=stream.decode_positions(reference_index),
    reference_labels=train_labels[reference_index],
    reference_source_index=reference_index,
    test_images=None,
    test_labels=test_labels,
    num_classes=spec.num_classes,
    class_names=tuple(builder.info.features["label"].names),
    noise_kind=config["noise"]["kind"],
    noise_rate=float(is_noisy.mean()),
    stream=stream,
  )


def normalize_images(images: np.ndarray, spec: catalog.DatasetSpec) -> np.ndarray:
  """Scale uint8 images to [0, 1], then standardize each channel.

  Returns:
    float32 array of the same shape: `(images / 255 - mean) / std`.
  """
  mean = np.asarray(spec.mean, dtype=np.float32)
  std = np.asarray(spec.std, dtype=np.float32)
  return (images.astype(np.float32) / 255.0 - mean) / std


def _check_loaded_count(field: str, requested: int, loaded: int, name: str, split: str) -> None:
  if requested and loaded < requested:
    raise DataError(
      f"config.data.{field}={requested} exceeds the {loaded} examples of the {name} {split!r} "
      f"split; set it to at most {loaded}, or to 0 for the whole split"
    )
