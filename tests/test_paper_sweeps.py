"""Tests of the paper sweeps: their rows, configs, flag errors and where they read data."""

import json
import shutil

import pytest

from experiments import architectures, noisy_labels, paper_configs
from tests.run_helpers import run_experiment
from tests.test_data import write_mnist_dir


def test_architecture_rows_pair_uniform_and_ddlr():
  rows = architectures.architecture_rows("fashion_mnist", [], small=True)
  assert [row.name for row in rows] == [
    "small_cnn_uniform", "small_cnn_ddlr", "resnet18_uniform", "resnet18_ddlr"
  ]  # fmt: skip
  assert [row.group for row in rows] == ["small_cnn", "small_cnn", "resnet18", "resnet18"]
  assert [row.config.model.name for row in rows] == [
    "small_cnn", "small_cnn", "resnet18", "resnet18"
  ]  # fmt: skip
  assert [row.config.ddlr.enabled for row in rows] == [False, True, False, True]
  assert all(row.config.data.noise.kind == "none" for row in rows)
  assert all(row.config.train.num_epochs == 2 for row in rows)


def test_architecture_rows_cover_every_cifar_model():
  rows = architectures.architecture_rows("cifar100", [], small=False)
  assert len(rows) == 2 * 6
  assert {row.config.data.name for row in rows} == {"cifar100"}
  assert {row.config.train.num_epochs for row in rows} == {200}
  selected = architectures.architecture_rows("cifar10", ["vgg16_bn"], small=False)
  assert [row.name for row in selected] == ["vgg16_bn_uniform", "vgg16_bn_ddlr"]


def test_architecture_rows_reject_unknown_model():
  with pytest.raises(ValueError, match=r"--models has wide_resnet, which fashion_mnist does not"):
    architectures.architecture_rows("fashion_mnist", ["wide_resnet"], small=True)
  with pytest.raises(ValueError, match=r"--dataset='svhn' is invalid"):
    architectures.architecture_rows("svhn", [], small=True)


def test_noise_rows_follow_settings():
  settings = ["symmetric:0.2", "pairflip:0.4"]
  rows = noisy_labels.noise_rows("cifar10", "resnet18", settings, small=True)
  assert [row.name for row in rows] == [
    "symmetric0.2_uniform", "symmetric0.2_ddlr", "pairflip0.4_uniform", "pairflip0.4_ddlr"
  ]  # fmt: skip
  assert [row.group for row in rows] == ["symmetric 0.2"] * 2 + ["pairflip 0.4"] * 2
  noise = [(row.config.data.noise.kind, row.config.data.noise.rate) for row in rows]
  assert noise == [("symmetric", 0.2)] * 2 + [("pairflip", 0.4)] * 2
  assert [row.config.ddlr.enabled for row in rows] == [False, True, False, True]
  assert [row.config.ddlr.instance_rates for row in rows] == [False, True, False, True]


def test_default_settings_are_the_paper_table():
  parsed = [noisy_labels.parse_setting(text) for text in noisy_labels.DEFAULT_SETTINGS]
  assert parsed == [
    ("symmetric", 0.2), ("symmetric", 0.4), ("symmetric", 0.6), ("symmetric", 0.8),
    ("pairflip", 0.4),
  ]  # fmt: skip


@pytest.mark.parametrize(
  ("text", "message"),
  [
    ("symmetric", r"expected kind:rate"),
    ("uniform:0.4", r"expected kind:rate with kind one of symmetric, pairflip"),
    ("pairflip:x", r"the rate 'x' is not a number"),
    ("symmetric:1.0", r"expected a rate in \(0, 1\)"),
    ("pairflip:0.5", r"'pairflip:0.5': noise.rate=0.5 is invalid for pairflip noise"),
  ],
)
def test_parse_setting_rejects_bad_text(text, message):
  with pytest.raises(ValueError, match=message):
    noisy_labels.parse_setting(text)


def test_noise_rows_reject_model_of_other_dataset():
  with pytest.raises(ValueError, match=r"--model='small_cnn' is invalid for cifar10"):
    noisy_labels.noise_rows("cifar10", "small_cnn", ["symmetric:0.4"], small=True)


def test_build_config_rejects_unknown_method():
  with pytest.raises(ValueError, match=r"method 'oracle' is unknown"):
    paper_configs.build_config("cifar10", "resnet18", "oracle")


def test_architectures_train_on_idx_files(tmp_path):
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  # The small configs read 612 training and 256 test examples.
  write_mnist_dir(str(raw_dir), num_train=612, num_test=256)
  empty_tfds = tmp_path / "tfds"
  empty_tfds.mkdir()
  sweep_dir = tmp_path / "sweep"
  arguments = ["--dataset=fashion_mnist", "--models=small_cnn", "--small", "--data_source=idx"]
  # No tfds dataset is prepared, so only the raw files can give a result.
  env = {"TFDS_DATA_DIR": str(empty_tfds)}

  result = run_experiment(
    "architectures", *arguments, f"--manual_dir={raw_dir}", f"--workdir={sweep_dir}", env=env
  )
  assert result.returncode == 0, result.stderr[-2000:]
  for method in ("uniform", "ddlr"):
    saved = json.loads((sweep_dir / f"small_cnn_{method}_seed0" / "config.json").read_text())
    assert saved["data"]["source"] == "idx"
    assert saved["data"]["manual_dir"] == str(raw_dir)
  table = (sweep_dir / "results.md").read_text()
  assert "| small_cnn_uniform |" in table
  assert "| small_cnn_ddlr |" in table

  # The same files in another directory: both finished runs are reused as they are.
  moved_dir = tmp_path / "moved"
  shutil.copytree(raw_dir, moved_dir)
  result = run_experiment(
    "architectures", *arguments, f"--manual_dir={moved_dir}", f"--workdir={sweep_dir}", env=env
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stderr.count("Reusing the finished run in") == 2
  assert (sweep_dir / "results.md").read_text() == table


@pytest.mark.parametrize(
  ("module", "arguments", "num_train"),
  [
    ("noisy_labels", ["--dataset=fashion_mnist", "--small", "--settings=symmetric:0.4"], 612),
    ("noisy_comparison", ["--size=smoke", "--settings=pairflip40", "--seeds=0"], 1024),
    ("hessian_spectrum", ["--small"], 8000),
  ],
)
def test_data_flags_reach_runs(tmp_path, module, arguments, num_train):
  # 300 training examples are fewer than every config reads, so the error shows
  # that the run read these files.
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  write_mnist_dir(str(raw_dir), num_train=300, num_test=50)
  result = run_experiment(
    module,
    *arguments,
    "--data_source=idx",
    f"--manual_dir={raw_dir}",
    f"--workdir={tmp_path / 'sweep'}",
  )
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert errors == [
    f"error: config.data.num_train={num_train} exceeds the 300 examples of the fashion_mnist "
    "'train' split; set it to at most 300, or to 0 for the whole split"
  ]
  assert not (tmp_path / "sweep").exists()
