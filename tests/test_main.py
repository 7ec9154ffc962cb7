"""Tests of ddlr.main: one error line instead of a traceback, and the result lines."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from configs import default, personalisation
from ddlr import reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(tmp_path, *overrides):
  command = [
      sys.executable, "-m", "ddlr.main", "--config=configs/default.py:quick",
      f"--workdir={tmp_path / 'run'}", *overrides,
  ]  # fmt: skip
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    (
      ["--config.train.epochs=3"],
      "error: --config.train.epochs: train has no field 'epochs'; its fields are: "
      "batch_size, log_every_steps, num_epochs, stop_after_steps.",
    ),
    (
      ["--config.data.name=imagenet21k"],
      "error: invalid config.data: unknown dataset name 'imagenet21k'. Expected one of mnist, "
      "fashion_mnist, "
      "cifar10, cifar100, imagenet2012",
    ),
    (
      ["--config.data.source=idx", "--config.data.manual_dir=/nonexistent/fashion"],
      "error: config.data.manual_dir directory not found: /nonexistent/fashion; set "
      "config.data.manual_dir to an existing directory",
    ),
    (
      ["--config.ddlr.reference=oracle"],
      "error: config.ddlr.reference='oracle' is invalid; expected one of "
      "['batch', 'lookahead', 'split', 'momentum', 'reference', 'small_loss', "
      "'small_loss_split'].",
    ),
    (
      ["extra"],
      "error: unexpected positional argument 'extra'; the program takes only flags "
      "(--name=value, see --help).",
    ),
  ],
)
def test_bad_input_prints_one_error_line(tmp_path, overrides, message):
  result = _run_main(tmp_path, *overrides)
  assert result.returncode == 1
  assert _error_lines(result.stderr) == [message]
  assert "Traceback" not in result.stderr


def test_non_finite_loss_names_step_and_keeps_outputs(tmp_path):
  # Reads the raw files of Debian's dataset-fashion-mnist (scripts/setup.sh installs it).
  result = _run_main(
      tmp_path, "--config.data.source=idx", "--config.optimizer.learning_rate=1e30",
      "--config.optimizer.schedule=constant",
  )  # fmt: skip
  assert result.returncode == 1
  [line] = _error_lines(result.stderr)
  assert re.match(r"error: non-finite .+ at step \d+ \(epoch 1\): loss=", line)
  assert "Traceback" not in result.stderr
  for name in ("config.json", "split_record.npz"):
    assert os.path.exists(tmp_path / "run" / name), name


def _wait_for_checkpoint(process, checkpoints) -> None:
  """Waits until the run in `process` has written a checkpoint under `checkpoints`."""
  deadline = time.monotonic() + 240
  while not (checkpoints.is_dir() and any(p.name.isdecimal() for p in checkpoints.iterdir())):
    assert process.poll() is None, process.stderr.read()
    assert time.monotonic() < deadline, "no checkpoint within 240 s"
    time.sleep(0.2)


def test_interrupt_keeps_checkpoint_and_says_resume(tmp_path):
  checkpoints = tmp_path / "run" / "checkpoints"
  arguments = [
      sys.executable, "-m", "ddlr.main", "--config=configs/default.py:quick",
      f"--workdir={tmp_path / 'run'}", "--config.train.num_epochs=100",
      "--config.checkpoint.every_steps=5",
  ]  # fmt: skip
  # A shell that starts a background job ignores SIGINT in it, and exec keeps
  # that, so a small launcher restores the default before it execs the run.
  launcher = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
  )
  process = subprocess.Popen(
    [sys.executable, "-c", launcher, *arguments],
    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  _wait_for_checkpoint(process, checkpoints)

  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)

  assert process.returncode == 130
  assert "Traceback" not in stderr
  last_line = stderr.strip().splitlines()[-1]
  assert re.fullmatch(
    r"interrupted; rerunning the command resumes from the checkpoint at step \d+ in .+\.",
    last_line,
  )
  steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdecimal()]
  assert f"step {max(steps)} in" in last_line
  assert all(p.name.isdecimal() for p in checkpoints.iterdir())


SIGTERM_ON_MOCK = """
import sys
import tensorflow_datasets as tfds
from absl import app
from ddlr import cli, main
with tfds.testing.mock_data(num_examples=100):
  app.run(main.main, argv=["ddlr.main", *sys.argv[1:]], flags_parser=cli.parse_flags)
