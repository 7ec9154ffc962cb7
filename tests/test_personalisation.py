"""Tests of personalisation: target samples, domain masks, target evaluation and fine-tuning.

Data tests read small random MNIST-shaped IDX files; run tests use mocked
tfds data. Nothing is downloaded.
"""

import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_data import make_config, write_mnist_dir

from ddlr import analysis, checkpoint, reporting, train
from ddlr import data as data_lib
from ddlr.config_checks import ConfigError
from tests.run_helpers import tiny_config

FOOTWEAR = (5, 7, 9)


@pytest.fixture
def raw_dir(tmp_path):
  """Write random IDX files; return their directory and the uint8 arrays in source order."""
  directory = str(tmp_path)
  write_mnist_dir(directory, num_train=300, num_test=50)
  raw = {}
  for split in ("train", "test"):
    images, labels, _ = data_lib.load_split(
      "mnist", split, source="idx", data_dir=None, manual_dir=directory
    )
    raw[split] = (images, labels)
  return directory, raw


def _load(directory, **target):
  config = make_config(name="mnist", source="idx", manual_dir=directory, reference_size=100)
  for field, value in target.items():
    config.target[field] = value
  return data_lib.load_dataset(config)


def _classes(directory, classes=FOOTWEAR, sample_size=12):
  return _load(directory, kind="classes", classes=classes, sample_size=sample_size)


def _transform(directory, transform="rot90", fraction=0.1, sample_size=20):
  return _load(
    directory, kind="transform", transform=transform, fraction=fraction, sample_size=sample_size
  )


def _normalize(raw_images):
  return data_lib.normalize_images(raw_images, data_lib.get_spec("mnist"))


def test_target_sample_never_in_training(raw_dir):
  directory, raw = raw_dir
  for data in (_classes(directory), _transform(directory)):
    assert not set(data.source_index) & set(data.reference_source_index)
    # Every source example is used at most once, and training keeps its 200.
    assert len(set(data.source_index)) == len(data.source_index) == 200
  classes = _classes(directory)
  assert len(classes.reference_labels) == 12
  assert set(classes.reference_labels.tolist()) <= set(FOOTWEAR)
  np.testing.assert_array_equal(
    classes.reference_labels, raw["train"][1][classes.reference_source_index]
  )


def test_switching_target_changes_only_reference(raw_dir):
  directory, _ = raw_dir
  plain = _load(directory)
  footwear = _classes(directory)
  others = _classes(directory, classes=(0, 1), sample_size=0)
  for data in (footwear, others):
    for field in ("images", "labels", "true_labels", "is_noisy", "source_index", "test_images"):
      np.testing.assert_array_equal(getattr(data, field), getattr(plain, field), err_msg=field)
  # The reference pool is the plain run's reference; each target draws from it.
  assert set(footwear.reference_source_index) <= set(plain.reference_source_index)
  assert len(plain.reference_labels) == 100
  # sample_size 0 keeps every pool example of classes 0 and 1: 10 per class.
  assert len(others.reference_labels) == 20
  assert set(others.reference_labels.tolist()) == {0, 1}


def test_transform_target_changes_only_masked_images(raw_dir):
  # Against the class target, the transform target keeps ids, labels and
  # source indices; training images differ exactly at its domain mask,
  # where they are the rotated originals.
  directory, raw = raw_dir
  footwear = _classes(directory)
  rotated = _transform(directory)
  for field in ("labels", "true_labels", "is_noisy", "source_index"):
    np.testing.assert_array_equal(getattr(rotated, field), getattr(footwear, field), err_msg=field)
  mask = rotated.is_target_domain
  np.testing.assert_array_equal(rotated.images[~mask], footwear.images[~mask])
  expected = _normalize(np.rot90(raw["train"][0][rotated.source_index[mask]], axes=(1, 2)))
  np.testing.assert_array_equal(rotated.images[mask], expected)


@pytest.mark.parametrize("transform", ["rot90", "invert"])
def test_transform_applies_to_recorded_fraction(raw_dir, transform):
  directory, raw = raw_dir
  data = _transform(directory, transform=transform, fraction=0.1)
  images, labels = raw["train"]
  assert data.is_target_domain.sum() == 20  # round(0.1 * 200)
  assert data.test_is_target.sum() == 5  # round(0.1 * 50)
  untransformed = _normalize(images[data.source_index])
  changed = np.any(data.images != untransformed, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, data.is_target_domain)
  if transform == "invert":
    expected_reference = _normalize(255 - images[data.reference_source_index])
  else:
    expected_reference = _normalize(np.rot90(images[data.reference_source_index], axes=(1, 2)))
  np.testing.assert_array_equal(data.reference_images, expected_reference)
  test_changed = np.any(data.test_images != _normalize(raw["test"][0]), axis=(1, 2, 3))
  np.testing.assert_array_equal(test_changed, data.test_is_target)
  np.testing.assert_array_equal(data.test_labels, raw["test"][1])


