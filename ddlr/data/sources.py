"""Load a whole dataset split as numpy arrays from tfds or from raw files."""

import os

import numpy as np
import tensorflow_datasets as tfds

from ddlr.data import catalog, checks, fashion_offline, raw_files
from ddlr.data.errors import DataError

SOURCES = ("tfds", "idx")
SPLITS = ("train", "test")

_READ_BATCH_SIZE = 10_000
# The field of `config.data` that `load_dataset` passes as `max_examples` of each split.
_COUNT_FIELDS = {"train": "num_train", "test": "num_test"}


def load_split(
  name: str,
  split: str,
  *,
  source: str,
  data_dir: str | None,
  manual_dir: str | None,
  max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Load one split of a supported dataset into memory.

  With `source='tfds'` the split is read from the tfds dataset prepared in
  `data_dir` (None means the tfds default). ddlr never downloads data: if
  `fashion_mnist` is not prepared and `manual_dir` is given, it is prepared
  offline from the files of Debian's dataset-fashion-mnist in `manual_dir`.
  Other unprepared datasets raise DataError. With `source='idx'` the split
  is read from raw files in `manual_dir`: IDX files for `mnist` and
  `fashion_mnist`, the extracted python archive for `cifar10` and
  `cifar100`. Both sources return the examples in the order of the tfds
  split, so row i is example i of that split.

  Args:
    name: one of `catalog.SUPPORTED_DATASETS`.
    split: `'train'` or `'test'`.
    source: `'tfds'` or `'idx'`.
    data_dir: tfds data directory. Must exist if given.
    manual_dir: directory with the raw files. Must exist if given. With
      `source='tfds'` it is used only to prepare `fashion_mnist`.
    max_examples: if given, read at most this many examples from the
      start of the split. A smaller split is returned whole by
      `source='idx'` and raises DataError with `source='tfds'`, naming
      `config.data.num_train` or `num_test`, which `load_dataset` passes here.

  Returns:
    uint8 images `[n, H, W, C]`, int32 labels `[n]` and the class names in
    label order.
  """
  spec = catalog.get_spec(name)
  if name == "imagenet2012":
    raise DataError(
      "imagenet2012 does not fit in memory, so it is not loaded as arrays. "
      "Use ddlr.data.load_dataset, which streams it"
    )
  _check_choice("split", split, SPLITS)
  _check_choice("source", source, SOURCES)
  check_directory("data_dir", data_dir)
  if max_examples is not None:
    checks.check_count("max_examples", max_examples)

  if source == "tfds":
    images, labels, class_names = _load_tfds_split(name, split, data_dir, manual_dir, max_examples)
  else:
    images, labels, class_names = _load_raw_split(name, split, manual_dir, max_examples)

  if images.dtype != np.uint8 or images.shape[1:] != spec.image_shape:
    raise DataError(
      f"{name} {split!r} images are {images.dtype} {images.shape[1:]}, "
      f"expected uint8 {spec.image_shape}"
    )
  if len(class_names) != spec.num_classes:
    raise DataError(f"{name} has {len(class_names)} class names, expected {spec.num_classes}")
  return images, labels, class_names


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise DataError(f"invalid {field} {value!r}. Expected one of {', '.join(choices)}")


def check_directory(field: str, path: str | None) -> None:
  """Raises DataError if `path` is given and is not a directory.

  `field` is the name of the path's field in `config.data`, which the message names.
  """
  if path is not None and not os.path.isdir(path):
    raise DataError(
      f"config.data.{field} directory not found: {path}; set config.data.{field} to an "
      "existing directory"
    )


def _load_tfds_split(
  name: str,
  split: str,
  data_dir: str | None,
  manual_dir: str | None,
  max_examples: int | None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    # Its message lists every tfds dataset, over 600 lines.
    raise DataError(
      f"tfds has no dataset named {name!r}, which ddlr/data/catalog.py lists; use the tfds "
      "name in the catalog, or source='idx' with a raw-file reader for it"
    ) from error
  if name == "fashion_mnist" and manual_dir is not None and not builder.is_prepared():
    # manual_dir is only read, and so only checked, when the dataset needs preparing.
    check_directory("manual_dir", manual_dir)
    fashion_offline.prepare_fashion_mnist(data_dir, manual_dir)
    builder = tfds.builder(name, data_dir=data_dir)

  tfds_split = split if max_examples is None else f"{split}[:{max_examples}]"
  try:
    # Fixed-size batches, not batch_size=-1: when tfds does not know the
    # split size (as under tfds.testing.mock_data without metadata files), -1
    # becomes a batch of sys.maxsize, on which TF 2.21 aborts the process.
    batches = builder.as_dataset(split=tfds_split, batch_size=_READ_BATCH_SIZE)
  except AssertionError as error:
    # tfds 4.9 raises AssertionError from as_dataset when the dataset
    # directory does not exist, that is, when it was never prepared.
    raise DataError(_not_prepared_message(name, builder.data_dir_root)) from error
  except ValueError as error:
    # tfds rejects a slice longer than the split before any data is read.
    raise DataError(
      f"config.data.{_COUNT_FIELDS[split]}={max_examples} exceeds the examples of the {name} "
      f"{split!r} split ({error}); lower it, or set it to 0 for the whole split"
    ) from error

  class_names = list(builder.info.features["label"].names)
  image_batches, label_batches = [], []
  for batch in tfds.as_numpy(batches):
    image_batches.append(batch["image"])
    label_batches.append(batch["label"].astype(np.int32))
  if not image_batches:
    spec = catalog.get_spec(name)
    return np.zeros((0, *spec.image_shape), np.uint8), np.zeros(0, np.int32), class_names
  images = np.concatenate(image_batches)
  labels = np.concatenate(label_batches)
  # tfds.testing.mock_data returns a fixed number of examples for any split.
  if max_examples is not None:
    images, labels = images[:max_examples], labels[:max_examples]
  return images, labels, class_names


def _not_prepared_message(name: str, data_dir) -> str:
  if name == "fashion_mnist":
    instructions = (
      "set config.data.manual_dir to the files of Debian's dataset-fashion-mnist "
      f"(usually {fashion_offline.DEBIAN_FASHION_MNIST_DIR}) to prepare it offline"
    )
  else:
    instructions = (
      f"prepare it where a network is available (`tfds build {name} --data_dir=DIR`) and set "
      "config.data.data_dir to DIR"
    )
  return (
    f"tfds dataset {name} is not prepared in {data_dir} and ddlr does not download data: "
    f"{instructions}, or set config.data.source='idx' and config.data.manual_dir to the "
    "directory of the raw files"
  )


def check_raw_file_reader(name: str) -> None:
  """Raises DataError unless `source='idx'` has a reader for dataset `name`."""
  if name not in raw_files.RAW_FILE_DATASETS:
    raise DataError(
      f"source='idx' cannot read dataset {name!r} because ddlr/data/raw_files.py has no "
      f"reader for it. source='idx' reads {', '.join(raw_files.RAW_FILE_DATASETS)}. Use "
      f"source='tfds', or add a reader for {name}"
    )


def _load_raw_split(
  name: str, split: str, manual_dir: str | None, max_examples: int | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  check_raw_file_reader(name)
  if manual_dir is None:
    raise DataError(f"source='idx' needs manual_dir, the directory with the raw {name} files")
  check_directory("manual_dir", manual_dir)
  if name == "mnist" and fashion_offline.holds_fashion_mnist(manual_dir):
    raise DataError(
      f"manual_dir {manual_dir} contains the Fashion-MNIST files, not mnist; set "
      "config.data.manual_dir to the MNIST files or config.data.name='fashion_mnist'"
    )
  if name in raw_files.IDX_DATASETS:
    images, labels = raw_files.read_idx_split(name, split, manual_dir)
    if name not in catalog.IDX_CLASS_NAMES:
      raise DataError(
        f"IDX files hold no class names, and ddlr/data/catalog.py has none for {name!r} in "
        "IDX_CLASS_NAMES; add them there"
      )
    class_names = list(catalog.IDX_CLASS_NAMES[name])
  else:
    images, labels, class_names = raw_files.read_cifar_split(name, split, manual_dir)

  order = raw_files.tfds_order(split, len(labels))
  if max_examples is not None:
    order = order[:max_examples]
  return images[order], labels[order], class_names