"""


def test_sigterm_keeps_checkpoint_and_says_resume(tmp_path):
  checkpoints = tmp_path / "run" / "checkpoints"
  arguments = [
      "--config=configs/default.py:quick", f"--workdir={tmp_path / 'run'}",
      "--config.data.num_train=0", "--config.data.num_test=0", "--config.data.reference_size=10",
      "--config.ddlr.reference_batch_size=8", "--config.model.width=4",
      "--config.train.batch_size=16", "--config.eval.batch_size=50",
      "--config.train.num_epochs=1000", "--config.checkpoint.every_steps=1",
  ]  # fmt: skip
  process = subprocess.Popen(
    [sys.executable, "-c", SIGTERM_ON_MOCK, *arguments],
    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  _wait_for_checkpoint(process, checkpoints)

  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)

  assert process.returncode == 143
  assert "Traceback" not in stderr
  last_line = stderr.strip().splitlines()[-1]
  steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdecimal()]
  assert last_line == (
    f"interrupted; rerunning the command resumes from the checkpoint at step {max(steps)} "
    f"in {checkpoints}."
  )
  assert all(p.name.isdecimal() for p in checkpoints.iterdir())


def _finished_summary():
  return {
    "last_epoch_test_accuracy": 0.8,
    "best_epoch_test_accuracy": 0.81,
    "best_epoch": 3,
    "auroc": 0.7641,
    "noisy_precision_lowest_10pct": 0.9,
  }


def test_summary_lines_name_learned_rates_for_ddlr():
  config = default.get_config()
  assert config.ddlr.enabled
  lines = reporting.summary_lines(_finished_summary(), config)
  assert lines[0] == "last-epoch test accuracy 0.8000 | best-epoch test accuracy 0.8100 (epoch 3)"
  assert lines[1] == (
    "AUROC of learned rates (clean above noisy) 0.7641 | noisy share of the 10% lowest rates 0.900"
  )


@pytest.mark.parametrize("baseline", ["data_parameters", "learning_to_reweight", "small_loss"])
def test_summary_lines_name_baseline_scores(baseline):
  config = default.get_config()
  config.ddlr.enabled = False
  config.baseline.name = baseline
  lines = reporting.summary_lines(_finished_summary(), config)
  assert lines[1] == (
    f"AUROC of {baseline} scores (clean above noisy) 0.7641 | "
    "noisy share of the 10% lowest scores 0.900"
  )
  assert not any("learned rates" in line for line in lines)


def test_summary_lines_leave_out_missing_auroc():
  config = default.get_config()
  config.ddlr.enabled = False
  summary = _finished_summary()
  del summary["auroc"], summary["noisy_precision_lowest_10pct"]
  assert len(reporting.summary_lines(summary, config)) == 1


def test_summary_lines_report_finetuned_accuracy():
  config = default.get_config()
  config.finetune.epochs = 2
  summary = {
    **_finished_summary(),
    "finetune_test_accuracy_per_epoch": [0.7031, 0.6836],
    "final_test_accuracy": 0.6836,
  }
  lines = reporting.summary_lines(summary, config)
  assert lines[0] == "last-epoch test accuracy 0.8000 | best-epoch test accuracy 0.8100 (epoch 3)"
  assert lines[2] == "test accuracy after fine-tuning 0.6836 (2 epochs on the reference split)"
  assert len(lines) == 3


def test_summary_lines_report_finetuned_target_accuracy():
  config = personalisation.get_config()
  config.finetune.epochs = 1
  summary = {
    **_finished_summary(),
    "finetune_test_accuracy_per_epoch": [0.75],
    "final_test_accuracy": 0.75,
    "final_target_test_accuracy": 0.625,
    "final_rest_test_accuracy": 0.8125,
  }
  lines = reporting.summary_lines(summary, config)
  assert lines[2] == "test accuracy after fine-tuning 0.7500 (1 epoch on the target sample)"
  assert lines[3] == (
    "target-test accuracy 0.6250 | rest-of-test accuracy 0.8125 (after fine-tuning)"
  )
  assert len(lines) == 4


@pytest.mark.parametrize("undefined", [None, math.nan])
def test_summary_lines_show_undefined_scores_as_na(undefined):
  config = default.get_config()
  summary = {**_finished_summary(), "auroc": undefined, "noisy_precision_lowest_10pct": undefined}
  lines = reporting.summary_lines(summary, config)
  assert lines[1] == (
    "AUROC of learned rates (clean above noisy) n/a | noisy share of the 10% lowest rates n/a"
  )


def _reject_constant(name):
  raise ValueError(f"{name} is not valid JSON")


def test_write_json_writes_null_for_non_finite(tmp_path):
  path = tmp_path / "out.json"
  payload = {"nan": math.nan, "nested": {"values": [1.5, math.inf, -math.inf]}, "count": 3}
  reporting.write_json(str(path), payload)
  text = path.read_text()
  assert "NaN" not in text
  assert "Infinity" not in text
  assert json.loads(text, parse_constant=_reject_constant) == {
    "nan": None,
    "nested": {"values": [1.5, None, None]},
    "count": 3,
  }


def test_metrics_log_writes_null_for_nan(tmp_path):
  log = reporting.MetricsLog(str(tmp_path))
  log.write(5, {"train/loss": 0.25, "ddlr/alignment_mean": math.nan})
  log.close()
  line = (tmp_path / "metrics.jsonl").read_text()
  assert json.loads(line, parse_constant=_reject_constant) == {
    "step": 5,
    "train/loss": 0.25,
    "ddlr/alignment_mean": None,
  }
