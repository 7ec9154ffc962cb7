"""Tests of the uniform-versus-ddlr sweep: resuming and the Markdown table."""

import json

from experiments import uniform_vs_ddlr


def test_finished_run_is_reused(tmp_path):
  summary = {"last_epoch_test_accuracy": 0.5, "best_epoch_test_accuracy": 0.6}
  (tmp_path / "summary.json").write_text(json.dumps(summary))
  # A config of None would fail if training started, so reuse is what returns.
  assert uniform_vs_ddlr.run_or_load(None, str(tmp_path)) == summary


def test_results_table_gives_mean_and_std():
  runs = {
      "uniform": [
          {"last_epoch_test_accuracy": 0.80, "best_epoch_test_accuracy": 0.84,
           "seconds_per_step": 0.05},
          {"last_epoch_test_accuracy": 0.82, "best_epoch_test_accuracy": 0.86,
           "seconds_per_step": 0.05},
      ],
      "ddlr": [
          {"last_epoch_test_accuracy": 0.88, "best_epoch_test_accuracy": 0.88, "auroc": 0.97,
           "seconds_per_step": 0.1},
          {"last_epoch_test_accuracy": 0.88, "best_epoch_test_accuracy": 0.89, "auroc": 0.98,
           "seconds_per_step": 0.1},
      ],
  }  # fmt: skip
  table = uniform_vs_ddlr.results_table(runs, [0, 1]).splitlines()
  assert table[0] == "Seeds: 0, 1."
  assert table[4] == "| uniform | 0.8100 ± 0.0100 | 0.8500 ± 0.0100 | n/a | 0.0500 ± 0.0000 |"
  assert (
    table[5] == "| ddlr | 0.8800 ± 0.0000 | 0.8850 ± 0.0050 | 0.9750 ± 0.0050 | 0.1000 ± 0.0000 |"
  )
