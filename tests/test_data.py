"""Tests of ddlr.data: raw and tfds sources, label noise, reference hold-out, records.

The Fashion-MNIST tests read the files of Debian's dataset-fashion-mnist package
and prepare tfds from them on the first run (about 40 s on a 2-core machine).
They are skipped where the package is not installed. Nothing is downloaded.
"""

import gzip
import os
import pickle
import re

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing

from ddlr import data as data_lib
from ddlr.data import catalog, fashion_offline

DEBIAN_DIR = fashion_offline.DEBIAN_FASHION_MNIST_DIR
needs_debian_fashion_mnist = pytest.mark.skipif(
  not all(
    os.path.isfile(os.path.join(DEBIAN_DIR, name)) for name in fashion_offline.DEBIAN_CONTENT_SHA256
  ),
  reason=f"Debian's dataset-fashion-mnist files are not in {DEBIAN_DIR}",
)


# Helpers that write small raw dataset files.


def write_idx(path, array, compress=True):
  """Write a uint8 array as an IDX file (gzip-compressed if `compress`)."""
  array = np.asarray(array, dtype=np.uint8)
  header = bytes([0, 0, 0x08, array.ndim])
  header += b"".join(size.to_bytes(4, "big") for size in array.shape)
  opener = gzip.open if compress else open
  with opener(path, "wb") as stream:
    stream.write(header + array.tobytes())


def write_mnist_dir(directory, num_train=300, num_test=50, compress=True):
  """Write random MNIST-shaped IDX files and return the raw arrays by split."""
  rng = np.random.default_rng(0)
  suffix = ".gz" if compress else ""
  raw = {}
  for split, prefix, count in (("train", "train", num_train), ("test", "t10k", num_test)):
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    rng.shuffle(labels)
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images, compress)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels, compress)
    raw[split] = (images[..., np.newaxis], labels.astype(np.int32))
  return raw


def tfds_order_reference(split, count):
  """tfds' own key hashing, independent of ddlr's reimplementation."""
  hasher = hashing.Hasher(split)
  return np.array(sorted(range(count), key=hasher.hash_key))


def write_cifar10_dir(directory, per_batch=4):
  """Write a tiny CIFAR-10 python archive and return the raw train arrays."""
  root = os.path.join(directory, "cifar-10-batches-py")
  os.makedirs(root)
  rng = np.random.default_rng(1)
  names = [f"class{label}".encode() for label in range(10)]
  with open(os.path.join(root, "batches.meta"), "wb") as stream:
    pickle.dump({b"label_names": names}, stream, protocol=2)
  rows, labels = [], []
  for filename in [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]:
    batch_rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
    batch_labels = [int(label) for label in rng.integers(0, 10, size=per_batch)]
    with open(os.path.join(root, filename), "wb") as stream:
      pickle.dump({b"data": batch_rows, b"labels": batch_labels}, stream, protocol=2)
    if filename != "test_batch":
      rows.append(batch_rows)
      labels.extend(batch_labels)
  return np.concatenate(rows), np.array(labels, dtype=np.int32)


def make_config(as_dict=False, **overrides):
  """Return the default data config with `overrides`, where `noise_kind`/`noise_rate` set noise.

  `as_dict=True` returns a plain dict, which accepts values of any type.
  """
  config = data_lib.default_config().to_dict()
  config["noise"]["kind"] = overrides.pop("noise_kind", "none")
  config["noise"]["rate"] = overrides.pop("noise_rate", 0.0)
  config.update(overrides)
  return config if as_dict else ml_collections.ConfigDict(config)


@pytest.fixture
def mnist_dir(tmp_path):
  raw = write_mnist_dir(str(tmp_path))
  return str(tmp_path), raw


# Label noise.


def test_symmetric_noise_flips_exact_count():
  labels = np.arange(1000) % 10
  noisy, is_noisy = data_lib.corrupt_labels(
    labels, kind="symmetric", rate=0.3, num_classes=10, seed=0
  )
  assert is_noisy.sum() == 300
  assert np.all(noisy[is_noisy] != labels[is_noisy])
  np.testing.assert_array_equal(noisy[~is_noisy], labels[~is_noisy])
  offsets = (noisy[is_noisy] - labels[is_noisy]) % 10
  assert set(np.unique(offsets)) == set(range(1, 10))
  assert noisy.dtype == np.int32
  assert is_noisy.dtype == bool


