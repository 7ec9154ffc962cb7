"""Target distributions for personalisation: the target sample and the domain masks.

A run personalises a model toward a target distribution that it sees only
through a small sample. The sample is drawn from the reference pool, the
examples that `hold_out_reference` keeps out of training, so it is never
trained on, and it becomes the run's reference split. Training is the same
for every target setting of one data config (see `load_dataset`).

Two settings:

- `classes` (class-prior shift): the target distribution is the examples
  whose true label is in `classes`. The target sample is drawn from the
  pool's examples of those classes, the target test set is the test
  examples of those classes, and predictions stay 10-way (over all classes).
- `transform` (covariate shift): a fixed image transformation marks the
  target domain. `round(fraction * N)` training images, chosen by the seed,
  carry it, and so do `round(fraction * T)` of the T test images, which form
  the target test set. The target sample is drawn from the whole pool and
  transformed.
"""

import ml_collections
import numpy as np

from ddlr.data import checks
from ddlr.data.errors import DataError

TARGET_KINDS = ("none", "classes", "transform")
TRANSFORMS = ("none", "rot90", "invert")
# Training sets: every training instance, or the target sample alone, which
# then is both the training set and the reference split.
TRAIN_ON = ("all", "target_sample")

# Mixed into the seed, like splits._REFERENCE_STREAM, so every draw is independent.
_SAMPLE_STREAM = 3
_TRAIN_DOMAIN_STREAM = 4
_TEST_DOMAIN_STREAM = 5


def default_config() -> ml_collections.ConfigDict:
  """Return the target config that keeps a run without a target distribution.

  Fields:
    kind: one of `TARGET_KINDS`; `'none'` keeps the whole reference pool
      as the reference split.
    classes: for `kind='classes'`, the target classes, e.g. `(5, 7, 9)`.
    transform: for `kind='transform'`, one of `TRANSFORMS` other than `'none'`.
    fraction: for `kind='transform'`, the fraction of training and of test
      images that carry the transformation, in (0, 1).
    sample_size: size of the target sample drawn from the reference pool,
      0 for every pool example of the target distribution.
    train_on: one of `TRAIN_ON`.
  """
  config = ml_collections.ConfigDict()
  config.kind = "none"
  config.classes = ()
  config.transform = "none"
  config.fraction = 0.0
  config.sample_size = 0
  config.train_on = "all"
  return config


FIELDS = frozenset(default_config().keys())


def check_config(target, num_classes: int) -> None:
  """Raise DataError naming the first invalid field of the `data.target` section."""
  for field in ("kind", "transform", "train_on"):
    if not isinstance(target[field], str):
      raise DataError(f"target.{field} must be a string, got {target[field]!r}")
  for field, choices in (("kind", TARGET_KINDS), ("transform", TRANSFORMS), ("train_on", TRAIN_ON)):
    if target[field] not in choices:
      raise DataError(
        f"unknown target.{field} {target[field]!r}. Expected one of {', '.join(choices)}"
      )
  checks.check_count("target.sample_size", target["sample_size"])
  fraction = target["fraction"]
  if not checks.is_real(fraction) or not 0.0 <= fraction < 1.0:
    raise DataError(f"target.fraction must be a number in [0, 1), got {fraction!r}")
  classes = target["classes"]
  if not isinstance(classes, (tuple, list)) or not all(checks.is_integer(c) for c in classes):
    raise DataError(f"target.classes must be a tuple of integers, got {classes!r}")

  kind = target["kind"]
  if kind == "none":
    settings = {
      "classes": (tuple(classes), ()),
      "transform": (target["transform"], "none"),
      "fraction": (fraction, 0.0),
      "sample_size": (target["sample_size"], 0),
      "train_on": (target["train_on"], "all"),
    }
    for field, (value, unset) in settings.items():
      if value != unset:
        raise DataError(
          f"target.{field}={value!r} needs a target distribution, but target.kind is 'none'. "
          f"Set target.kind, or set target.{field} to {unset!r}"
        )
    return
  if kind == "classes":
    _check_classes(classes, num_classes)
    if target["transform"] != "none" or fraction != 0.0:
      raise DataError(
        "target.kind 'classes' takes no transform or fraction; set target.transform='none' "
        f"and target.fraction=0.0, got {target['transform']!r} and {fraction!r}"
      )
    return
  if target["transform"] == "none":
    raise DataError(
      f"target.kind 'transform' needs target.transform, one of {', '.join(TRANSFORMS[1:])}"
    )
  if fraction == 0.0:
    raise DataError("target.kind 'transform' needs target.fraction in (0, 1), got 0.0")
  if len(classes):
    raise DataError(f"target.kind 'transform' takes no target.classes, got {tuple(classes)!r}")


