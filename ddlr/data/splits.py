"""Class-balanced reference split held out of the training examples."""

import numpy as np

from ddlr.data import checks
from ddlr.data.errors import DataError

# Mixed into the seed, like noise._NOISE_STREAM, so the two draws are independent.
_REFERENCE_STREAM = 2


def hold_out_reference(
  labels: np.ndarray, size: int, seed: int, *, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Split example indices into training and a class-balanced reference set.

  The reference set holds `size / num_classes` examples of every class,
  drawn uniformly without replacement, deterministically from `seed`.
  Every other index stays in training.

  Args:
    labels: true labels, shape `[n]`.
    size: reference set size, 0 for none. Must be a multiple of
      `num_classes` and less than n.
    seed: non-negative integer seed.
    num_classes: number of classes. None means `labels.max() + 1`.

  Returns:
    `(train_index, reference_index)`, sorted int64 index arrays into
    `labels` that are disjoint and together cover `[0, n)`.

  Raises:
    DataError: `size` is not a multiple of the class count, a class has
      too few examples, or nothing would be left for training.
  """
  if num_classes is None:
    if len(labels) == 0:
      raise DataError("labels is empty, so num_classes must be given")
    num_classes = int(np.max(labels)) + 1
  labels = checks.check_labels(labels, num_classes)
  checks.check_count("seed", seed)
  size = checks.check_count("reference size", size)
  if size > 0 and size >= len(labels):
    raise DataError(
      f"reference size {size} must be less than the {len(labels)} "
      "training examples it is taken from"
    )
  if size % num_classes:
    raise DataError(
      f"reference size {size} is not a multiple of the {num_classes} classes, "
      "so the reference set cannot be class-balanced"
    )

  per_class = size // num_classes
  rng = np.random.default_rng([seed, _REFERENCE_STREAM])
  chosen = []
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    if len(members) < per_class:
      raise DataError(
        f"class {label} has {len(members)} examples, fewer than the "
        f"{per_class} per class that reference size {size} needs"
      )
    chosen.append(rng.choice(members, size=per_class, replace=False))

  reference_index = np.sort(np.concatenate(chosen)).astype(np.int64)
  is_reference = np.zeros(len(labels), dtype=bool)
  is_reference[reference_index] = True
  train_index = np.flatnonzero(~is_reference).astype(np.int64)
  return train_index, reference_index