def test_pairflip_maps_class_to_next():
  labels = np.arange(1000) % 10
  noisy, is_noisy = data_lib.corrupt_labels(
    labels, kind="pairflip", rate=0.45, num_classes=10, seed=3
  )
  assert is_noisy.sum() == 450
  np.testing.assert_array_equal(noisy[is_noisy], (labels[is_noisy] + 1) % 10)
  np.testing.assert_array_equal(noisy[~is_noisy], labels[~is_noisy])


def test_uniform_noise_rate_and_transitions():
  num_classes, rate, count = 10, 0.4, 100_000
  labels = np.arange(count) % num_classes
  noisy, is_noisy = data_lib.corrupt_labels(
    labels, kind="uniform", rate=rate, num_classes=num_classes, seed=1
  )
  # round(rate * n) examples are resampled. Each keeps its class with
  # probability 1/C, so the flip count is Binomial(40000, 0.9): std 60, or
  # 0.0006 as a rate. The tolerance is 8 standard deviations.
  expected = rate * (num_classes - 1) / num_classes
  assert abs(is_noisy.mean() - expected) < 0.005
  np.testing.assert_array_equal(is_noisy, noisy != labels)
  offsets = (noisy[is_noisy] - labels[is_noisy]) % num_classes
  offset_share = np.bincount(offsets, minlength=num_classes)[1:] / is_noisy.sum()
  # Each of the 9 offsets has share 1/9, and 0.01 is over 6 standard deviations.
  np.testing.assert_allclose(offset_share, 1 / 9, atol=0.01)


@pytest.mark.parametrize("kind", ["symmetric", "uniform", "pairflip", "none"])
def test_noise_rate_zero_keeps_labels(kind):
  labels = np.arange(100) % 10
  noisy, is_noisy = data_lib.corrupt_labels(labels, kind=kind, rate=0.0, num_classes=10, seed=0)
  np.testing.assert_array_equal(noisy, labels)
  assert not is_noisy.any()


@pytest.mark.parametrize("kind", ["symmetric", "uniform", "pairflip"])
def test_noise_deterministic_from_seed(kind):
  labels = np.arange(500) % 10
  first = data_lib.corrupt_labels(labels, kind=kind, rate=0.3, num_classes=10, seed=7)
  again = data_lib.corrupt_labels(labels, kind=kind, rate=0.3, num_classes=10, seed=7)
  other = data_lib.corrupt_labels(labels, kind=kind, rate=0.3, num_classes=10, seed=8)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize(
  "kind, rate, message",
  [
    ("gaussian", 0.2, "'gaussian'"),
    ("symmetric", 1.0, "1.0"),
    ("symmetric", -0.1, "-0.1"),
    ("symmetric", float("nan"), "nan"),
    ("none", 0.2, "0.2"),
    ("pairflip", 0.5, "expected a value below 0.5"),
  ],
)
def test_noise_rejects_bad_settings(kind, rate, message):
  with pytest.raises(data_lib.DataError, match=message):
    data_lib.corrupt_labels(np.zeros(10, int), kind=kind, rate=rate, num_classes=10, seed=0)


def test_noise_rejects_label_out_of_range():
  with pytest.raises(data_lib.DataError, match=r"\[0, 10\)"):
    data_lib.corrupt_labels(np.array([0, 10]), kind="symmetric", rate=0.5, num_classes=10, seed=0)


# Reference hold-out.


def test_reference_disjoint_and_class_balanced():
  labels = np.random.default_rng(0).integers(0, 10, size=2000)
  train_index, reference_index = data_lib.hold_out_reference(labels, 100, seed=0)
  assert len(reference_index) == 100
  assert len(np.intersect1d(train_index, reference_index)) == 0
  np.testing.assert_array_equal(
    np.sort(np.concatenate([train_index, reference_index])), np.arange(2000)
  )
  np.testing.assert_array_equal(np.bincount(labels[reference_index], minlength=10), [10] * 10)
  assert np.all(np.diff(train_index) > 0)
  assert np.all(np.diff(reference_index) > 0)


