"""The split record of a run: which instances are corrupt and which are held out.

Analysis uses it to score the learned per-instance rates against the
corruption mask after training.
"""

import dataclasses
import os
import zipfile

import numpy as np

from ddlr.data.dataset import TrainingData
from ddlr.data.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class SplitRecord:
  """Labels and indices of a run's training and reference examples.

  Index k of the training arrays is instance id k. Source indices point into
  the tfds train split of `dataset`.
  """

  dataset: str
  num_classes: int
  noise_kind: str
  noise_rate: float  # realized fraction of corrupted training labels
  is_noisy: np.ndarray
  true_labels: np.ndarray
  labels: np.ndarray  # observed, possibly noisy
  source_index: np.ndarray
  reference_source_index: np.ndarray
  reference_labels: np.ndarray
  # Target distribution of personalisation and the training and test
  # examples that come from it (all False without a target).
  target_kind: str = "none"
  is_target_domain: np.ndarray | None = None  # bool [N]
  test_is_target: np.ndarray | None = None  # bool [T]


_ARRAY_FIELDS = (
  "is_noisy",
  "true_labels",
  "labels",
  "source_index",
  "reference_source_index",
  "reference_labels",
)
_SCALAR_FIELDS = (
  "dataset",
  "num_classes",
  "noise_kind",
  "noise_rate",
)
# Written since personalisation targets exist. Records written before lack
# all three and load with target_kind 'none', an all-False training mask and
# test_is_target None, because they do not store the test set's size.
_TARGET_FIELDS = ("target_kind", "is_target_domain", "test_is_target")


def save_split_record(data: TrainingData, path: str | os.PathLike) -> None:
  """Write the noise mask, labels and source indices of `data` to an .npz file.

  The file is written at exactly `path`, because numpy appends no `.npz` to an open file.
  """
  arrays = {field: getattr(data, field) for field in _ARRAY_FIELDS}
  arrays["dataset"] = np.array(data.name)
  arrays["num_classes"] = np.array(data.num_classes)
  arrays["noise_kind"] = np.array(data.noise_kind)
  arrays["noise_rate"] = np.array(data.noise_rate)
  arrays["target_kind"] = np.array(data.target_kind)
  arrays["is_target_domain"] = data.is_target_domain
  arrays["test_is_target"] = data.test_is_target
  with open(path, "wb") as stream:
    np.savez(stream, **arrays)


def load_split_record(path: str | os.PathLike) -> SplitRecord:
  """Read a file written by `save_split_record`.

  Returns:
    The SplitRecord.

  Raises:
    DataError: the file is missing, is not an .npz archive or lacks a field.
  """
  if not os.path.isfile(path):
    raise DataError(f"split record not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as archive:
      contents = {field: archive[field] for field in archive.files}
  except (OSError, ValueError, zipfile.BadZipFile) as error:
    raise DataError(f"{path} is not a valid split record: {error}") from error
  missing = [field for field in _ARRAY_FIELDS + _SCALAR_FIELDS if field not in contents]
  if missing:
    raise DataError(f"split record {path} is missing {', '.join(missing)}")

  present = [field for field in _TARGET_FIELDS if field in contents]
  if present and len(present) < len(_TARGET_FIELDS):
    missing = [field for field in _TARGET_FIELDS if field not in contents]
    raise DataError(f"split record {path} is missing {', '.join(missing)}")
  if present:
    target = {
      "target_kind": str(contents["target_kind"]),
      "is_target_domain": contents["is_target_domain"],
      "test_is_target": contents["test_is_target"],
    }
  else:
    target = {"is_target_domain": np.zeros(len(contents["labels"]), bool)}
  return SplitRecord(
    dataset=str(contents["dataset"]),
    num_classes=int(contents["num_classes"]),
    noise_kind=str(contents["noise_kind"]),
    noise_rate=float(contents["noise_rate"]),
    **{field: contents[field] for field in _ARRAY_FIELDS},
    **target,
  )
