"""Argument checks shared by the data modules. Each raises DataError."""

import math
import numbers

import numpy as np

from ddlr.data.errors import DataError


def is_integer(value) -> bool:
  """Return whether `value` is an integer, excluding bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
  """Return whether `value` is a finite real number, excluding bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_count(field: str, value) -> int:
  """Return `value` as int, or raise DataError unless it is an integer >= 0."""
  if not is_integer(value) or value < 0:
    raise DataError(f"{field} must be a non-negative integer, got {value!r}")
  return int(value)


def check_labels(labels, num_classes) -> np.ndarray:
  """Return `labels` as int32 after checking they are 1-D in `[0, num_classes)`."""
  if not is_integer(num_classes) or num_classes < 2:
    raise DataError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
      f"labels must be in [0, {num_classes}), got values from {labels.min()} to {labels.max()}"
    )
  return labels.astype(np.int32)