def test_target_and_rest_partition_test_set(raw_dir):
  directory, raw = raw_dir
  test_labels = raw["test"][1]
  classes = _classes(directory)
  np.testing.assert_array_equal(classes.test_is_target, np.isin(test_labels, FOOTWEAR))
  np.testing.assert_array_equal(classes.is_target_domain, np.isin(classes.true_labels, FOOTWEAR))
  assert classes.test_is_target.sum() == 15  # 5 test examples of each footwear class
  transform = _transform(directory)
  assert len(transform.test_is_target) == len(transform.test_labels) == 50


def test_train_on_target_sample_trains_on_it(raw_dir):
  directory, _ = raw_dir
  data = _load(
    directory, kind="classes", classes=FOOTWEAR, sample_size=12, train_on="target_sample"
  )
  np.testing.assert_array_equal(data.images, data.reference_images)
  np.testing.assert_array_equal(data.labels, data.reference_labels)
  np.testing.assert_array_equal(data.source_index, data.reference_source_index)
  assert data.is_target_domain.all()
  assert not data.is_noisy.any()


def test_split_record_stores_domain_masks(raw_dir, tmp_path):
  directory, _ = raw_dir
  data = _transform(directory)
  path = tmp_path / "split_record.npz"
  data_lib.save_split_record(data, path)
  record = data_lib.load_split_record(path)
  assert record.target_kind == "transform"
  np.testing.assert_array_equal(record.is_target_domain, data.is_target_domain)
  np.testing.assert_array_equal(record.test_is_target, data.test_is_target)


@pytest.mark.parametrize(
  ("target", "message"),
  [
    ({"kind": "shift"}, r"unknown target.kind 'shift'"),
    ({"kind": "classes"}, r"target.kind 'classes' needs target.classes"),
    ({"kind": "classes", "classes": (5, 10)}, r"target.classes must be in \[0, 10\)"),
    ({"kind": "classes", "classes": (5, 5)}, r"target.classes must be distinct"),
    ({"kind": "classes", "classes": tuple(range(10))}, r"lists every class"),
    ({"kind": "classes", "classes": (5,), "sample_size": 11}, r"sample_size=11 exceeds the 10"),
    ({"kind": "transform", "fraction": 0.1}, r"needs target.transform, one of rot90, invert"),
    ({"kind": "transform", "transform": "rot90"}, r"needs target.fraction in \(0, 1\)"),
    ({"kind": "transform", "transform": "rot90", "fraction": 1.0}, r"fraction must be a number"),
    ({"fraction": 0.2}, r"target.fraction=0.2 needs a target distribution"),
    ({"kind": "none", "train_on": "target_sample"}, r"train_on='target_sample' needs a target"),
  ],
)
def test_invalid_target_config_raises(raw_dir, target, message):
  directory, _ = raw_dir
  with pytest.raises(data_lib.DataError, match=message):
    _load(directory, **target)


def test_target_without_reference_pool_raises(raw_dir):
  directory, _ = raw_dir
  config = make_config(name="mnist", source="idx", manual_dir=directory, reference_size=0)
  config.target.kind = "classes"
  config.target.classes = FOOTWEAR
  with pytest.raises(data_lib.DataError, match=r"but reference_size is 0"):
    data_lib.load_dataset(config)


def _data_config_with_target(sizes, target):
  config = make_config(name="mnist", source="idx", manual_dir=None, reference_size=100, **sizes)
  for field, value in target.items():
    config.target[field] = value
  return config


ROT90 = {"kind": "transform", "transform": "rot90"}


