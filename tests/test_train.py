"""End-to-end runs of `train_and_evaluate` on mocked tfds data."""

import json
import math
import os
import types

import flax.errors
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddlr import models, optim, summary, train
from ddlr.config_checks import ConfigError, validate_config
from ddlr.data import DataError
from tests.run_helpers import tiny_config


def test_ddlr_run_writes_every_output(tmp_path):
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=100):
    summary = train.train_and_evaluate(tiny_config(), workdir)

  expected_files = [
      "config.json", "split_record.npz", "metrics.jsonl", "rates.npz",
      "rates_histogram.png", "summary.json",
  ]  # fmt: skip
  for name in expected_files:
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))

  # 90 training instances after holding out 10, batch 32: two steps of 32.
  rates = np.load(os.path.join(workdir, "rates.npz"))
  assert rates["log_lr"].shape == (90,)
  assert np.count_nonzero(rates["log_lr"]) == 64
  # Without class rates class_log_lr is empty, and rate is exp(log_lr) alone.
  assert rates["class_log_lr"].shape == (0,)
  np.testing.assert_array_equal(rates["rate"], np.exp(rates["log_lr"]))
  np.testing.assert_array_equal(rates["is_noisy"], rates["labels"] != rates["true_labels"])
  assert 0.0 <= summary["last_epoch_test_accuracy"] <= 1.0
  assert summary["best_epoch_test_accuracy"] >= summary["last_epoch_test_accuracy"]
  assert 0.0 <= summary["auroc"] <= 1.0
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["auroc"] == summary["auroc"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  assert [r["eval/accuracy"] for r in records if "eval/accuracy" in r] == [
    summary["last_epoch_test_accuracy"]
  ]


def test_uniform_baseline_run(tmp_path):
  workdir = str(tmp_path / "uniform")
  with tfds.testing.mock_data(num_examples=100):
    summary = train.train_and_evaluate(tiny_config(**{"ddlr.enabled": False}), workdir)
  assert "auroc" not in summary
  assert not os.path.exists(os.path.join(workdir, "rates.npz"))
  assert 0.0 <= summary["last_epoch_test_accuracy"] <= 1.0


def test_non_finite_loss_stops_and_keeps_outputs(tmp_path):
  workdir = str(tmp_path / "diverged")
  config = tiny_config(**{"optimizer.learning_rate": 1e30, "optimizer.schedule": "constant"})
  with tfds.testing.mock_data(num_examples=100):
    with pytest.raises(train.NonFiniteLossError, match=r"at step \d+ \(epoch 1\)"):
      train.train_and_evaluate(config, workdir)
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.path.exists(os.path.join(workdir, "split_record.npz"))


def test_non_finite_rates_named():
  metrics = {
    "train/loss": 816432212344832.0, "train/grad_norm": 1.1e12, "train/update_norm": 1.1e16,
    "ddlr/rates_finite": False,
  }  # fmt: skip
  message = r"non-finite per-instance or class rates of the batch at step 3 \(epoch 1\): loss="
  with pytest.raises(train.NonFiniteLossError, match=message):
    train._check_finite([metrics], first_step=2, epoch=1)


def test_non_finite_loss_named():
  metrics = {"train/loss": math.nan, "train/grad_norm": 1.0, "train/update_norm": math.inf}
  with pytest.raises(
    train.NonFiniteLossError, match=r"non-finite loss, update at step 1 \(epoch 1\): loss=nan"
  ):
    train._check_finite([metrics], first_step=0, epoch=1)


@pytest.mark.parametrize(
  ("path", "value", "message"),
  [
    ("ddlr.reference", "oracle", r"config.ddlr.reference='oracle' is invalid"),
    ("ddlr.alignment", "exact", r"config.ddlr.alignment='exact' is invalid"),
    ("ddlr.split_batch_stats", "ghost", r"config.ddlr.split_batch_stats='ghost' is invalid"),
    ("ddlr.split_batch_stats", "half", r"'half' applies only to reference='split', got reference="),
    (
      "ddlr.split_sequential",
      True,
      r"split_sequential=True applies only to reference='split', got",
    ),
    ("optimizer.name", "lion", r"config.optimizer.name='lion' is invalid"),
    ("train.batch_size", 0, r"config.train.batch_size=0 is invalid"),
    ("seed", -1, r"config.seed=-1 is invalid; expected a value in \[0, 4294967295\]"),
    ("seed", 2**32, r"config.seed=4294967296 is invalid; expected a value in \[0, 4294967295\]"),
    ("model.width", 0, r"config.model.width=0 is invalid; expected a value >= 1"),
    ("optimizer.learning_rate", float("nan"), r"learning_rate=nan is invalid; expected a finite"),
    ("optimizer.warmup_epochs", 5.0, r"warmup_epochs=5.0 exceeds config.train.num_epochs=1"),
    ("ddlr.hyper_momentum", 1.0, r"hyper_momentum=1.0 is invalid; expected a value in \[0, 1\)"),
    ("ddlr.log_lr_min", 3.0, r"invalid config.ddlr setting: log_lr_min must be below log_lr_max"),
    ("optimizer.b1", 1.0, r"config.optimizer.b1=1.0 is invalid; expected a value in \[0, 1\)"),
    ("optimizer.b2", 1.5, r"config.optimizer.b2=1.5 is invalid; expected a value in \[0, 1\)"),
    ("optimizer.eps", -1.0, r"config.optimizer.eps=-1.0 is invalid; expected a finite value > 0"),
    ("optimizer.eps", 0.0, r"config.optimizer.eps=0.0 is invalid; expected a finite value > 0"),
    ("model.name", "resnet18", r"resnet18 does not take the field batch_norm of config.model"),
  ],
)
def test_invalid_config_value_raises(tmp_path, path, value, message):
  with pytest.raises(ConfigError, match=message):
    with tfds.testing.mock_data(num_examples=100):
      train.train_and_evaluate(tiny_config(**{path: value}), str(tmp_path))


@pytest.mark.parametrize(
  ("overrides", "error", "message"),
  [
    # 100 mocked examples, 10 of them held out as the reference split.
    ({"train.batch_size": 91}, DataError, r"batch_size=91 exceeds the 90 training instances"),
    (
      {"ddlr.reference_batch_size": 11},
      ConfigError,
      r"reference_batch_size=11 is larger than the reference split \(10 examples\)",
    ),
  ],
)
def test_oversized_batch_writes_no_split_record(tmp_path, overrides, error, message):
  with pytest.raises(error, match=message):
    with tfds.testing.mock_data(num_examples=100):
      train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not (tmp_path / "split_record.npz").exists()
  assert not (tmp_path / "config.json").exists()
  assert not (tmp_path / "checkpoints").exists()


def test_reused_reference_rejects_current_point():
  config = tiny_config(**{"ddlr.reference_every_steps": 4, "ddlr.reference_at": "current"})
  with pytest.raises(ConfigError, match=r"reference_at='current' applies only to"):
    validate_config(config)


@pytest.mark.parametrize("reference", ["split", "momentum", "batch"])
def test_reuse_rejects_other_references(reference):
  config = tiny_config(**{"ddlr.reference_every_steps": 4, "ddlr.reference": reference})
  message = f"reference_every_steps=4 is invalid with config.ddlr.reference='{reference}'"
  with pytest.raises(ConfigError, match=message):
    validate_config(config)


def test_workdir_that_is_a_file_raises(tmp_path):
  path = tmp_path / "file"
  path.write_text("")
  with pytest.raises(ConfigError, match=r"exists and is not a directory"):
    train.train_and_evaluate(tiny_config(), str(path))


def test_class_rates_only_report_no_auroc(tmp_path):
  config = tiny_config(**{"ddlr.class_rates": True, "ddlr.instance_rates": False})
  with tfds.testing.mock_data(num_examples=100):
    summary = train.train_and_evaluate(config, str(tmp_path))
  assert "auroc" not in summary
  rates = np.load(tmp_path / "rates.npz")
  assert rates["class_log_lr"].shape == (10,)
  expected = np.exp(rates["class_log_lr"][rates["labels"]])
  np.testing.assert_allclose(rates["rate"], expected, rtol=1e-6)


def test_layerwise_alignment_on_batch_norm_rejected(tmp_path):
  config = tiny_config(**{"model.batch_norm": True, "ddlr.alignment": "layerwise"})
  with tfds.testing.mock_data(num_examples=100):
    with pytest.raises(ConfigError, match=r"alignment='layerwise' does not apply: .*BatchNorm"):
      train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "config.json").exists()