def test_reference_deterministic_from_seed():
  labels = np.arange(1000) % 10
  first = data_lib.hold_out_reference(labels, 50, seed=4)
  again = data_lib.hold_out_reference(labels, 50, seed=4)
  other = data_lib.hold_out_reference(labels, 50, seed=5)
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[1], other[1])


def test_reference_size_zero_keeps_all():
  labels = np.arange(30) % 3
  train_index, reference_index = data_lib.hold_out_reference(labels, 0, seed=0)
  np.testing.assert_array_equal(train_index, np.arange(30))
  assert reference_index.shape == (0,)


@pytest.mark.parametrize(
  "size, message",
  [(105, "105 is not a multiple of the 10 classes"), (100, "class 3 has 2 examples"), (-1, "-1")],
)
def test_reference_rejects_impossible_size(size, message):
  counts = [20] * 10
  counts[3] = 2
  labels = np.repeat(np.arange(10), counts)
  with pytest.raises(data_lib.DataError, match=message):
    data_lib.hold_out_reference(labels, size, seed=0, num_classes=10)


def test_reference_rejects_size_of_whole_split():
  with pytest.raises(data_lib.DataError, match="20 must be less than the 20"):
    data_lib.hold_out_reference(np.arange(20) % 10, 20, seed=0)


# Raw IDX and CIFAR files.


def test_idx_source_uses_tfds_order(mnist_dir):
  directory, raw = mnist_dir
  for split in ("train", "test"):
    images, labels, class_names = data_lib.load_split(
      "mnist", split, source="idx", data_dir=None, manual_dir=directory
    )
    order = tfds_order_reference(split, len(raw[split][1]))
    np.testing.assert_array_equal(images, raw[split][0][order])
    np.testing.assert_array_equal(labels, raw[split][1][order])
    assert images.dtype == np.uint8
    assert labels.dtype == np.int32
    assert class_names == [str(digit) for digit in range(10)]


def test_idx_reads_uncompressed_files(tmp_path):
  raw = write_mnist_dir(str(tmp_path), compress=False)
  images, labels, _ = data_lib.load_split(
    "mnist", "train", source="idx", data_dir=None, manual_dir=str(tmp_path)
  )
  order = tfds_order_reference("train", len(raw["train"][1]))
  np.testing.assert_array_equal(images, raw["train"][0][order])
  np.testing.assert_array_equal(labels, raw["train"][1][order])


def test_idx_max_examples_takes_split_start(mnist_dir):
  directory, _ = mnist_dir
  full = data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=directory)
  first = data_lib.load_split(
    "mnist", "train", source="idx", data_dir=None, manual_dir=directory, max_examples=25
  )
  np.testing.assert_array_equal(first[0], full[0][:25])
  np.testing.assert_array_equal(first[1], full[1][:25])


def test_idx_rejects_wrong_magic(mnist_dir):
  directory, _ = mnist_dir
  path = os.path.join(directory, "train-labels-idx1-ubyte.gz")
  write_idx(path, np.zeros((300, 28, 28)))  # an image file under the label name
  with pytest.raises(data_lib.DataError, match=re.escape(path) + ".* 3 dimensions, expected 1"):
    data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=directory)
  with gzip.open(path, "wb") as stream:
    stream.write(b"\x08\x03\x00\x01" + bytes(12))
  with pytest.raises(data_lib.DataError, match=re.escape(f"{path} has magic number 0x08030001")):
    data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=directory)


def test_idx_rejects_truncated_file(mnist_dir):
  directory, _ = mnist_dir
  path = os.path.join(directory, "train-images-idx3-ubyte.gz")
  with gzip.open(path, "rb") as stream:
    content = stream.read()
  with gzip.open(path, "wb") as stream:
    stream.write(content[:-5])
  with pytest.raises(
    data_lib.DataError, match=re.escape(f"{path} contains 235195 data bytes, expected 235200")
  ):
    data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=directory)


def test_idx_rejects_count_mismatch(mnist_dir):
  directory, _ = mnist_dir
  write_idx(os.path.join(directory, "train-labels-idx1-ubyte.gz"), np.zeros(299))
  with pytest.raises(data_lib.DataError, match="300 images but .* 299 labels"):
    data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=directory)


def test_idx_missing_file_named(tmp_path):
  with pytest.raises(
    data_lib.DataError, match=re.escape(f"train-images-idx3-ubyte.gz in {tmp_path}")
  ):
    data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=str(tmp_path))


