"""Readers for the raw dataset files: IDX (MNIST family) and CIFAR python pickles.

Both readers return the examples in the order of the split that tfds prepares
from the same files, so `source_index` means the same for either source.
"""

import gzip
import hashlib
import os
import pickle

import numpy as np

from ddlr.data import catalog
from ddlr.data.errors import DataError

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE_TYPE = 0x08
_CIFAR_PIXELS = 32 * 32 * 3


def tfds_order(split: str, num_examples: int) -> np.ndarray:
  """Return the permutation that puts raw-file examples into tfds order.

  tfds 4.9 writes a split sorted by the 128-bit MD5 of the split name
  followed by the example key (`tensorflow_datasets.core.hashing`). The
  MNIST-family and CIFAR builders use the example's position in the raw
  files, as a decimal string, for the key. tfds changes this hash only with
  a major dataset version (tensorflow_datasets/core/hashing.py).

  NOTE: this order is tested against a prepared tfds split for fashion_mnist
  only. For CIFAR it follows the keys in tfds 4.9.10's cifar.py, but no
  prepared CIFAR split was available to compare with.

  Returns:
    int64 array `order` such that `raw[order]` is the tfds split.
  """
  salted = hashlib.md5(split.encode("utf-8"))

  def key_hash(position: int) -> int:
    digest = salted.copy()
    digest.update(str(position).encode("utf-8"))
    return int(digest.hexdigest(), 16)

  return np.array(sorted(range(num_examples), key=key_hash), dtype=np.int64)