def _check_classes(classes, num_classes: int) -> None:
  if not len(classes):
    raise DataError("target.kind 'classes' needs target.classes, e.g. (5, 7, 9)")
  if len(set(classes)) != len(classes):
    raise DataError(f"target.classes must be distinct, got {tuple(classes)!r}")
  if min(classes) < 0 or max(classes) >= num_classes:
    raise DataError(f"target.classes must be in [0, {num_classes}), got {tuple(classes)!r}")
  if len(classes) == num_classes:
    raise DataError(
      f"target.classes {tuple(classes)!r} lists every class, so there is no class-prior "
      "shift and no rest of the test set; leave out at least one class"
    )


def apply_transform(images: np.ndarray, transform: str) -> np.ndarray:
  """Apply a fixed transformation to uint8 images [n, H, W, C].

  `rot90` rotates by 90 degrees counter-clockwise in the (H, W) plane and
  needs square images; `invert` maps each pixel value v to 255 - v.

  Returns:
    A new uint8 array of the same shape.
  """
  if transform == "rot90":
    if images.shape[1] != images.shape[2]:
      raise DataError(f"transform 'rot90' needs square images, got shape {images.shape[1:3]}")
    return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))
  if transform == "invert":
    return (255 - images.astype(np.int16)).astype(np.uint8)
  raise DataError(f"unknown transform {transform!r}. Expected one of {', '.join(TRANSFORMS[1:])}")


def sample_target(pool_labels: np.ndarray, target, seed: int) -> np.ndarray:
  """Draw the target sample from the reference pool.

  Args:
    pool_labels: true labels of the pool, shape `[P]`.
    target: the `data.target` section, already checked.
    seed: the data seed.

  Returns:
    Sorted int64 positions into the pool: the pool's examples of the target
    classes (`classes`) or the whole pool (`transform`), or a uniform draw of
    `sample_size` of them without replacement.

  Raises:
    DataError: the pool has fewer candidates than `sample_size`.
  """
  if target["kind"] == "classes":
    candidates = np.flatnonzero(np.isin(pool_labels, np.asarray(target["classes"])))
  else:
    candidates = np.arange(len(pool_labels))
  size = int(target["sample_size"])
  if size == 0:
    return candidates.astype(np.int64)
  check_sample_size(target, len(candidates), len(pool_labels))
  rng = np.random.default_rng([seed, _SAMPLE_STREAM])
  return np.sort(rng.choice(candidates, size=size, replace=False)).astype(np.int64)


def check_sample_size(target, num_candidates: int, pool_size: int) -> None:
  """Raise DataError if `target.sample_size` exceeds the target's examples in the reference pool.

  Args:
    target: the `data.target` section, already checked.
    num_candidates: the pool's examples of the target classes (`classes`),
      or the whole pool (`transform`).
    pool_size: the size of the reference pool.
  """
  size = target["sample_size"]
  if size <= num_candidates:
    return
  description = "examples"
  if target["kind"] == "classes":
    description = f"examples of the target classes {tuple(target['classes'])}"
  raise DataError(
    f"config.data.target.sample_size={size} exceeds the {num_candidates} {description} in the "
    f"reference pool of {pool_size}; raise config.data.reference_size or lower "
    "config.data.target.sample_size"
  )


