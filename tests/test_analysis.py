"""Tests of the noise scores in ddlr.analysis."""

import numpy as np
import pytest

from ddlr import analysis


def _lowest_by_order(scores, is_noisy, fraction, order):
  """Returns the noisy share of the lowest scores, ties broken by `order` (lower first)."""
  count = max(1, int(round(fraction * len(scores))))
  lowest = np.lexsort((order, scores))[:count]
  return float(np.mean(is_noisy[lowest]))


def test_precision_ties_at_cut_by_hand():
  scores = np.array([2, 0, 0, 0, 0, 1, -1, 3, 4, 5], np.float32)
  is_noisy = np.array([0, 1, 1, 1, 0, 0, 1, 0, 0, 0], bool)
  # count = round(0.3 * 10) = 3 and the cut value is 0. The one score below it
  # (-1) is noisy. Two slots remain for the four instances tied at 0, of which
  # three are noisy, so they add 2 * 3/4 = 1.5. Share: (1 + 1.5) / 3 = 5/6.
  # Taking the tied instances in id order would have given 3/3 = 1.
  assert analysis.precision_of_lowest(scores, is_noisy, 0.3) == pytest.approx(5 / 6, abs=1e-12)


def test_precision_all_tied_is_overall_share():
  is_noisy = np.array([1, 0, 0, 0, 1, 0, 0, 0], bool)
  result = analysis.precision_of_lowest(np.zeros(8), is_noisy, 0.25)
  assert result == pytest.approx(0.25, abs=1e-12)


def test_precision_without_ties_matches_sort():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=1000)
  is_noisy = rng.random(1000) < 0.4
  assert len(np.unique(scores)) == 1000
  for fraction in (0.001, 0.1, 0.37, 1.0):
    # Without ties a stable argsort picks an unambiguous set.
    count = max(1, int(round(fraction * 1000)))
    expected = float(np.mean(is_noisy[np.argsort(scores, kind="stable")[:count]]))
    assert analysis.precision_of_lowest(scores, is_noisy, fraction) == expected, fraction


def test_precision_invariant_under_permutation():
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 5, size=300).astype(np.float32)
  is_noisy = rng.random(300) < 0.4
  expected = analysis.precision_of_lowest(scores, is_noisy, 0.1)
  for _ in range(5):
    permutation = rng.permutation(300)
    result = analysis.precision_of_lowest(scores[permutation], is_noisy[permutation], 0.1)
    assert result == pytest.approx(expected, abs=1e-12)


def test_precision_is_mean_over_random_tie_breaks():
  rng = np.random.default_rng(2)
  # Like learning to reweight: many scores clipped to exactly 0, the rest positive.
  scores = np.where(rng.random(500) < 0.3, 0.0, rng.random(500))
  is_noisy = (rng.random(500) < 0.4) | ((scores == 0) & (rng.random(500) < 0.3))
  fraction = 0.1
  assert (scores == 0).sum() > fraction * 500  # the cut falls inside the tied block
  draws = [_lowest_by_order(scores, is_noisy, fraction, rng.permutation(500)) for _ in range(4000)]
  # The draws here have a standard deviation of 0.057, so the mean of 4,000 is
  # within about 0.001 of its expectation.
  assert analysis.precision_of_lowest(scores, is_noisy, fraction) == pytest.approx(
    np.mean(draws), abs=5e-3
  )
  assert np.ptp(draws) > 0.1  # the order among ties really moves a single draw


@pytest.mark.parametrize(
  "scores, is_noisy, fraction, message",
  [
    (np.zeros(4), np.zeros(4, bool), 0.0, "fraction must be in"),
    (np.zeros(4), np.zeros(4, bool), 1.5, "fraction must be in"),
    (np.zeros(4), np.zeros(3, bool), 0.5, "same shape"),
    (np.zeros(0), np.zeros(0, bool), 0.5, "empty"),
  ],
)
def test_precision_rejects_invalid_input(scores, is_noisy, fraction, message):
  with pytest.raises(ValueError, match=message):
    analysis.precision_of_lowest(scores, is_noisy, fraction)


def test_precision_of_nan_scores_is_nan():
  assert np.isnan(analysis.precision_of_lowest(np.array([0.0, np.nan]), np.zeros(2, bool), 0.5))


def test_rate_summary_of_empty_class_is_none():
  summary = analysis.rate_summary(np.log([1.0, 2.0, 4.0]), np.array([0, 0, 2]), num_classes=3)
  assert summary["class_0_mean_rate"] == pytest.approx(1.5)
  assert summary["class_1_mean_rate"] is None
  assert summary["class_2_mean_rate"] == pytest.approx(4.0)
