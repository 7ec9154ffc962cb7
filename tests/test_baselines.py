"""Baselines through `train_and_evaluate`: config checks, outputs and exact resumption."""

import jax
import numpy as np
import pytest

from ddlr.config_checks import ConfigError, validate_config
from tests.run_helpers import latest_state, run_on_mock, tiny_config


def _config(name="data_parameters", **overrides):
  return tiny_config(
    **{
      "ddlr.enabled": False,
      "baseline.name": name,
      "baseline.reference_batch_size": 8,
      "train.num_epochs": 2,
      "train.batch_size": 16,  # 5 steps per epoch
      "checkpoint.every_steps": 3,
      **overrides,
    }
  )


def _latest_state(workdir, config):
  return latest_state(workdir, config)[0]


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"ddlr.enabled": True}, "needs config.ddlr.enabled=False"),
    ({"baseline.name": "mixup"}, "config.baseline.name='mixup' is invalid"),
    ({"baseline.small_loss.forget_rate": 1.0}, "forget_rate=1.0 is invalid"),
    ({"baseline.small_loss.ramp_epochs": -1.0}, "ramp_epochs=-1.0 is invalid"),
    ({"baseline.data_parameters.momentum": 1.0}, "momentum=1.0 is invalid"),
    ({"baseline.data_parameters.log_temperature_min": 3.0}, "exceeds"),
    ({"baseline.data_parameters.use_class": False,
      "baseline.data_parameters.use_instance": False}, "both False"),
    ({"baseline.hypergradient.hyper_learning_rate": -1e-3}, "hyper_learning_rate=-0.001"),
    ({"baseline.reference_batch_size": 0}, "reference_batch_size=0 is invalid"),
  ],
)  # fmt: skip
def test_invalid_baseline_config_is_rejected(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate_config(_config(**overrides))


def test_learning_to_reweight_without_reference_split_is_rejected(tmp_path):
  config = _config("learning_to_reweight", **{"data.reference_size": 0})
  with pytest.raises(ValueError, match="learning_to_reweight' needs a reference split"):
    run_on_mock(config, tmp_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """An uninterrupted two-epoch Data Parameters run: its workdir and summary."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, run_on_mock(_config(), workdir)


def test_data_parameters_run_scores_instances(finished_run):
  workdir, summary = finished_run

  scores = np.load(workdir / "baseline_scores.npz")
  assert scores["score"].shape == (90,)
  # Two epochs of 5 batches of 16 visit 80 ids per epoch; an instance's
  # temperature moves at each visit, so most scores leave 0.
  assert np.count_nonzero(scores["score"]) >= 80
  np.testing.assert_array_equal(scores["is_noisy"], scores["labels"] != scores["true_labels"])
  assert 0.0 <= summary["auroc"] <= 1.0
  assert 0.0 <= summary["noisy_precision_lowest_10pct"] <= 1.0
  assert summary["class_0_temperature"] > 0.0


def test_data_parameters_resume_is_bit_identical(finished_run, tmp_path):
  reference_dir, reference_summary = finished_run
  stopped = run_on_mock(_config(**{"train.stop_after_steps": 7}), tmp_path)
  assert stopped == {"completed": False, "step": 7, "total_steps": 10}

  summary = run_on_mock(_config(), tmp_path)

  assert summary["test_accuracy_per_epoch"] == reference_summary["test_accuracy_per_epoch"]
  state = _latest_state(tmp_path, _config())
  reference_state = _latest_state(reference_dir, _config())
  leaves = jax.tree.leaves((state.params, state.opt_state, state.baseline_state))
  reference_leaves = jax.tree.leaves(
    (reference_state.params, reference_state.opt_state, reference_state.baseline_state)
  )
  assert len(leaves) == len(reference_leaves)
  for a, b in zip(leaves, reference_leaves, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  scores = np.load(tmp_path / "baseline_scores.npz")["score"]
  np.testing.assert_array_equal(scores, np.load(reference_dir / "baseline_scores.npz")["score"])


def test_hypergradient_run_reports_learned_rate(tmp_path):
  summary = run_on_mock(_config("hypergradient", **{"train.num_epochs": 1}), tmp_path)

  assert summary["hypergradient_learning_rate"] != pytest.approx(0.05, abs=1e-9)
  assert "auroc" not in summary