def domain_size(count: int, fraction: float) -> int:
  """Return how many of `count` images a `transform` target marks: `round(fraction * count)`.

  Python's `round` rounds half to even.
  """
  return int(round(fraction * count))


def choose_fraction(count: int, fraction: float, seed: int, stream: int) -> np.ndarray:
  """Return a bool mask [count] with `domain_size(count, fraction)` True entries, drawn by seed."""
  mask = np.zeros(count, dtype=bool)
  chosen = np.random.default_rng([seed, stream]).choice(
    count, size=domain_size(count, fraction), replace=False
  )
  mask[chosen] = True
  return mask


def domain_masks(train_labels, test_labels, target, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Return bool masks of the training and test examples from the target distribution.

  For `classes`, an example belongs to the target distribution when its true
  label is a target class; for `transform`, when it carries the
  transformation (a seeded draw of `fraction` of each split); for `none`,
  never.
  """
  kind = target["kind"]
  if kind == "classes":
    classes = np.asarray(target["classes"])
    return np.isin(train_labels, classes), np.isin(test_labels, classes)
  if kind == "transform":
    fraction = float(target["fraction"])
    return (
      choose_fraction(len(train_labels), fraction, seed, _TRAIN_DOMAIN_STREAM),
      choose_fraction(len(test_labels), fraction, seed, _TEST_DOMAIN_STREAM),
    )
  return np.zeros(len(train_labels), bool), np.zeros(len(test_labels), bool)


def check_domain_masks(target, is_target_domain: np.ndarray, test_is_target: np.ndarray) -> None:
  """Raise DataError unless the target and the rest both have examples in training and test.

  An empty part of the test set has no accuracy, so the first evaluation
  would fail. An empty part of the training set leaves no instance of the
  target (or of the rest) for the rates to favour, and no target-domain
  AUROC. A run that trains on the target sample alone is checked on the
  test set only.
  """
  if target["kind"] == "none":
    return
  check_domain_split(target, "test", len(test_is_target), int(np.sum(test_is_target)))
  if target["train_on"] == "all":
    check_domain_split(target, "training", len(is_target_domain), int(np.sum(is_target_domain)))


def check_domain_split(target, split: str, count: int, num_target: int) -> None:
  """Raise DataError if `num_target` of the `count` examples of a split is 0 or all of them.

  Args:
    target: the `data.target` section, already checked, of kind `classes`
      or `transform`.
    split: 'training' or 'test'.
    count: the examples of the split; for training, after the reference
      pool is held out.
    num_target: how many of them are from the target distribution.
  """
  if 0 < num_target < count:
    return
  size_field = "config.data.num_test" if split == "test" else "config.data.num_train"
  if count == 0:
    raise DataError(f"the {split} set is empty, so it has no target examples; check {size_field}")
  empty_part = f"the target {split} set" if num_target == 0 else f"the rest of the {split} set"
  if target["kind"] == "transform":
    fraction = target["fraction"]
    fix = f"use more {split} images ({size_field})"
    if count > 1 and num_target == 0:
      fix = f"set it to at least 1/{count} = {1 / count:.6g}, or {fix}"
    elif count > 1:
      fix = f"set it to at most {count - 1}/{count} = {(count - 1) / count:.6g}, or {fix}"
    raise DataError(
      f"config.data.target.fraction={fraction!r} marks round({fraction!r} * {count}) = "
      f"{num_target} of the {count} {split} images, so {empty_part} is empty; {fix}"
    )
  classes = tuple(target["classes"])
  if num_target == 0:
    matches = f"none of the {count} {split} examples is"
  else:
    matches = f"all {count} {split} examples are"
  raise DataError(
    f"{matches} of config.data.target.classes={classes}, so {empty_part} is empty; use more "
    f"{split} examples ({size_field}) or other target classes"
  )


def transform_masked(images: np.ndarray, mask: np.ndarray, transform: str) -> np.ndarray:
  """Return a copy of uint8 `images` in which the rows where `mask` is True are transformed."""
  images = images.copy()
  if mask.any():
    images[mask] = apply_transform(images[mask], transform)
  return images
