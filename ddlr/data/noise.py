"""Synthetic label noise, named by its transition matrix."""

import numpy as np

from ddlr.data import checks
from ddlr.data.errors import DataError

NOISE_KINDS = ("none", "symmetric", "uniform", "pairflip")

# Mixed into the seed so that noise and the reference hold-out draw from
# independent streams even when they share one seed.
_NOISE_STREAM = 1


def corrupt_labels(
  labels: np.ndarray, *, kind: str, rate: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Corrupt a fraction of the labels, deterministically from `seed`.

  Exactly `round(rate * n)` examples (Python rounding, half to even),
  chosen uniformly without replacement, get a new label according to `kind`:

  - `symmetric`: a different class, uniformly. Every selected label flips,
    so the realized noise rate is `round(rate * n) / n`.
  - `uniform`: a class drawn uniformly from all `num_classes` classes, which
    may be the true one. The realized rate is about `rate * (C - 1) / C`.
  - `pairflip`: class `c` becomes `(c + 1) mod C`. Every selected label
    flips.
  - `none`: no noise. `rate` must be 0.

  Args:
    labels: true labels, integers in `[0, num_classes)`, shape `[n]`.
    kind: one of `NOISE_KINDS`.
    rate: fraction of examples to select, in `[0, 1)`, and below 0.5 for
      `pairflip`.
    num_classes: number of classes C, at least 2.
    seed: non-negative integer seed.

  Returns:
    `(noisy_labels, is_noisy)`: int32 observed labels and a bool mask that
    is true exactly where the observed label differs from the true one.
  """
  labels = checks.check_labels(labels, num_classes)
  check_noise_config(kind, rate)
  checks.check_count("seed", seed)

  noisy = labels.copy()
  if kind != "none":
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    count = round(rate * len(labels))
    selected = rng.choice(len(labels), size=count, replace=False)
    true = labels[selected]
    if kind == "symmetric":
      # An offset in [1, C) never maps a class to itself.
      offset = rng.integers(1, num_classes, size=count)
      noisy[selected] = (true + offset) % num_classes
    elif kind == "uniform":
      noisy[selected] = rng.integers(0, num_classes, size=count)
    else:
      noisy[selected] = (true + 1) % num_classes
  return noisy, noisy != labels


def check_noise_config(kind, rate) -> None:
  """Raise DataError unless `kind` and `rate` are valid values of `config.data.noise`.

  The message names the fields relative to the data section (`noise.rate`).
  """
  if kind not in NOISE_KINDS:
    raise DataError(f"unknown noise.kind {kind!r}. Expected one of {', '.join(NOISE_KINDS)}")
  if not checks.is_real(rate) or not 0.0 <= rate < 1.0:
    raise DataError(f"noise.rate must be a number in [0, 1), got {rate!r}")
  if kind == "pairflip" and rate >= 0.5:
    raise DataError(
      f"noise.rate={rate!r} is invalid for pairflip noise; expected a value below 0.5, since "
      "from 0.5 on the flipped class c + 1 is at least as frequent as the true class c"
    )
  if kind == "none" and rate != 0.0:
    raise DataError(
      f"noise.kind is 'none' but noise.rate is {rate!r}. Set noise.rate to 0 or choose a noise kind"
    )