def test_cifar10_python_archive(tmp_path):
  rows, labels = write_cifar10_dir(str(tmp_path))
  images, loaded_labels, class_names = data_lib.load_split(
    "cifar10", "train", source="idx", data_dir=None, manual_dir=str(tmp_path)
  )
  order = tfds_order_reference("train", 20)
  assert images.shape == (20, 32, 32, 3)
  np.testing.assert_array_equal(loaded_labels, labels[order])
  # Rows store the red plane, then green, then blue, each 32 x 32 row-major.
  first = rows[order[0]]
  assert images[0, 0, 0, 0] == first[0]
  assert images[0, 0, 1, 0] == first[1]
  assert images[0, 1, 0, 0] == first[32]
  assert images[0, 0, 0, 1] == first[1024]
  assert images[0, 0, 0, 2] == first[2048]
  assert class_names == [f"class{label}" for label in range(10)]
  test_images, _, _ = data_lib.load_split(
    "cifar10", "test", source="idx", data_dir=None, manual_dir=str(tmp_path)
  )
  assert test_images.shape == (4, 32, 32, 3)


def test_cifar100_uses_fine_labels(tmp_path):
  root = tmp_path / "cifar-100-python"
  root.mkdir()
  names = [f"fine{label}".encode() for label in range(100)]
  with open(root / "meta", "wb") as stream:
    pickle.dump({b"fine_label_names": names}, stream, protocol=2)
  for filename, count in (("train", 6), ("test", 3)):
    content = {
      b"data": np.zeros((count, 3072), np.uint8),
      b"fine_labels": list(range(90, 90 + count)),
      b"coarse_labels": [0] * count,
    }
    with open(root / filename, "wb") as stream:
      pickle.dump(content, stream, protocol=2)
  _, labels, class_names = data_lib.load_split(
    "cifar100", "train", source="idx", data_dir=None, manual_dir=str(tmp_path)
  )
  np.testing.assert_array_equal(np.sort(labels), np.arange(90, 96))
  assert class_names[95] == "fine95"


class _RunsCode:
  def __reduce__(self):
    return (os.getcwd, ())


def test_cifar_rejects_pickle_with_code(tmp_path):
  write_cifar10_dir(str(tmp_path))
  path = os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_2")
  with open(path, "wb") as stream:
    pickle.dump({b"data": _RunsCode(), b"labels": []}, stream, protocol=2)
  with pytest.raises(
    data_lib.DataError, match=re.escape(f"{path} is not a valid CIFAR python pickle")
  ):
    data_lib.load_split("cifar10", "train", source="idx", data_dir=None, manual_dir=str(tmp_path))


def test_cifar_missing_folder_named(tmp_path):
  with pytest.raises(data_lib.DataError, match="cifar-10-batches-py"):
    data_lib.load_split("cifar10", "train", source="idx", data_dir=None, manual_dir=str(tmp_path))


# load_split arguments.


def test_load_split_rejects_unknown_name():
  with pytest.raises(
    data_lib.DataError,
    match="'imagenet'. Expected one of mnist, fashion_mnist, cifar10, cifar100, imagenet2012",
  ):
    data_lib.load_split("imagenet", "train", source="tfds", data_dir=None, manual_dir=None)


@pytest.mark.parametrize(("field", "source"), [("data_dir", "tfds"), ("manual_dir", "idx")])
def test_load_split_rejects_missing_directory(tmp_path, field, source):
  missing = str(tmp_path / "absent")
  paths = {"data_dir": None, "manual_dir": None, field: missing}
  with pytest.raises(
    data_lib.DataError, match=re.escape(f"config.data.{field} directory not found: {missing}")
  ):
    data_lib.load_split("fashion_mnist", "train", source=source, **paths)


def test_load_split_rejects_bad_source_and_split(tmp_path):
  with pytest.raises(data_lib.DataError, match="'http'"):
    data_lib.load_split("mnist", "train", source="http", data_dir=None, manual_dir=None)
  with pytest.raises(data_lib.DataError, match="'validation'"):
    data_lib.load_split("mnist", "validation", source="idx", data_dir=None, manual_dir=None)
  with pytest.raises(data_lib.DataError, match="needs manual_dir"):
    data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=None)


