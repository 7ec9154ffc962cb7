"""Bad input to the experiment scripts ends with one `error:` line, not a traceback."""

import os
import subprocess
import sys

import pytest
from absl import flags

from configs import default
from ddlr import cli
from experiments import architectures, noisy_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(module, *arguments, cwd=REPO):
  """Runs `python -m experiments.<module>` in `cwd`, importable from the repository either way."""
  command = [sys.executable, "-m", f"experiments.{module}", *arguments]
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
  }
  return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
  ("module", "arguments", "message"),
  [
    (
      "uniform_vs_ddlr",
      ["--config=configs/default.py:quick", "--config.train.batch_size=0"],
      "error: config.train.batch_size=0 is invalid; expected a value >= 1.",
    ),
    (
      "uniform_vs_ddlr",
      ["--config=configs/default.py:quick", "--config.ddlr.refrence=x"],
      "error: --config.ddlr.refrence: ddlr has no field 'refrence'; its fields are: alignment,",
    ),
    (
      # Without --config=, the override applies to the default config file.
      "uniform_vs_ddlr",
      ["--config.train.epochs=3"],
      "error: --config.train.epochs: train has no field 'epochs'; its fields are: batch_size,",
    ),
    (
      # One sweep-level error, not the ddlr row's config.ddlr.enabled conflict.
      "uniform_vs_ddlr",
      ["--config=configs/default.py:quick", "--config.baseline.name=data_parameters"],
      "error: uniform_vs_ddlr does not support config.baseline.name='data_parameters'. A "
      "baseline replaces the per-instance rates, so the ddlr row cannot train with one. Remove "
      "this setting and rerun. To compare the baselines, run experiments.noisy_comparison.",
    ),
    (
      "architectures",
      ["--dataset=fashion_mnist", "--small", "--models=small_cnn,small_cnn"],
      "error: --models lists small_cnn more than once; give each value once.",
    ),
    (
      "personalisation",
      ["--config=configs/personalisation.py:quick", "--config.train.batch_size=0"],
      "error: config.train.batch_size=0 is invalid; expected a value >= 1.",
    ),
    (
      # The flag, not the config.finetune.epochs it sets.
      "personalisation",
      ["--config=configs/personalisation.py:quick", "--finetune_epochs=-1"],
      "error: flag --finetune_epochs=-1: -1 is not a positive integer",
    ),
    (
      "personalisation",
      ["--config=configs/personalisation.py:quick", "--fraction=1.5"],
      "error: --fraction=1.5 is invalid; expected the share of training and test images",
    ),
    (
      "noisy_labels",
      ["--dataset=fashion_mnist", "--model=small_cnn", "--small", "--settings=pairflip:0.6"],
      "error: --settings has 'pairflip:0.6': noise.rate=0.6 is invalid for pairflip noise",
    ),
    (
      "hessian_spectrum",
      ["--config=configs/default.py:quick", "--config.ddlr.refrence=x"],
      "error: --config.ddlr.refrence: ddlr has no field 'refrence'; its fields are: alignment,",
    ),
    (
      "hessian_spectrum",
      ["--small", "extra", "more"],
      "error: unexpected positional arguments 'extra', 'more'; the program takes only flags "
      "(--name=value, see --help).",
    ),
  ],
)
def test_bad_input_prints_one_error_line(tmp_path, module, arguments, message):
  result = _run_script(module, f"--workdir={tmp_path / 'sweep'}", *arguments)
  assert result.returncode == 1
  [line] = _error_lines(result.stderr)
  assert line.startswith(message)
  assert "Traceback" not in result.stderr


def test_resume_conflict_prints_error_line(tmp_path):
  # A finished uniform run of the quick config with another learning rate.
  config = default.get_config("quick")
  config.seed = 0
  config.ddlr.enabled = False
  config.optimizer.learning_rate = 0.7
  run_dir = tmp_path / "uniform_seed0"
  run_dir.mkdir()
  (run_dir / "config.json").write_text(config.to_json())
  (run_dir / "summary.json").write_text('{"completed": true}')
  result = _run_script(
    "uniform_vs_ddlr", "--config=configs/default.py:quick", f"--workdir={tmp_path}"
  )
  assert result.returncode == 1
  [line] = _error_lines(result.stderr)
  assert line.startswith(f"error: {run_dir} contains a run with a different config")
  assert "config.optimizer.learning_rate: 0.7 -> 0.05" in line
  assert "Traceback" not in result.stderr
  assert (run_dir / "summary.json").read_text() == '{"completed": true}'


def test_repeated_list_entries_raise():
  with pytest.raises(ValueError, match="--models lists resnet18 more than once"):
    architectures.architecture_rows("cifar10", ["resnet18", "vgg16_bn", "resnet18"], small=True)
  with pytest.raises(ValueError, match="--settings lists symmetric:0.4 more than once"):
    noisy_labels.noise_rows("fashion_mnist", "small_cnn", ["symmetric:0.4", "symmetric:0.40"], True)


@pytest.mark.parametrize(
  ("module", "arguments"),
  [
    ("noisy_labels", ["--dataset=fashion_mnist", "--small", "--workdir="]),
    # Run outside the repository, so the default config file is missing too.
    ("hessian_spectrum", ["--small", "--workdir=  "]),
    ("uniform_vs_ddlr", ["--config=configs/default.py:quick", "--workdir="]),
  ],
)
def test_empty_workdir_prints_error_line(tmp_path, module, arguments):
  result = _run_script(module, *arguments, cwd=tmp_path)
  assert result.returncode == 1
  [line] = _error_lines(result.stderr)
  assert line == "error: --workdir is empty; give the directory for the run's outputs."
  assert "Traceback" not in result.stderr
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  ("module", "arguments"),
  [
    ("noisy_comparison", ["--size=smoke"]),
    ("uniform_vs_ddlr", ["--config=configs/default.py:quick"]),
  ],
)
def test_missing_workdir_prints_error_line(module, arguments):
  result = _run_script(module, *arguments)
  assert result.returncode == 1
  [line] = _error_lines(result.stderr)
  assert line == "error: flag --workdir=None: Flag --workdir must have a value other than None."
  assert "--workdir: Directory that receives" not in result.stderr


