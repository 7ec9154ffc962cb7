"""Tests of the sweep machinery: resuming, row names and the Markdown tables."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from configs import personalisation as personalisation_config
from ddlr import checkpoint, train
from ddlr import data as data_lib
from ddlr.config_checks import ConfigError
from ddlr.data import DataError, raw_files
from experiments import personalisation, sweep, uniform_vs_ddlr
from tests.run_helpers import MOCK_EXAMPLES, apply_overrides, tiny_config
from tests.test_data import write_idx, write_mnist_dir


def _finished_run(run_dir, config, summary):
  run_dir.mkdir(exist_ok=True)
  (run_dir / "config.json").write_text(config.to_json())
  (run_dir / "summary.json").write_text(json.dumps(summary))


def test_finished_run_is_reused(tmp_path):
  config = default.get_config("quick")
  summary = {"last_epoch_test_accuracy": 0.5, "best_epoch_test_accuracy": 0.6}
  _finished_run(tmp_path, config, summary)
  # Neither field changes results; training would fail here, as there are no checkpoints.
  config.train.log_every_steps = 7
  config.ddlr.alignment = "vmap"
  assert sweep.run_or_load(config, str(tmp_path)) == summary


def test_finished_run_with_other_method_raises(tmp_path):
  config = default.get_config("quick")
  _finished_run(tmp_path, config, {"auroc": 0.5})
  config.ddlr.hyper_learning_rate = 0.7
  with pytest.raises(checkpoint.ResumeError, match=r"config.ddlr.hyper_learning_rate: 0.3 -> 0.7"):
    sweep.run_or_load(config, str(tmp_path))
  assert json.loads((tmp_path / "summary.json").read_text()) == {"auroc": 0.5}


@pytest.mark.parametrize(
  ("text", "problem"),
  [
    ('{"auroc": 0.', "cannot be read (Expecting ',' delimiter: line 1 column 12 (char 11))"),
    ("[0.5]", "is not a JSON object"),
  ],
)
def test_damaged_summary_raises_resume_error(tmp_path, text, problem):
  config = default.get_config("quick")
  _finished_run(tmp_path, config, {})
  summary_path = tmp_path / "summary.json"
  summary_path.write_text(text)
  with pytest.raises(checkpoint.ResumeError) as error_info:
    sweep.run_or_load(config, str(tmp_path))
  assert str(error_info.value) == (
    f"the summary {summary_path} of a finished run {problem}; move it out of {tmp_path} so "
    "that the run resumes from its last checkpoint and writes it again, or remove that run "
    "folder to train the run again."
  )
  assert summary_path.read_text() == text


def test_finished_run_with_more_epochs_raises(tmp_path):
  config = tiny_config(**{"train.num_epochs": 3})
  _finished_run(tmp_path, config, {"auroc": 0.5})
  config.train.num_epochs = 2
  # Mocked data keeps a call to train_and_evaluate, which this check must precede, offline.
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    with pytest.raises(checkpoint.ResumeError) as error_info:
      sweep.run_or_load(config, str(tmp_path))
  assert str(error_info.value) == (
    f"{tmp_path} contains a finished run with config.train.num_epochs=3, more than the 2 "
    "requested, so it can be neither reused nor resumed; request at least 3 epochs, or "
    "remove that run folder to train the run again."
  )
  assert json.loads((tmp_path / "summary.json").read_text()) == {"auroc": 0.5}


@pytest.mark.parametrize(("count", "words"), [(1, "1 incomplete run,"), (2, "2 incomplete runs,")])
def test_write_and_print_counts_incomplete_runs(tmp_path, capsys, count, words):
  incomplete = [
    sweep.IncompleteRun("ddlr", seed, f"ddlr_seed{seed}", 1, 2) for seed in range(count)
  ]
  path = sweep.write_and_print(str(tmp_path), "| table |\n", incomplete, num_runs=4)
  printed = capsys.readouterr().out
  assert printed.endswith(f"partial table, with {words} written to {path}\n")


def test_uniform_run_reused_after_ddlr_change(tmp_path):
  config = default.get_config("quick")
  config.ddlr.enabled = False
  _finished_run(tmp_path, config, {"auroc": 0.5})
  # A uniform run reads no ddlr field but ddlr.enabled; training would fail here.
  config.ddlr.reference_batch_size = 100
  assert sweep.run_or_load(config, str(tmp_path)) == {"auroc": 0.5}


def test_run_rows_reuses_every_seed(tmp_path):
  config = default.get_config("quick")
  for seed in (3, 4):
    config.seed = seed
    _finished_run(tmp_path / f"uniform_seed{seed}", config, {"seed": seed})
  rows = [sweep.Row("uniform", default.get_config("quick"))]
  summaries = sweep.run_rows(rows, [3, 4], str(tmp_path))
  assert summaries == {"uniform": [{"seed": 3}, {"seed": 4}]}


def test_finished_run_is_reused_with_stop_step(tmp_path):
  config = default.get_config("quick")
  _finished_run(tmp_path, config, {"auroc": 0.5})
  # A finished run has no steps left to stop before; training would fail here,
  # as there are no checkpoints, and would rewrite the run's outputs.
  config.train.stop_after_steps = 5
  assert sweep.run_or_load(config, str(tmp_path)) == {"auroc": 0.5}


def test_run_rows_validates_every_row_first(tmp_path):
  valid = default.get_config("quick")
  invalid = default.get_config("quick")
  invalid.train.batch_size = 0
  rows = [sweep.Row("uniform", valid), sweep.Row("ddlr", invalid)]
  with pytest.raises(ConfigError, match=r"config.train.batch_size=0 is invalid"):
    sweep.run_rows(rows, [0], str(tmp_path))
  assert not (tmp_path / "uniform_seed0").exists()


def _record_training(monkeypatch) -> list[str]:
  """Replaces training by a stub; returns the list of run directories it is called with."""
  trained = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: trained.append(workdir))
  return trained


def test_run_rows_checks_data_configs_first(tmp_path, monkeypatch):
  trained = _record_training(monkeypatch)
  valid = default.get_config("quick")
  invalid = default.get_config("quick")
  invalid.data.noise.kind = "pairflip"
  invalid.data.noise.rate = 0.6
  rows = [sweep.Row("symmetric", valid), sweep.Row("pairflip", invalid)]
  with pytest.raises(DataError, match=r"noise.rate=0.6 is invalid for pairflip noise"):
    sweep.run_rows(rows, [0], str(tmp_path))
  assert trained == []
  assert not (tmp_path / "symmetric_seed0").exists()


@pytest.mark.parametrize(
  ("fraction", "message"),
  [
    (1.5, r"target.fraction must be a number in \[0, 1\), got 1.5"),
    # The quick config has 1,000 test images.
    (0.0001, r"target.fraction=0.0001 marks round\(0.0001 \* 1000\) = 0 of the 1000 test"),
  ],
)
def test_run_rows_checks_target_fraction_first(tmp_path, monkeypatch, fraction, message):
  trained = _record_training(monkeypatch)
  rows = personalisation.sweep_rows(
    personalisation_config.get_config("quick"),
    transform="rot90",
    fraction=fraction,
    finetune_epochs=1,
    methods=["uniform"],
  )
  assert [row.name for row in rows] == ["classes_uniform", "transform_uniform"]
  with pytest.raises(DataError, match=message):
    sweep.run_rows(rows, [0], str(tmp_path))
  assert trained == []


def test_personalisation_rejects_fraction_outside_unit_interval():
  for fraction in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match=rf"--fraction={fraction:g} is invalid"):
      personalisation.check_fraction(fraction, num_test=1000)
  personalisation.check_fraction(0.1, num_test=1000)


def test_personalisation_rejects_fraction_marking_no_test_image():
  message = r"--fraction=0.0004 marks round\(0.0004 \* 1000\) = 0 of the 1000 test images"
  with pytest.raises(ValueError, match=message):
    personalisation.check_fraction(0.0004, num_test=1000)
  with pytest.raises(ValueError, match=r"= 1000 of the 1000 test images"):
    personalisation.check_fraction(0.9996, num_test=1000)
  personalisation.check_fraction(0.001, num_test=1000)
  # The whole test split: its size is known, and checked, once the data is loaded.
  personalisation.check_fraction(0.0004, num_test=0)


def test_run_rows_checks_reference_batches_first(tmp_path):
  uniform = tiny_config(**{"ddlr.enabled": False})
  # The tiny config's reference split has 10 examples.
  oversized = tiny_config(**{"ddlr.reference_batch_size": 11})
  rows = [sweep.Row("uniform", uniform), sweep.Row("ddlr", oversized)]
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    with pytest.raises(ConfigError, match=r"reference_batch_size=11 is larger than the reference"):
      sweep.run_rows(rows, [0], str(tmp_path))
  assert not (tmp_path / "uniform_seed0").exists()


def test_run_rows_loads_target_data_for_check(tmp_path):
  config = tiny_config()
  config.data.reference_size = 20
  config.data.target.kind = "classes"
  config.data.target.classes = (5, 7, 9)
  # The 20-example pool contains 6 examples of these classes, all in the target sample.
  rows = [sweep.Row("ddlr", config)]
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    with pytest.raises(ConfigError, match=r"reference split, the target sample \(6 examples\)"):
      sweep.run_rows(rows, [0], str(tmp_path))
  assert not (tmp_path / "ddlr_seed0").exists()


def test_finished_sweep_reused_without_data(tmp_path):
  config = personalisation_config.get_config("quick")
  # No data here: loading it for the reference batch check would fail.
  config.data.data_dir = str(tmp_path / "no_data")
  config.data.manual_dir = str(tmp_path / "no_data")
  run_config = config.copy_and_resolve_references()
  run_config.seed = 0
  _finished_run(tmp_path / "ddlr_seed0", run_config, {"auroc": 0.5})
  summaries = sweep.run_rows([sweep.Row("ddlr", config)], [0], str(tmp_path))
  assert summaries == {"ddlr": [{"auroc": 0.5}]}


def test_run_rows_rejects_repeated_names(tmp_path):
  config = default.get_config("quick")
  with pytest.raises(ValueError, match=r"repeated: \['ddlr'\]"):
    sweep.run_rows([sweep.Row("ddlr", config), sweep.Row("ddlr", config)], [0], str(tmp_path))


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
  table = sweep.results_table(runs, [0, 1], relative_time_to="uniform").splitlines()
  assert table[0] == "Seeds: 0, 1."
  assert table[2].endswith("| s/step | time/step vs uniform |")
  assert table[4] == (
    "| uniform | 0.8100 ± 0.0100 | 0.8500 ± 0.0100 | n/a | 0.0500 ± 0.0000 | 1.00x |"
  )
  assert table[5] == (
    "| ddlr | 0.8800 ± 0.0000 | 0.8850 ± 0.0050 | 0.9750 ± 0.0050 | 0.1000 ± 0.0000 | 2.00x |"
  )
  # 0.8850 ± 0.0050 above is np.std with ddof=0: the sample std (ddof=1) would be 0.0071.
  assert table[6:] == ["", sweep.STD_NOTE]
  assert "population standard deviation" in sweep.STD_NOTE


def test_results_table_heads_each_group():
  runs = {name: [{"auroc": 0.5}] for name in ("ddlr", "reweight", "uniform")}
  groups = {"ddlr": "trusted", "reweight": "trusted", "uniform": "untrusted"}
  table = sweep.results_table(runs, [0], [("auroc", "AUROC")], groups=groups).splitlines()
  # One seed: the cells have no ±, so no note follows the table.
  assert table[4:] == [
    "| **trusted** | |",
    "| ddlr | 0.5000 |",
    "| reweight | 0.5000 |",
    "| **untrusted** | |",
    "| uniform | 0.5000 |",
  ]


def test_results_table_marks_incomplete_rows():
  stopped = {"completed": False, "step": 5, "total_steps": 172}
  runs = {
    "uniform": [{"auroc": 0.5, "seconds_per_step": 0.1}, stopped],
    "ddlr": [
      {"completed": True, "auroc": 0.9, "seconds_per_step": 0.2},
      {"completed": True, "auroc": 0.7, "seconds_per_step": 0.2},
    ],
  }
  table = sweep.results_table(runs, [0, 1], [("auroc", "AUROC")], relative_time_to="uniform")
  assert table.splitlines()[4:] == [
    "| uniform | incomplete | incomplete |",
    "| ddlr | 0.8000 ± 0.1000 | incomplete |",
    "",
    sweep.STD_NOTE,
  ]


def test_incomplete_sweep_writes_partial_table(tmp_path, capsys):
  config = tiny_config()
  config.seed = 0
  summary = {"completed": True, "auroc": 0.5}
  _finished_run(tmp_path / "uniform_seed0", config, summary)
  stopping = tiny_config(**{"train.stop_after_steps": 1})
  rows = [sweep.Row("uniform", tiny_config()), sweep.Row("ddlr", stopping)]
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    incomplete = sweep.run_and_report(rows, [0], str(tmp_path), [("auroc", "AUROC")])
  run_dir = str(tmp_path / "ddlr_seed0")
  # 90 training instances in batches of 32: 2 steps.
  assert incomplete == [sweep.IncompleteRun("ddlr", 0, run_dir, 1, 2)]
  written = (tmp_path / "results.md").read_text()
  assert written.startswith(
    "Incomplete: 1 of 2 runs stopped at config.train.stop_after_steps before their last step"
  )
  assert f"- ddlr, seed 0: step 1 of 2, in {run_dir}\n" in written
  assert written.endswith("| uniform | 0.5000 |\n| ddlr | incomplete |\n")
  capsys.readouterr()

  with pytest.raises(SystemExit) as exit_info:
    sweep.exit_if_incomplete(incomplete, 2)
  assert exit_info.value.code == sweep.INCOMPLETE_EXIT_STATUS
  stderr = capsys.readouterr().err
  assert f"- ddlr, seed 0: step 1 of 2, in {run_dir}\n" in stderr
  assert "rerun this command without --config.train.stop_after_steps, or with a later" in stderr

  # Rerunning without the stop resumes the stopped run; the finished one is reused.
  rows[1] = sweep.Row("ddlr", tiny_config())
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    assert sweep.run_and_report(rows, [0], str(tmp_path), [("auroc", "AUROC")]) == []
  assert json.loads((tmp_path / "uniform_seed0" / "summary.json").read_text()) == summary
  written = (tmp_path / "results.md").read_text()
  assert written.startswith("Seeds: 0.")
  assert "incomplete" not in written
  assert (tmp_path / "results.1.md").read_text().startswith("Incomplete: 1 of 2 runs")
  sweep.exit_if_incomplete([], 2)


@pytest.mark.parametrize("name", ["results.md", "results_symmetric.md"])
def test_write_table_sets_other_table_aside(tmp_path, caplog, name):
  stem = name.removesuffix(".md")
  old_table = "Seeds: 0, 1.\n\n| method | AUROC |\n|---|---|\n| ddlr | 0.8000 ± 0.1000 |\n"
  (tmp_path / name).write_bytes(old_table.encode("utf-8"))
  (tmp_path / f"{stem}.1.md").write_text("an earlier table\n")
  new_table = "Seeds: 0.\n\n| method | AUROC |\n|---|---|\n| ddlr | 0.7000 |\n"

  path = sweep.write_table(str(tmp_path), new_table, name)

  assert path == str(tmp_path / name)
  assert (tmp_path / name).read_text() == new_table
  assert (tmp_path / f"{stem}.2.md").read_bytes() == old_table.encode("utf-8")
  assert (tmp_path / f"{stem}.1.md").read_text() == "an earlier table\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
    [name, f"{stem}.1.md", f"{stem}.2.md"]
  )
  [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert warning == (
    f"{tmp_path / name} had a different table, which was moved to {tmp_path / f'{stem}.2.md'} "
    "before writing the new one."
  )


def test_write_table_keeps_equal_table(tmp_path, caplog):
  table = "Seeds: 0.\n\n| method | AUROC |\n|---|---|\n| ddlr | 0.7000 ± 0.0000 |\n"
  sweep.write_table(str(tmp_path), table)
  modified = (tmp_path / "results.md").stat().st_mtime_ns

  sweep.write_table(str(tmp_path), table)

  assert [p.name for p in tmp_path.iterdir()] == ["results.md"]
  assert (tmp_path / "results.md").read_text() == table
  assert (tmp_path / "results.md").stat().st_mtime_ns == modified
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_parse_seeds_names_bad_value():
  assert sweep.parse_seeds(["0", "2"]) == [0, 2]
  with pytest.raises(ValueError, match="got 'x'"):
    sweep.parse_seeds(["0", "x"])
  with pytest.raises(ValueError, match="--seeds lists 1 more than once"):
    sweep.parse_seeds(["1", "0", "1"])
  for seed in ("-1", str(2**32)):
    with pytest.raises(ValueError, match=rf"--seeds has {seed}, which is invalid"):
      sweep.parse_seeds(["0", seed])


def test_uniform_vs_ddlr_rows_differ_only_in_switch():
  rows = uniform_vs_ddlr.method_rows(default.get_config("quick"))
  assert [row.name for row in rows] == ["uniform", "ddlr"]
  assert [row.config.ddlr.enabled for row in rows] == [False, True]
  rows[0].config.ddlr.enabled = True
  assert rows[0].config.to_dict() == rows[1].config.to_dict()


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    (
      {"baseline.name": "data_parameters"},
      "uniform_vs_ddlr does not support config.baseline.name='data_parameters'. A baseline "
      "replaces the per-instance rates, so the ddlr row cannot train with one. Remove this "
      "setting and rerun. To compare the baselines, run experiments.noisy_comparison.",
    ),
    (
      {"ddlr.enabled": False},
      "uniform_vs_ddlr does not support config.ddlr.enabled=False. The sweep sets "
      "config.ddlr.enabled itself, to False in its uniform row and True in its ddlr row. "
      "Remove this setting and rerun.",
    ),
    (
      {"ddlr.enabled": False, "baseline.name": "small_loss"},
      "uniform_vs_ddlr does not support config.ddlr.enabled=False and "
      "config.baseline.name='small_loss'. The sweep sets config.ddlr.enabled itself, to False "
      "in its uniform row and True in its ddlr row. A baseline replaces the per-instance "
      "rates, so the ddlr row cannot train with one. Remove these settings and rerun. To "
      "compare the baselines, run experiments.noisy_comparison.",
    ),
  ],
)
def test_uniform_vs_ddlr_rejects_overridden_switches(overrides, message):
  config = default.get_config("quick")
  apply_overrides(config, overrides)
  with pytest.raises(ConfigError) as raised:
    uniform_vs_ddlr.method_rows(config)
  assert str(raised.value) == message


def test_personalisation_rows_change_one_switch_each():
  config = personalisation_config.get_config("quick")
  rows = personalisation.sweep_rows(
    config, transform="invert", fraction=0.2, finetune_epochs=3, methods=personalisation.METHODS
  )
  methods = ["uniform", "finetune", "target_only", "learning_to_reweight", "ddlr", "ddlr_finetune"]
  assert [row.name for row in rows] == [f"classes_{m}" for m in methods] + [
    f"transform_{m}" for m in methods
  ]
  by_name = {row.name: row.config for row in rows}
  assert tuple(by_name["classes_uniform"].data.target.classes) == (2, 4, 6)
  transform = by_name["transform_uniform"].data.target
  assert (transform.kind, transform.transform, transform.fraction) == ("transform", "invert", 0.2)
  assert tuple(transform.classes) == ()
  for setting in ("classes", "transform"):
    uniform = by_name[f"{setting}_uniform"].to_dict()
    expected = {
      "finetune": ("finetune", "epochs", 3),
      "ddlr": ("ddlr", "enabled", True),
      "learning_to_reweight": ("baseline", "name", "learning_to_reweight"),
    }
    for method, (section, field, value) in expected.items():
      changed = by_name[f"{setting}_{method}"].to_dict()
      assert changed[section][field] == value
      changed[section][field] = uniform[section][field]
      assert changed == uniform, method
    ddlr_finetune = by_name[f"{setting}_ddlr_finetune"].to_dict()
    assert ddlr_finetune["ddlr"]["enabled"] is True
    assert ddlr_finetune["finetune"]["epochs"] == 3
    ddlr_finetune["ddlr"]["enabled"] = False
    ddlr_finetune["finetune"]["epochs"] = uniform["finetune"]["epochs"]
    assert ddlr_finetune == uniform
    target_only = by_name[f"{setting}_target_only"].to_dict()
    assert target_only["data"]["target"]["train_on"] == "target_sample"
    target_only["data"]["target"]["train_on"] = "all"
    assert target_only == uniform


def test_personalisation_includes_reweighting_with_baseline_section():
  config = personalisation_config.get_config("quick")
  config.baseline = ml_collections.ConfigDict({"name": "none"})
  rows = personalisation.sweep_rows(
    config, transform="rot90", fraction=0.1, finetune_epochs=1, methods=["learning_to_reweight"]
  )
  assert [row.name for row in rows] == [
    "classes_learning_to_reweight",
    "transform_learning_to_reweight",
  ]
  assert [row.config.baseline.name for row in rows] == ["learning_to_reweight"] * 2
  assert not any(row.config.ddlr.enabled for row in rows)


def test_personalisation_tables_show_auroc_for_both_settings():
  summaries = {
    "classes_uniform": [{"final_target_test_accuracy": 0.5}],
    "classes_ddlr": [{"final_target_test_accuracy": 0.5, "target_domain_auroc": 0.8}],
    "transform_ddlr": [{"final_target_test_accuracy": 0.5, "target_domain_auroc": 0.9}],
  }
  text = personalisation.tables(summaries, [0], "rot90")
  classes_part, transform_part = text.split("### Covariate shift (rot90)")
  header = (
    "| method | target-test acc. | rest-of-test acc. | best-epoch target-test acc. | "
    "target-domain AUROC |"
  )
  assert header in classes_part.splitlines()
  assert header in transform_part.splitlines()
  assert "| classes_uniform | 0.5000 | n/a | n/a | n/a |" in classes_part.splitlines()
  assert "| classes_ddlr | 0.5000 | n/a | n/a | 0.8000 |" in classes_part.splitlines()
  assert "| transform_ddlr | 0.5000 | n/a | n/a | 0.9000 |" in transform_part.splitlines()


def test_run_and_report_writes_grouped_table(tmp_path):
  config = default.get_config("quick")
  config.seed = 0
  for name in ("uniform", "ddlr"):
    _finished_run(tmp_path / f"{name}_seed0", config, {"auroc": 0.5})
  rows = [sweep.Row("uniform", config, "small_cnn"), sweep.Row("ddlr", config, "small_cnn")]
  assert sweep.run_and_report(rows, [0], str(tmp_path), [("auroc", "AUROC")]) == []
  table = (tmp_path / "results.md").read_text()
  assert table.splitlines()[4:] == [
    "| **small_cnn** | |",
    "| uniform | 0.5000 |",
    "| ddlr | 0.5000 |",
  ]


def test_sweep_reuses_run_without_added_field(tmp_path):
  config = default.get_config("quick")
  saved = json.loads(config.to_json())
  del saved["ddlr"]["split_batch_stats"]
  tmp_path.joinpath("config.json").write_text(json.dumps(saved))
  tmp_path.joinpath("summary.json").write_text(json.dumps({"auroc": 0.5}))
  # Training would fail here, as there are no checkpoints.
  assert sweep.run_or_load(config, str(tmp_path)) == {"auroc": 0.5}

  config.ddlr.reference = "split"
  config.ddlr.split_batch_stats = "half"
  with pytest.raises(checkpoint.ResumeError, match=r"split_batch_stats: 'batch' -> 'half'"):
    sweep.run_or_load(config, str(tmp_path))


def test_run_rows_logs_run_number(tmp_path, monkeypatch, caplog):
  trained = []
  monkeypatch.setattr(sweep, "run_or_load", lambda config, run_dir: trained.append(run_dir) or {})
  rows = [
    sweep.Row("uniform", tiny_config(**{"ddlr.enabled": False})),
    sweep.Row("ddlr", tiny_config()),
  ]
  with caplog.at_level("INFO", logger="absl"):
    sweep.run_rows(rows, [0, 1], str(tmp_path))
  assert len(trained) == 4
  messages = [
    record.getMessage() for record in caplog.records if "of this table" in record.getMessage()
  ]
  assert (
    messages[0] == f"Run 1 of 4 of this table: uniform, seed 0, in {tmp_path / 'uniform_seed0'}."
  )
  assert messages[-1] == f"Run 4 of 4 of this table: ddlr, seed 1, in {tmp_path / 'ddlr_seed1'}."


@pytest.mark.parametrize(
  ("field", "value"), [("data.data_dir", "/elsewhere/tfds"), ("data.manual_dir", "/elsewhere/raw")]
)
def test_finished_run_reused_after_data_move(tmp_path, field, value):
  config = default.get_config("quick")
  _finished_run(tmp_path, config, {"auroc": 0.5})
  # The same data in another directory; training would fail here, as there are no checkpoints.
  section, name = field.split(".")
  config[section][name] = value
  assert sweep.is_reused(config, str(tmp_path))
  assert sweep.run_or_load(config, str(tmp_path)) == {"auroc": 0.5}


def _write_idx_copy_of_mock(directory) -> None:
  """Writes the mocked fashion_mnist splits as IDX files that source='idx' reads back equal."""
  prefixes = {"train": "train", "test": "t10k"}
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    for split, prefix in prefixes.items():
      images, labels, _ = data_lib.load_split(
        "fashion_mnist", split, source="tfds", data_dir=None, manual_dir=None
      )
      # source='idx' puts raw example order[i] at row i, so row i is written there.
      order = raw_files.tfds_order(split, len(labels))
      raw_images, raw_labels = np.empty_like(images), np.empty_like(labels)
      raw_images[order], raw_labels[order] = images, labels
      write_idx(str(directory / f"{prefix}-images-idx3-ubyte"), raw_images[..., 0], compress=False)
      write_idx(str(directory / f"{prefix}-labels-idx1-ubyte"), raw_labels, compress=False)


def _finished_uniform_run(tmp_path):
  """Returns the config, run folder and summary of a uniform mocked run, and an empty folder."""
  config = tiny_config(**{"ddlr.enabled": False})
  run_dir = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    summary = sweep.run_or_load(config, str(run_dir))
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  return config, run_dir, summary, raw_dir


def test_finished_run_with_other_source_checks_split(tmp_path, monkeypatch):
  config, run_dir, summary, raw_dir = _finished_uniform_run(tmp_path)
  _write_idx_copy_of_mock(raw_dir)
  config.data.source = "idx"
  config.data.manual_dir = str(raw_dir)
  assert not sweep.is_reused(config, str(run_dir))

  # The same examples from the raw files: the split matches and nothing trains.
  monkeypatch.setattr(train, "_train", _fail_training)
  assert sweep.run_or_load(config, str(run_dir)) == summary
  assert json.loads((run_dir / "config.json").read_text())["data"]["source"] == "tfds"


def test_finished_run_with_other_source_data_raises(tmp_path):
  config, run_dir, summary, raw_dir = _finished_uniform_run(tmp_path)
  write_mnist_dir(str(raw_dir), num_train=MOCK_EXAMPLES, num_test=MOCK_EXAMPLES)
  config.data.source = "idx"
  config.data.manual_dir = str(raw_dir)
  with pytest.raises(checkpoint.ResumeError) as error_info:
    sweep.run_or_load(config, str(run_dir))
  assert str(error_info.value) == (
    f"{run_dir / 'split_record.npz'} records a different split (noise mask, labels, reference "
    "ids or target-domain mask) than this config produces, so the run cannot be resumed; use "
    "a new --workdir."
  )
  assert json.loads((run_dir / "summary.json").read_text()) == summary


def _fail_training(*args, **kwargs):
  raise AssertionError("a finished run must not train again")