@pytest.fixture
def dataset_without_reader(monkeypatch):
  """Adds a catalog entry without a raw-file reader, as a new dataset's first step does."""
  spec = catalog.DatasetSpec("svhn_cropped", 10, (32, 32, 3), (0.5,) * 3, (0.25,) * 3)
  monkeypatch.setitem(catalog._SPECS, spec.name, spec)
  return spec.name


NO_READER_MESSAGE = (
  "source='idx' cannot read dataset 'svhn_cropped' because ddlr/data/raw_files.py has no "
  "reader for it. source='idx' reads mnist, fashion_mnist, cifar10, cifar100. Use "
  "source='tfds', or add a reader for svhn_cropped"
)


def test_idx_rejects_dataset_without_reader(tmp_path, dataset_without_reader):
  with pytest.raises(data_lib.DataError) as raised:
    data_lib.load_split(
      dataset_without_reader, "train", source="idx", data_dir=None, manual_dir=str(tmp_path)
    )
  assert str(raised.value) == NO_READER_MESSAGE


def test_idx_config_rejects_dataset_without_reader(tmp_path, dataset_without_reader):
  config = make_config(name=dataset_without_reader, source="idx", manual_dir=str(tmp_path))
  with pytest.raises(data_lib.DataError) as raised:
    data_lib.load_dataset(config)
  assert str(raised.value) == f"invalid config.data: {NO_READER_MESSAGE}"


def test_catalog_name_unknown_to_tfds(tmp_path, monkeypatch):
  spec = catalog.DatasetSpec("not_a_tfds_dataset", 10, (8, 8, 1), (0.5,), (0.25,))
  monkeypatch.setitem(catalog._SPECS, spec.name, spec)
  with pytest.raises(data_lib.DataError) as raised:
    data_lib.load_split(spec.name, "train", source="tfds", data_dir=str(tmp_path), manual_dir=None)
  assert str(raised.value) == (
    "tfds has no dataset named 'not_a_tfds_dataset', which ddlr/data/catalog.py lists; use the "
    "tfds name in the catalog, or source='idx' with a raw-file reader for it"
  )


def test_idx_dataset_needs_class_names(mnist_dir, monkeypatch):
  monkeypatch.delitem(catalog.IDX_CLASS_NAMES, "mnist")
  with pytest.raises(data_lib.DataError, match=r"none for 'mnist' in IDX_CLASS_NAMES"):
    data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=mnist_dir[0])


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_unprepared_tfds_dataset_explains_fix(tmp_path, name):
  with pytest.raises(
    data_lib.DataError,
    match=re.escape(f"{name} is not prepared in {tmp_path} and ddlr does not download"),
  ):
    data_lib.load_split(name, "train", source="tfds", data_dir=str(tmp_path), manual_dir=None)


# Real Fashion-MNIST files from Debian, prepared through tfds once per session.


@pytest.fixture(scope="session")
def fashion_mnist_data_dir(request, tmp_path_factory):
  """tfds data directory with fashion_mnist prepared from the Debian files.

  The directory is kept in pytest's cache, so preparation (about 40 s) runs
  only on the first session. `pytest --cache-clear` runs it again.
  """
  cache = getattr(request.config, "cache", None)
  if cache is None:  # pytest runs with -p no:cacheprovider
    data_dir = str(tmp_path_factory.mktemp("tfds"))
  else:
    data_dir = str(cache.mkdir("ddlr_fashion_mnist_tfds"))
  # Preparation happens inside load_split when the dataset is missing.
  data_lib.load_split(
    "fashion_mnist",
    "test",
    source="tfds",
    data_dir=data_dir,
    manual_dir=DEBIAN_DIR,
    max_examples=1,
  )
  return data_dir


@pytest.fixture(scope="session")
def fashion_mnist_idx_train():
  return data_lib.load_split(
    "fashion_mnist", "train", source="idx", data_dir=None, manual_dir=DEBIAN_DIR
  )