class _DropoutModel(nn.Module):
  """A dense classifier with dropout, which needs a PRNG key in training mode."""

  num_classes: int
  width: int = 4
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Dense(self.width)(x.reshape((x.shape[0], -1)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


@pytest.mark.parametrize("enabled", [True, False])
def test_dropout_model_rejected(tmp_path, monkeypatch, enabled):
  monkeypatch.setitem(models.MODELS, "dropout_mlp", _DropoutModel)
  config = tiny_config(**{"model.name": "dropout_mlp", "ddlr.enabled": enabled})
  with tfds.testing.mock_data(num_examples=100):
    with pytest.raises(ConfigError) as raised:
      train.train_and_evaluate(config, str(tmp_path))

  cause = raised.value.__cause__
  assert isinstance(cause, flax.errors.InvalidRngError)
  assert 'Dropout_0 needs PRNG for "dropout"' in str(cause)
  assert str(raised.value) == (
    f"config.model.name='dropout_mlp' draws random numbers in training mode ({cause}). ddlr "
    "applies models without a PRNG key, so its models must not draw random numbers in "
    "training mode. Remove nn.Dropout and other random layers."
  )


def test_histogram_groups_follow_target():
  data = types.SimpleNamespace(
    target_kind="none",
    is_target_domain=np.array([False, False, False]),
    is_noisy=np.array([False, True, False]),
  )
  groups = summary._histogram_groups(data)
  assert [name for name, _ in groups] == ["clean", "noisy"]
  np.testing.assert_array_equal(groups[0][1], [True, False, True])
  np.testing.assert_array_equal(groups[1][1], [False, True, False])

  data.target_kind, data.is_target_domain = "transform", np.array([True, False, False])
  groups = summary._histogram_groups(data)
  assert [name for name, _ in groups] == ["rest", "target domain"]
  np.testing.assert_array_equal(groups[0][1], [False, True, True])
  np.testing.assert_array_equal(groups[1][1], [True, False, False])


def test_histogram_title_and_axis_label():
  config = tiny_config(**{"data.noise.kind": "none", "data.noise.rate": 0.0})
  assert summary._histogram_title(config.data) == f"{config.data.name}, clean labels"
  config = tiny_config(**{"data.noise.kind": "symmetric", "data.noise.rate": 0.4})
  config.data.target.kind = "classes"
  config.data.target.classes = (2, 4, 6)
  expected = f"{config.data.name}, symmetric noise 0.4, target: classes 2, 4, 6"
  assert summary._histogram_title(config.data) == expected
  config.data.target.kind, config.data.target.classes = "transform", ()
  config.data.target.transform, config.data.target.fraction = "rot90", 0.1
  expected = f"{config.data.name}, symmetric noise 0.4, target: rot90 on 10% of images"
  assert summary._histogram_title(config.data) == expected

  table = jnp.zeros(3)
  both = optim.DdlrState(jnp.zeros([]), table, None, table, None, jnp.zeros([]), ())
  assert summary._histogram_label(both) == "learned log multiplier a_i + b_y (instance plus class)"
  assert "a_i (log_lr)" in summary._histogram_label(both._replace(class_log_lr=None))
  assert "class multiplier b_y" in summary._histogram_label(both._replace(log_lr=None))


def test_rejected_run_removes_new_workdir(tmp_path):
  workdir = tmp_path / "sweep" / "uniform_seed0"
  with pytest.raises(DataError, match=r"batch_size=91 exceeds the 90 training instances"):
    with tfds.testing.mock_data(num_examples=100):
      train.train_and_evaluate(tiny_config(**{"train.batch_size": 91}), str(workdir))
  # Both the run folder and the sweep folder were created for the run, and are empty.
  assert os.listdir(tmp_path) == []


def test_rejected_run_keeps_existing_workdir(tmp_path):
  # An empty workdir that the user made is theirs, so it stays.
  workdir = tmp_path / "uniform_seed0"
  workdir.mkdir()
  with pytest.raises(DataError, match=r"batch_size=91 exceeds the 90 training instances"):
    with tfds.testing.mock_data(num_examples=100):
      train.train_and_evaluate(tiny_config(**{"train.batch_size": 91}), str(workdir))
  assert workdir.is_dir()
  assert os.listdir(workdir) == []
