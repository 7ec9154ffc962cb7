"""Scores and plots of learned per-instance rates against known corruption."""

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # Runs write PNG files; no display is needed or assumed.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
from absl import logging  # noqa: E402


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Returns the probability that a positive scores above a negative, ties counting half.

  Computed from the Mann-Whitney U statistic of the ranks, O(n log n).

  Raises:
    ValueError: if the arrays differ in length or either class is empty.
  """
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(positive, bool)
  if scores.shape != positive.shape:
    raise ValueError(f"scores {scores.shape} and positive {positive.shape} differ in shape.")
  num_positive = int(positive.sum())
  num_negative = positive.size - num_positive
  if num_positive == 0 or num_negative == 0:
    raise ValueError(
      f"AUROC needs both classes, got {num_positive} positives and {num_negative} negatives."
    )
  ranks = scipy.stats.rankdata(scores)
  rank_sum = ranks[positive].sum()
  u_statistic = rank_sum - num_positive * (num_positive + 1) / 2
  return float(u_statistic / (num_positive * num_negative))


def precision_of_lowest(scores: np.ndarray, is_noisy: np.ndarray, fraction: float) -> float:
  """Returns the share of noisy instances among the `fraction` lowest-scoring ones.

  The lowest `count = max(1, round(fraction * n))` scores are taken. When
  several instances tie at the cut value c, only some of them fit, and which
  ones would otherwise depend on the order of the instances. Instead, every
  instance scoring below c counts fully, and the `count - #(scores < c)`
  remaining slots count with the noisy share of all instances scoring exactly
  c. The result is the mean over uniformly random orders of the tied
  instances. Learning to reweight, for example, clips its weights at 0, so
  thousands of its scores tie at 0.

  Args:
    scores: per-instance scores [n], lower for instances more likely noisy.
    is_noisy: per-instance corruption mask [n].
    fraction: share of the instances to take, in (0, 1].

  Returns:
    The expected noisy share of the `count` lowest, in [0, 1], or NaN (with a
    warning) if any score is NaN.

  Raises:
    ValueError: if `fraction` is outside (0, 1], the arrays differ in shape or
      `scores` is empty.
  """
  scores = np.asarray(scores, np.float64)
  is_noisy = np.asarray(is_noisy, bool)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
  if scores.shape != is_noisy.shape or scores.ndim != 1:
    raise ValueError(
      f"scores {scores.shape} and is_noisy {is_noisy.shape} must be 1-D of the same shape."
    )
  if scores.size == 0:
    raise ValueError("scores is empty, so there are no lowest instances to score.")
  if np.isnan(scores).any():
    # NaN scores cannot be ranked. A NaN figure keeps the run's other outputs,
    # where raising would fail every rerun of a finished run at its summary.
    logging.warning(
      "%d of %d scores are NaN, so their noisy share is NaN.", np.isnan(scores).sum(), scores.size
    )
    return float("nan")
  count = max(1, int(round(fraction * scores.size)))
  cut = np.partition(scores, count - 1)[count - 1]
  below = scores < cut
  tied = scores == cut
  remaining_slots = count - int(below.sum())
  noisy_count = is_noisy[below].sum() + remaining_slots * is_noisy[tied].mean()
  return float(noisy_count / count)


def rate_summary(
  log_lr: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict[str, float | None]:
  """Returns quantiles of the multipliers exp(log_lr) and the mean multiplier per class.

  The mean of a class without training instances is None (null in summary.json),
  e.g. in a run that trains on a target sample of a few classes.
  """
  rates = np.exp(np.asarray(log_lr, np.float64))
  summary = {
    "rate_min": float(rates.min()),
    "rate_q10": float(np.quantile(rates, 0.1)),
    "rate_median": float(np.median(rates)),
    "rate_q90": float(np.quantile(rates, 0.9)),
    "rate_max": float(rates.max()),
  }
  for label in range(num_classes):
    members = rates[np.asarray(labels) == label]
    summary[f"class_{label}_mean_rate"] = float(members.mean()) if members.size else None
  return summary


def plot_rate_histogram(
  log_lr: np.ndarray,
  groups: Sequence[tuple[str, np.ndarray]],
  path: str,
  title: str,
  xlabel: str = "learned log learning-rate multiplier (log_lr)",
) -> None:
  """Writes a PNG histogram of the log rates with one colour per group of instances.

  `groups` are (legend name, boolean mask over the instances) pairs, e.g.
  clean and noisy. The legend shows each group's size, and an empty group is
  left out.
  """
  log_lr = np.asarray(log_lr)
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  bins = np.linspace(log_lr.min(), log_lr.max() + 1e-6, 60)
  for name, mask in groups:
    mask = np.asarray(mask, bool)
    if mask.any():
      ax.hist(log_lr[mask], bins=bins, alpha=0.6, label=f"{name} ({mask.sum()})")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("training instances")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