@needs_debian_fashion_mnist
def test_fashion_mnist_tfds_matches_idx(fashion_mnist_data_dir, fashion_mnist_idx_train):
  idx_test = data_lib.load_split(
    "fashion_mnist", "test", source="idx", data_dir=None, manual_dir=DEBIAN_DIR
  )
  tfds_test = data_lib.load_split(
    "fashion_mnist", "test", source="tfds", data_dir=fashion_mnist_data_dir, manual_dir=None
  )
  assert tfds_test[0].shape == (10_000, 28, 28, 1)
  np.testing.assert_array_equal(tfds_test[0], idx_test[0])
  np.testing.assert_array_equal(tfds_test[1], idx_test[1])
  assert tfds_test[2] == idx_test[2]

  tfds_train = data_lib.load_split(
    "fashion_mnist", "train", source="tfds", data_dir=fashion_mnist_data_dir, manual_dir=None
  )
  assert tfds_train[0].shape == (60_000, 28, 28, 1)
  np.testing.assert_array_equal(tfds_train[0], fashion_mnist_idx_train[0])
  np.testing.assert_array_equal(tfds_train[1], fashion_mnist_idx_train[1])

  tfds_train_start = data_lib.load_split(
    "fashion_mnist",
    "train",
    source="tfds",
    data_dir=fashion_mnist_data_dir,
    manual_dir=None,
    max_examples=1000,
  )
  np.testing.assert_array_equal(tfds_train_start[0], fashion_mnist_idx_train[0][:1000])
  np.testing.assert_array_equal(tfds_train_start[1], fashion_mnist_idx_train[1][:1000])


@needs_debian_fashion_mnist
def test_fashion_mnist_statistics_match_catalog(fashion_mnist_idx_train):
  pixel_counts = np.bincount(fashion_mnist_idx_train[0].ravel(), minlength=256)
  values = np.arange(256) / 255.0
  mean = (pixel_counts * values).sum() / pixel_counts.sum()
  std = np.sqrt((pixel_counts * (values - mean) ** 2).sum() / pixel_counts.sum())
  spec = data_lib.get_spec("fashion_mnist")
  assert abs(mean - spec.mean[0]) < 1e-4
  assert abs(std - spec.std[0]) < 1e-4


@needs_debian_fashion_mnist
def test_fashion_mnist_prepare_rejects_changed_file(tmp_path):
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  for name in fashion_offline.DEBIAN_CONTENT_SHA256:
    os.symlink(os.path.join(DEBIAN_DIR, name), manual_dir / name)
  changed = manual_dir / "t10k-labels-idx1-ubyte.gz"
  changed.unlink()
  write_idx(changed, np.zeros(10_000))
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  with pytest.raises(data_lib.DataError, match=re.escape(f"{changed} has decompressed SHA-256")):
    data_lib.load_split(
      "fashion_mnist", "test", source="tfds", data_dir=str(data_dir), manual_dir=str(manual_dir)
    )
  assert not (data_dir / "fashion_mnist").exists()


@needs_debian_fashion_mnist
def test_load_dataset_ids_and_source_index(fashion_mnist_idx_train):
  config = make_config(
    source="idx",
    manual_dir=DEBIAN_DIR,
    num_train=3000,
    num_test=500,
    reference_size=100,
    noise_kind="pairflip",
    noise_rate=0.2,
    seed=3,
  )
  data = data_lib.load_dataset(config)
  images, labels, _ = fashion_mnist_idx_train
  spec = data_lib.get_spec("fashion_mnist")

  assert data.num_examples == 2900
  np.testing.assert_array_equal(data.true_labels, labels[data.source_index])
  np.testing.assert_array_equal(data.reference_labels, labels[data.reference_source_index])
  assert np.all(data.source_index < 3000)
  assert len(np.intersect1d(data.source_index, data.reference_source_index)) == 0
  np.testing.assert_array_equal(data.is_noisy, data.labels != data.true_labels)
  assert data.noise_rate == round(0.2 * 2900) / 2900
  np.testing.assert_allclose(
    data.images[5], data_lib.normalize_images(images[data.source_index[5]], spec)
  )
  assert data.images.dtype == np.float32
  assert data.test_images.shape == (500, 28, 28, 1)


# load_dataset under tfds.testing.mock_data, so without any files on disk.