@pytest.mark.parametrize(
  ("sizes", "target", "message"),
  [
    (
      {"num_test": 500},
      {**ROT90, "fraction": 0.0001},
      "config.data.target.fraction=0.0001 marks round(0.0001 * 500) = 0 of the 500 test images, "
      "so the target test set is empty; set it to at least 1/500 = 0.002, or use more test "
      "images (config.data.num_test)",
    ),
    (
      {"num_test": 10},
      {**ROT90, "fraction": 0.96},
      "config.data.target.fraction=0.96 marks round(0.96 * 10) = 10 of the 10 test images, so "
      "the rest of the test set is empty; set it to at most 9/10 = 0.9",
    ),
    (
      # 20 training images are left after the 100-example reference pool.
      {"num_train": 120},
      {**ROT90, "fraction": 0.02},
      "config.data.target.fraction=0.02 marks round(0.02 * 20) = 0 of the 20 training images, "
      "so the target training set is empty; set it to at least 1/20 = 0.05",
    ),
    (
      {},
      {"kind": "classes", "classes": (5,), "sample_size": 11},
      "config.data.target.sample_size=11 exceeds the 10 examples of the target classes (5,) in "
      "the reference pool of 100",
    ),
    (
      {},
      {**ROT90, "fraction": 0.1, "sample_size": 101},
      "config.data.target.sample_size=101 exceeds the 100 examples in the reference pool of 100",
    ),
    (
      {},
      {**ROT90, "fraction": 1.5},
      "invalid config.data: target.fraction must be a number in [0, 1), got 1.5",
    ),
  ],
)
def test_check_config_rejects_target_sizes(sizes, target, message):
  # manual_dir is None, so the check passes or fails without reading any data.
  with pytest.raises(data_lib.DataError, match=re.escape(message)):
    data_lib.check_config(_data_config_with_target(sizes, target))


def test_fraction_marking_no_test_image_raises_at_load(raw_dir):
  directory, _ = raw_dir
  config = make_config(name="mnist", source="idx", manual_dir=directory, reference_size=100)
  for field, value in {**ROT90, "fraction": 0.005}.items():
    config.target[field] = value
  # num_test is 0, so only the loaded split (50 test images) shows that
  # round(0.005 * 50) = 0. Training keeps round(0.005 * 200) = 1 image.
  data_lib.check_config(config)
  message = (
    "config.data.target.fraction=0.005 marks round(0.005 * 50) = 0 of the 50 test images, so "
    "the target test set is empty; set it to at least 1/50 = 0.02"
  )
  with pytest.raises(data_lib.DataError, match=re.escape(message)):
    data_lib.load_dataset(config)


@pytest.mark.parametrize(
  ("classes", "message"),
  [
    (
      FOOTWEAR,
      "none of the 5 test examples is of config.data.target.classes=(5, 7, 9), so the target "
      "test set is empty; use more test examples (config.data.num_test) or other target classes",
    ),
    (
      (0, 1, 2, 3, 4),
      "all 5 test examples are of config.data.target.classes=(0, 1, 2, 3, 4), so the rest of "
      "the test set is empty",
    ),
  ],
)
def test_classes_missing_from_test_split_raise_at_load(tmp_path, classes, message):
  # The 5 test examples have the labels 0 to 4.
  directory = str(tmp_path)
  write_mnist_dir(directory, num_train=300, num_test=5)
  config = make_config(name="mnist", source="idx", manual_dir=directory, reference_size=100)
  config.target.kind = "classes"
  config.target.classes = classes
  with pytest.raises(data_lib.DataError, match=re.escape(message)):
    data_lib.load_dataset(config)