@pytest.mark.parametrize(
  ("module", "arguments", "message"),
  [
    (
      "noisy_comparison",
      ["--size=smoke", "--settings="],
      "error: --settings is empty; give at least one value, or leave the flag out for its "
      "default --settings=symmetric40,symmetric60,pairflip40.",
    ),
    (
      "personalisation",
      ["--config=configs/personalisation.py:quick", "--methods="],
      "error: --methods is empty; give at least one value, or leave the flag out for its default.",
    ),
  ],
)
def test_empty_list_flag_prints_error_line(tmp_path, module, arguments, message):
  result = _run_script(module, f"--workdir={tmp_path / 'sweep'}", *arguments)
  assert result.returncode == 1
  [line] = _error_lines(result.stderr)
  assert line == message
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "sweep").exists()


def _flag_values(*arguments):
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Output directory.", flag_values=flag_values)
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds.", flag_values=flag_values)
  flags.DEFINE_list("models", [], "Models.", flag_values=flag_values)
  flag_values(["program", *arguments])
  return flag_values


@pytest.mark.parametrize(
  ("arguments", "message"),
  [
    (["--workdir="], "error: --workdir is empty; give the directory for the run's outputs."),
    (["--workdir=\t "], "error: --workdir is empty; give the directory for the run's outputs."),
    (
      ["--seeds="],
      "error: --seeds is empty; give at least one value, or leave the flag out for its "
      "default --seeds=0,1.",
    ),
    (
      ["--seeds= "],
      "error: --seeds is empty; give at least one value, or leave the flag out for its "
      "default --seeds=0,1.",
    ),
    (
      ["--models=,"],
      "error: --models is empty; give at least one value, or leave the flag out for its default.",
    ),
    (
      ["--seeds=0,,1"],
      "error: --seeds=0,,1 has an empty entry; separate the values with single commas, "
      "e.g. --seeds=0,1.",
    ),
  ],
)
def test_check_flag_values_rejects_empty(capsys, arguments, message):
  flag_values = _flag_values(*arguments)
  with pytest.raises(SystemExit) as exit_info:
    cli.check_flag_values(flag_values)
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == message + "\n"


def test_check_flag_values_accepts_defaults_and_values(capsys):
  cli.check_flag_values(_flag_values())
  cli.check_flag_values(_flag_values("--workdir=runs/a", "--seeds=3", "--models=small_cnn"))
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
  ("module", "arguments", "message"),
  [
    (
      "architectures",
      ["--dataset=fashion_mnist", "--small", "--data_source=http"],
      "error: --data_source='http' is invalid; expected tfds (a tfds dataset prepared in "
      "--data_dir) or idx (the raw files in --manual_dir).",
    ),
    (
      "noisy_labels",
      ["--dataset=cifar10", "--small", "--data_source=idx"],
      "error: --data_source=idx reads the raw cifar10 files from --manual_dir, which is not "
      "given; add --manual_dir=DIR.",
    ),
    (
      "noisy_comparison",
      ["--size=smoke", "--data_dir=/nonexistent/tfds"],
      "error: --data_dir=/nonexistent/tfds is not a directory; give an existing directory of "
      "the prepared tfds datasets.",
    ),
    (
      "hessian_spectrum",
      ["--small", "--manual_dir="],
      "error: --manual_dir is empty; give the directory of the raw dataset files, or leave the "
      "flag out for the config's value.",
    ),
    (
      "hessian_spectrum",
      ["--config=configs/default.py:quick", "--data_dir=/tmp", "--config.data.data_dir=/tmp"],
      "error: --data_dir and --config.data.data_dir both set config.data.data_dir; give only "
      "one of them.",
    ),
    (
      "hessian_spectrum",
      ["--small", "--config.data.data_dir=/tmp"],
      "error: --small trains its own config; give --small or --config and its overrides, not "
      "both. --data_source, --data_dir and --manual_dir set where either reads its data.",
    ),
  ],
)
def test_bad_data_flag_prints_one_error_line(tmp_path, module, arguments, message):
  result = _run_script(module, f"--workdir={tmp_path / 'sweep'}", *arguments)
  assert result.returncode == 1
  assert _error_lines(result.stderr) == [message]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "sweep").exists()


def test_unprepared_data_names_data_flags(tmp_path):
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  result = _run_script(
    "noisy_labels",
    "--dataset=cifar10",
    "--small",
    "--settings=symmetric:0.2",
    f"--data_dir={data_dir}",
    f"--workdir={tmp_path / 'sweep'}",
  )
  assert result.returncode == 1
  assert _error_lines(result.stderr) == [
    f"error: tfds dataset cifar10 is not prepared in {data_dir} and ddlr does not download "
    "data: prepare it where a network is available (`tfds build cifar10 --data_dir=DIR`) and "
    "set config.data.data_dir to DIR, or set config.data.source='idx' and "
    "config.data.manual_dir to the directory of the raw files; this command sets "
    "config.data.source, data_dir and manual_dir with --data_source, --data_dir and "
    "--manual_dir."
  ]
  # The rejected first run removed the run folder and the sweep folder it had created.
  assert os.listdir(tmp_path) == ["tfds"]