@pytest.mark.parametrize("name, shape", [("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_load_dataset_with_mock_tfds(name, shape):
  config = make_config(
    name=name, reference_size=20, num_test=50, noise_kind="symmetric", noise_rate=0.2
  )
  with tfds.testing.mock_data(num_examples=200):
    data = data_lib.load_dataset(config)

  assert data.images.shape == (180, *shape)
  assert data.images.dtype == np.float32
  assert data.labels.dtype == np.int32
  assert data.reference_images.shape == (20, *shape)
  np.testing.assert_array_equal(np.bincount(data.reference_labels, minlength=10), [2] * 10)
  assert data.test_images.shape == (50, *shape)
  np.testing.assert_array_equal(
    np.sort(np.concatenate([data.source_index, data.reference_source_index])), np.arange(200)
  )
  assert data.is_noisy.sum() == 36
  assert data.noise_rate == 36 / 180
  assert data.noise_kind == "symmetric"
  assert data.num_classes == 10
  assert len(data.class_names) == 10


def test_load_dataset_deterministic_from_seed(mnist_dir):
  directory, _ = mnist_dir
  config = make_config(
    name="mnist", source="idx", manual_dir=directory, reference_size=50, noise_kind="uniform",
    noise_rate=0.5,
  )  # fmt: skip
  first, again = data_lib.load_dataset(config), data_lib.load_dataset(config)
  config.seed = 1
  other = data_lib.load_dataset(config)
  np.testing.assert_array_equal(first.labels, again.labels)
  np.testing.assert_array_equal(first.reference_source_index, again.reference_source_index)
  assert not np.array_equal(first.reference_source_index, other.reference_source_index)
  assert not np.array_equal(first.is_noisy, other.is_noisy)


# load_dataset config checks. Each fails before any data is read.


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"name": "imagenet"}, "'imagenet'"),
    ({"source": "http"}, "invalid source 'http'"),
    ({"num_train": -1}, "num_train must be a non-negative integer, got -1"),
    ({"num_test": 2.5}, "num_test must be a non-negative integer, got 2.5"),
    ({"reference_size": 15}, "reference_size=15 is not a multiple of the 10 classes"),
    ({"seed": -3}, "seed must be a non-negative integer, got -3"),
    ({"noise_kind": "gaussian"}, "unknown noise.kind 'gaussian'"),
    ({"noise_kind": "symmetric", "noise_rate": 1.0}, r"noise.rate must be a number in \[0, 1\)"),
    ({"noise_kind": "none", "noise_rate": 0.1}, "noise.rate is 0.1"),
    ({"noise_kind": "pairflip", "noise_rate": 0.5}, "noise.rate=0.5 is invalid for pairflip"),
    ({"data_dir": 7}, "data_dir must be a path string or None, got 7"),
  ],
)
def test_load_dataset_rejects_bad_field(overrides, message):
  with pytest.raises(data_lib.DataError, match=message):
    data_lib.load_dataset(make_config(as_dict=True, **overrides))


def test_load_dataset_rejects_unknown_and_missing_fields():
  config = make_config()
  config.batch_size = 3
  with pytest.raises(data_lib.DataError, match="unknown data config fields batch_size"):
    data_lib.load_dataset(config)
  config = make_config(as_dict=True)
  del config["seed"]
  with pytest.raises(data_lib.DataError, match="missing the fields seed"):
    data_lib.load_dataset(config)


def test_load_dataset_rejects_reference_as_large_as_training(mnist_dir):
  directory, _ = mnist_dir
  config = make_config(name="mnist", source="idx", manual_dir=directory, reference_size=300)
  message = "config.data.reference_size=300 must be less than the 300 training examples"
  with pytest.raises(data_lib.DataError, match=message):
    data_lib.load_dataset(config)


def test_load_dataset_rejects_num_train_beyond_split(mnist_dir):
  directory, _ = mnist_dir
  config = make_config(name="mnist", source="idx", manual_dir=directory, num_train=301)
  message = "config.data.num_train=301 exceeds the 300 examples of the mnist 'train' split"
  with pytest.raises(data_lib.DataError, match=message):
    data_lib.load_dataset(config)


def test_load_dataset_names_missing_manual_dir(tmp_path):
  missing = str(tmp_path / "absent")
  config = make_config(name="mnist", source="idx", manual_dir=missing)
  message = f"config.data.manual_dir directory not found: {missing}"
  with pytest.raises(data_lib.DataError, match=re.escape(message)):
    data_lib.load_dataset(config)


