"""`train_and_evaluate` with augmentation: mocked CIFAR-10 in memory, mocked ImageNet streamed."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddlr import train
from ddlr.config_checks import ConfigError
from tests.run_helpers import tiny_config


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_cifar10_crop_flip_run(tmp_path):
  config = tiny_config(**{"data.name": "cifar10", "data.augmentation": "crop_flip"})
  with tfds.testing.mock_data(num_examples=100):
    summary = train.train_and_evaluate(config, str(tmp_path))

  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["last_epoch_test_accuracy"] == summary["last_epoch_test_accuracy"]
  # 90 training instances after holding out 10, batch 32: two steps of 32.
  assert [r["step"] for r in _records(tmp_path) if "train/loss" in r] == [1, 2]
  rates = np.load(tmp_path / "rates.npz")
  assert np.count_nonzero(rates["log_lr"]) == 64


def test_imagenet_inception_crop_run(tmp_path):
  config = tiny_config(
    **{
      "data.name": "imagenet2012",
      "data.augmentation": "inception_crop",
      "data.image_size": 32,
      # The mock draws labels from 1,000 classes, too few per class for a balanced split.
      "data.reference_size": 0,
      "ddlr.reference": "batch",
      "train.batch_size": 16,
      "eval.batch_size": 16,
    }
  )
  with tfds.testing.mock_data(num_examples=40):
    summary = train.train_and_evaluate(config, str(tmp_path))

  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["last_epoch_test_accuracy"] == summary["last_epoch_test_accuracy"]
  records = _records(tmp_path)
  # 40 training instances, batch 16: two steps, and every one of their 32 ids gets a rate.
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  rates = np.load(tmp_path / "rates.npz")
  assert rates["log_lr"].shape == (40,)
  assert np.count_nonzero(rates["log_lr"]) == 32
  # Evaluation covers all 40 validation examples of the mock, in batches of 16, 16 and 8.
  assert [r["eval/examples"] for r in records if "eval/examples" in r] == [40]


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"data.augmentation": "mixup"}, r"config.data.augmentation='mixup' is invalid"),
    ({"data.image_size": 0}, r"config.data.image_size=0 is invalid; expected a value >= 1"),
    (
      {"data.name": "cifar10", "data.augmentation": "inception_crop"},
      r"'inception_crop' is invalid for config.data.name='cifar10'",
    ),
    (
      {"data.name": "imagenet2012", "data.augmentation": "crop_flip"},
      r"'crop_flip' is invalid for imagenet2012",
    ),
  ],
)
def test_invalid_augmentation_raises(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