def test_empty_target_test_set_raises_before_training(tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config()
  for field, value in {**ROT90, "fraction": 0.004}.items():
    config.data.target[field] = value
  # The 100 mocked test images give round(0.004 * 100) = 0 target test images.
  with tfds.testing.mock_data(num_examples=100):
    with pytest.raises(data_lib.DataError, match=r"round\(0.004 \* 100\) = 0 of the 100 test"):
      train.train_and_evaluate(config, str(workdir))
  assert not (workdir / "split_record.npz").exists()
  assert not (workdir / "metrics.jsonl").exists()


def _target_config(**overrides):
  config = tiny_config(**overrides)
  config.data.reference_size = 20
  config.data.target.kind = "classes"
  config.data.target.classes = FOOTWEAR
  # The 20-example pool contains 6 footwear examples, all in the reference split.
  config.ddlr.reference_batch_size = 4
  return config


def _weighted_accuracy(summary, data):
  target_count = data.test_is_target.sum()
  rest_count = len(data.test_is_target) - target_count
  total = (
    target_count * summary["final_target_test_accuracy"]
    + rest_count * summary["final_rest_test_accuracy"]
  )
  return total / len(data.test_is_target)


def test_finetune_runs_and_repeats_on_resume(tmp_path, caplog):
  workdir = str(tmp_path / "finetune")
  config = _target_config(**{"ddlr.enabled": False})
  config.finetune.epochs = 2
  caplog.set_level("INFO", logger="absl")
  with tfds.testing.mock_data(num_examples=100):
    summary = train.train_and_evaluate(config, workdir)
    assert "Fine-tuning on the 6-example target sample for 2 epochs, batch 6." in caplog.messages
    data = data_lib.load_dataset(config.data)
    repeated = train.train_and_evaluate(config, workdir)
    config.finetune.epochs = 3
    with pytest.raises(checkpoint.ResumeError, match=r"config.finetune.epochs: 2 -> 3"):
      train.train_and_evaluate(config, workdir)

  assert len(summary["finetune_test_accuracy_per_epoch"]) == 2
  assert len(summary["finetune_target_test_accuracy_per_epoch"]) == 2
  assert summary["final_test_accuracy"] == summary["finetune_test_accuracy_per_epoch"][-1]
  assert (
    summary["final_target_test_accuracy"]
    == (summary["finetune_target_test_accuracy_per_epoch"][-1])
  )
  # Target and rest partition the test set, so their weighted accuracies add up.
  assert summary["final_test_accuracy"] == pytest.approx(_weighted_accuracy(summary, data))
  # The rerun of the finished run returns its summary, fine-tuning included.
  for key in ("finetune_test_accuracy_per_epoch", "finetune_target_test_accuracy_per_epoch"):
    assert repeated[key] == summary[key], key


def test_finetune_without_target_uses_reference_split(tmp_path, caplog):
  config = tiny_config(**{"ddlr.enabled": False, "finetune.epochs": 2})
  caplog.set_level("INFO", logger="absl")
  with tfds.testing.mock_data(num_examples=100):
    summary = train.train_and_evaluate(config, str(tmp_path))

  assert "Fine-tuning on the 10-example reference split for 2 epochs, batch 10." in caplog.messages
  assert summary["final_test_accuracy"] == summary["finetune_test_accuracy_per_epoch"][-1]
  assert reporting.summary_lines(summary, config)[1] == (
    f"test accuracy after fine-tuning {summary['final_test_accuracy']:.4f} "
    "(2 epochs on the reference split)"
  )


def test_ddlr_run_reports_target_and_domain_auroc(tmp_path):
  workdir = str(tmp_path / "ddlr")
  with tfds.testing.mock_data(num_examples=100):
    summary = train.train_and_evaluate(_target_config(), workdir)
    data = data_lib.load_dataset(_target_config().data)

  assert summary["last_epoch_target_test_accuracy"] == summary["final_target_test_accuracy"]
  assert summary["target_test_accuracy_per_epoch"] == [summary["last_epoch_target_test_accuracy"]]
  assert summary["last_epoch_test_accuracy"] == pytest.approx(_weighted_accuracy(summary, data))
  rates = np.load(os.path.join(workdir, "rates.npz"))
  np.testing.assert_array_equal(rates["is_target_domain"], np.isin(data.true_labels, FOOTWEAR))
  expected = analysis.auroc(np.log(rates["rate"]), rates["is_target_domain"])
  assert summary["target_domain_auroc"] == pytest.approx(expected)
  record = data_lib.load_split_record(os.path.join(workdir, "split_record.npz"))
  np.testing.assert_array_equal(record.is_target_domain, rates["is_target_domain"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["eval/target_test_accuracy"] for r in records if "epoch" in r] == [
    summary["last_epoch_target_test_accuracy"]
  ]


def _reject_constant(name):
  raise ValueError(f"{name} is not valid JSON")


def test_target_sample_run_writes_valid_json(tmp_path):
  # Training on the footwear sample leaves the other classes without training instances.
  config = _target_config(**{"train.batch_size": 4})
  config.data.target.train_on = "target_sample"
  config.data.noise.kind = "none"
  config.data.noise.rate = 0.0
  workdir = tmp_path / "target_only"
  with tfds.testing.mock_data(num_examples=100):
    train.train_and_evaluate(config, str(workdir))

  summary = json.loads((workdir / "summary.json").read_text(), parse_constant=_reject_constant)
  assert summary["class_0_mean_rate"] is None
  assert [summary[f"class_{label}_mean_rate"] > 0 for label in FOOTWEAR] == [True, True, True]


def test_finetune_without_reference_raises(tmp_path):
  config = tiny_config(**{"ddlr.enabled": False})
  config.data.reference_size = 0
  config.finetune.epochs = 1
  with pytest.raises(ConfigError, match=r"config.finetune.epochs=1 fine-tunes on the reference"):
    train.train_and_evaluate(config, str(tmp_path))