# check_config: the checks that need no data, which sweeps run before any training.


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"noise_kind": "pairflip", "noise_rate": 0.6},
      "invalid config.data: noise.rate=0.6 is invalid for pairflip noise; expected a value "
      "below 0.5",
    ),
    (
      {"num_train": 100, "reference_size": 100},
      "config.data.reference_size=100 must be less than the 100 training examples it is held "
      "out of; set it below 100",
    ),
    (
      {"name": "imagenet2012", "source": "idx"},
      "invalid config.data: source='idx' is invalid for imagenet2012",
    ),
  ],
)
def test_check_config_rejects_without_data(tmp_path, overrides, message):
  # data_dir does not exist, so a check that read data would fail with another message.
  config = make_config(data_dir=str(tmp_path / "absent"), **overrides)
  with pytest.raises(data_lib.DataError, match=re.escape(message)):
    data_lib.check_config(config)


def test_check_config_accepts_sizes_that_fit(tmp_path):
  config = make_config(data_dir=str(tmp_path / "absent"), num_train=101, reference_size=100)
  data_lib.check_config(config)


# Split records.


def test_split_record_round_trip(mnist_dir, tmp_path):
  directory, _ = mnist_dir
  config = make_config(
    name="mnist", source="idx", manual_dir=directory, reference_size=20, noise_kind="symmetric",
    noise_rate=0.3,
  )  # fmt: skip
  data = data_lib.load_dataset(config)
  path = tmp_path / "split_record"  # no suffix: numpy must not append .npz
  data_lib.save_split_record(data, path)
  record = data_lib.load_split_record(path)

  assert record.dataset == "mnist"
  assert record.num_classes == 10
  assert record.noise_kind == "symmetric"
  assert record.noise_rate == data.noise_rate
  for field in ("is_noisy", "true_labels", "labels", "source_index", "reference_labels"):
    np.testing.assert_array_equal(getattr(record, field), getattr(data, field))
  np.testing.assert_array_equal(record.reference_source_index, data.reference_source_index)


def test_split_record_rejects_bad_files(tmp_path):
  missing = tmp_path / "absent.npz"
  with pytest.raises(data_lib.DataError, match=re.escape(f"split record not found: {missing}")):
    data_lib.load_split_record(missing)
  partial = tmp_path / "partial.npz"
  np.savez(partial, is_noisy=np.zeros(3, bool))
  with pytest.raises(data_lib.DataError, match="missing true_labels"):
    data_lib.load_split_record(partial)
  text = tmp_path / "text.npz"
  text.write_text("not an archive")
  with pytest.raises(data_lib.DataError, match=re.escape(f"{text} is not a valid split record")):
    data_lib.load_split_record(text)


def test_training_data_rejects_length_mismatch():
  empty = np.zeros((0,))
  with pytest.raises(data_lib.DataError, match="training arrays differ in length"):
    data_lib.TrainingData(
      name="mnist", images=np.zeros((3, 28, 28, 1)), labels=np.zeros(2), true_labels=np.zeros(3),
      is_noisy=np.zeros(3, bool), source_index=np.arange(3), reference_images=empty,
      reference_labels=empty, reference_source_index=empty, test_images=empty, test_labels=empty,
      num_classes=10, class_names=(), noise_kind="none", noise_rate=0.0,
    )  # fmt: skip


def test_prepared_tfds_ignores_missing_manual_dir(fashion_mnist_data_dir, tmp_path):
  _, labels, _ = data_lib.load_split(
    "fashion_mnist", "test", source="tfds", data_dir=fashion_mnist_data_dir,
    manual_dir=str(tmp_path / "absent"), max_examples=5,
  )  # fmt: skip
  assert labels.shape == (5,)


def test_tfds_slice_beyond_split_raises(fashion_mnist_data_dir):
  message = "config.data.num_train=70000 exceeds the examples of the fashion_mnist 'train' split"
  with pytest.raises(data_lib.DataError, match=message):
    data_lib.load_split(
      "fashion_mnist", "train", source="tfds", data_dir=fashion_mnist_data_dir,
      manual_dir=None, max_examples=70000,
    )  # fmt: skip


def test_mnist_from_fashion_files_raises():
  with pytest.raises(data_lib.DataError, match="contains the Fashion-MNIST files, not mnist"):
    data_lib.load_split("mnist", "train", source="idx", data_dir=None, manual_dir=DEBIAN_DIR)
