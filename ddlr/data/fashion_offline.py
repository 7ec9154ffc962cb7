"""Offline tfds preparation of Fashion-MNIST from Debian's dataset-fashion-mnist.

Debian recompresses the upstream files, so their gzip bytes, and the SHA-256
checksums that tfds registers for them, differ from upstream. This module
checks the decompressed content against known digests instead, and then lets
tfds prepare the dataset from these files as if they had been downloaded.
"""

import gzip
import hashlib
import os
import tempfile

import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums
from tensorflow_datasets.image_classification import mnist

from ddlr.data.errors import DataError

# SHA-256 of the decompressed files of Debian package dataset-fashion-mnist,
# version 0.0~git20200523.55506a9-1 (`zcat FILE | sha256sum`).
DEBIAN_CONTENT_SHA256 = {
  "train-images-idx3-ubyte.gz": (
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
  ),
  "train-labels-idx1-ubyte.gz": (
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
  ),
  "t10k-images-idx3-ubyte.gz": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
  "t10k-labels-idx1-ubyte.gz": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def verify_debian_files(manual_dir: str) -> dict[str, str]:
  """Check the four Fashion-MNIST files in `manual_dir` by decompressed SHA-256.

  Returns:
    Mapping from file name to its path.

  Raises:
    DataError: a file is missing, is not gzip, or has unexpected content.
  """
  paths = {}
  for filename, expected in DEBIAN_CONTENT_SHA256.items():
    path = os.path.join(manual_dir, filename)
    if not os.path.isfile(path):
      raise DataError(
        f"Fashion-MNIST file not found: {path}. manual_dir must contain "
        f"{', '.join(DEBIAN_CONTENT_SHA256)} (for example "
        f"{DEBIAN_FASHION_MNIST_DIR} from Debian's dataset-fashion-mnist)"
      )
    actual = _decompressed_sha256(path)
    if actual != expected:
      raise DataError(
        f"{path} has decompressed SHA-256 {actual}, expected {expected} "
        "(Debian dataset-fashion-mnist 0.0~git20200523.55506a9-1)"
      )
    paths[filename] = path
  return paths


def _decompressed_sha256(path: str) -> str:
  digest = hashlib.sha256()
  try:
    with gzip.open(path, "rb") as stream:
      while block := stream.read(1 << 20):
        digest.update(block)
  except (OSError, EOFError) as error:
    raise DataError(f"failed to decompress {path}: {error}") from error
  return digest.hexdigest()


def prepare_fashion_mnist(data_dir: str | None, manual_dir: str) -> None:
  """Prepare tfds `fashion_mnist` in `data_dir` from local files, offline.

  The files are first verified with `verify_debian_files`. tfds then reads
  them from `manual_dir` in place of a download, checking each against the
  gzip size and SHA-256 just computed from it. The result is the standard
  `fashion_mnist` dataset that `tfds.builder('fashion_mnist',
  data_dir=data_dir)` loads. `data_dir=None` means the tfds default.
  """
  paths = verify_debian_files(manual_dir)
  local_url_infos = {
    mnist.FashionMNIST.URL + filename: checksums.compute_url_info(path)
    for filename, path in paths.items()
  }

  class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
    """tfds FashionMNIST that expects the checksums of the local files."""

    # Same name, so the data lands where the registered builder looks.
    name = "fashion_mnist"
    # Replaces the class property that reads tfds' registered checksums.
    url_infos = local_url_infos

  builder = LocalFashionMNIST(data_dir=data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  # tfds decompresses the files into the download directory. A temporary
  # one keeps that copy out of data_dir.
  with tempfile.TemporaryDirectory(prefix="ddlr-fashion-mnist-") as download_dir:
    builder.download_and_prepare(download_dir=download_dir, download_config=download_config)


def holds_fashion_mnist(directory: str) -> bool:
  """Returns whether `directory` has the Debian Fashion-MNIST training labels file.

  The IDX format of MNIST and Fashion-MNIST is the same, so only the content
  distinguishes them. Hashing the 60 KB labels file is enough.
  """
  filename = "train-labels-idx1-ubyte.gz"
  path = os.path.join(directory, filename)
  return os.path.isfile(path) and _decompressed_sha256(path) == DEBIAN_CONTENT_SHA256[filename]