def read_idx_split(name: str, split: str, manual_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Read an MNIST-family split from IDX files in `manual_dir`.

  Looks for `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, uncompressed or
  with `.gz`. The uncompressed file is used when both exist.

  Returns:
    uint8 images `[n, 28, 28, 1]` and int32 labels `[n]`, in raw-file order.
  """
  prefix = _IDX_PREFIX[split]
  images_path = _find_idx_file(manual_dir, f"{prefix}-images-idx3-ubyte")
  labels_path = _find_idx_file(manual_dir, f"{prefix}-labels-idx1-ubyte")
  images = _read_idx_array(images_path, expected_ndim=3)
  labels = _read_idx_array(labels_path, expected_ndim=1)

  spec = catalog.get_spec(name)
  if images.shape[1:] != spec.image_shape[:2]:
    raise DataError(
      f"{images_path}: images have shape {images.shape[1:]}, expected "
      f"{spec.image_shape[:2]} for {name}"
    )
  if len(images) != len(labels):
    raise DataError(
      f"{images_path} has {len(images)} images but {labels_path} has "
      f"{len(labels)} labels; expected the same count"
    )
  _check_label_range(labels, spec.num_classes, labels_path)
  return images[..., np.newaxis], labels.astype(np.int32)


def _find_idx_file(manual_dir: str, basename: str) -> str:
  for candidate in (basename, basename + ".gz"):
    path = os.path.join(manual_dir, candidate)
    if os.path.isfile(path):
      return path
  raise DataError(f"IDX file not found: expected {basename} or {basename}.gz in {manual_dir}")


def _read_idx_array(path: str, expected_ndim: int) -> np.ndarray:
  """Parse an IDX file of unsigned bytes and check its header."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as stream:
      content = stream.read()
  except (OSError, EOFError) as error:
    raise DataError(f"failed to read IDX file {path}: {error}") from error

  # The header is two zero bytes, a type code, the number of dimensions and
  # then one big-endian uint32 size per dimension.
  header_size = 4 + 4 * expected_ndim
  if len(content) < header_size:
    raise DataError(f"{path} is too short to be an IDX file")
  if content[0:2] != b"\x00\x00" or content[2] != _IDX_UBYTE_TYPE:
    raise DataError(
      f"{path} has magic number 0x{content[0:4].hex()}, expected an IDX file of "
      f"unsigned bytes (0x000008{expected_ndim:02x})"
    )
  if content[3] != expected_ndim:
    raise DataError(f"{path} has {content[3]} dimensions, expected {expected_ndim}")
  shape = tuple(
    int.from_bytes(content[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(expected_ndim)
  )
  payload = memoryview(content)[header_size:]
  if len(payload) != int(np.prod(shape)):
    raise DataError(
      f"{path} contains {len(payload)} data bytes, expected {int(np.prod(shape))} for shape {shape}"
    )
  return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def _check_label_range(labels: np.ndarray, num_classes: int, path: str) -> None:
  if labels.size and int(labels.max()) >= num_classes:
    raise DataError(
      f"{path} contains label {int(labels.max())}, expected labels in [0, {num_classes})"
    )


_CIFAR_LAYOUT = {
  # name: (folder, train files, test files, label key, metadata file, names key)
  "cifar10": (
    "cifar-10-batches-py",
    tuple(f"data_batch_{number}" for number in range(1, 6)),
    ("test_batch",),
    b"labels",
    "batches.meta",
    b"label_names",
  ),
  "cifar100": (
    "cifar-100-python",
    ("train",),
    ("test",),
    b"fine_labels",
    "meta",
    b"fine_label_names",
  ),
}
IDX_DATASETS = ("mnist", "fashion_mnist")
# The datasets that `source='idx'` reads, with `read_idx_split` or `read_cifar_split`.
RAW_FILE_DATASETS = (*IDX_DATASETS, *_CIFAR_LAYOUT)


def read_cifar_split(
  name: str, split: str, manual_dir: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Read a CIFAR split from the extracted python archive in `manual_dir`.

  Expects `cifar-10-batches-py/` or `cifar-100-python/` as extracted from
  the official `cifar-10-python.tar.gz` or `cifar-100-python.tar.gz`. For
  CIFAR-100 the labels are the 100 fine labels.

  Returns:
    uint8 images `[n, 32, 32, 3]`, int32 labels `[n]` in raw-file order,
    and the class names.
  """
  folder, train_files, test_files, label_key, meta_file, names_key = _CIFAR_LAYOUT[name]
  root = os.path.join(manual_dir, folder)
  if not os.path.isdir(root):
    raise DataError(f"CIFAR folder not found: expected {root}")

  meta = _load_cifar_pickle(os.path.join(root, meta_file), (names_key,))
  class_names = [
    label.decode("utf-8") if isinstance(label, bytes) else str(label) for label in meta[names_key]
  ]
  num_classes = catalog.get_spec(name).num_classes
  if len(class_names) != num_classes:
    raise DataError(
      f"{os.path.join(root, meta_file)} lists {len(class_names)} class names, "
      f"expected {num_classes}"
    )

  images, labels = [], []
  for filename in train_files if split == "train" else test_files:
    path = os.path.join(root, filename)
    batch = _load_cifar_pickle(path, (b"data", label_key))
    data = np.asarray(batch[b"data"])
    batch_labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
      raise DataError(
        f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 [n, {_CIFAR_PIXELS}]"
      )
    if len(batch_labels) != len(data):
      raise DataError(f"{path} has {len(data)} images but {len(batch_labels)} labels")
    _check_label_range(batch_labels, num_classes, path)
    # Each row stores the red, green and blue planes one after another.
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(batch_labels.astype(np.int32))
  return np.concatenate(images), np.concatenate(labels), class_names


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that can build numpy arrays but no other objects.

  Unpickling can run arbitrary code, and a CIFAR batch needs nothing beyond
  dicts, lists, bytes and numpy arrays.
  """

  _ALLOWED = {
    # Python 3 pickles bytes through _codecs.encode under protocol 2.
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
  }

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")
    return super().find_class(module, name)


def _load_cifar_pickle(path: str, required_keys: tuple[bytes, ...]) -> dict:
  """Load one CIFAR pickle and check that it is a dict with `required_keys`."""
  if not os.path.isfile(path):
    raise DataError(f"CIFAR file not found: {path}")
  try:
    with open(path, "rb") as stream:
      # The official archives were pickled by Python 2, so their strings load as bytes.
      content = _NumpyOnlyUnpickler(stream, encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
    raise DataError(f"{path} is not a valid CIFAR python pickle: {error}") from error
  if not isinstance(content, dict):
    raise DataError(f"{path} contains a {type(content).__name__}, expected a dict")
  missing = [key.decode() for key in required_keys if key not in content]
  if missing:
    raise DataError(f"{path} is missing the keys {missing}")
  return content
