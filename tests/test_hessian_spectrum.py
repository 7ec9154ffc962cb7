"""Tests of the per-class Hessian spectrum experiment on mocked tfds data."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from ddlr import checkpoint, hessian, train
from ddlr import data as data_lib
from ddlr.config_checks import ConfigError
from ddlr.models import create_model
from experiments import hessian_record, hessian_report, hessian_spectrum

SETTINGS = hessian_spectrum.SpectrumSettings(
  classes=(0, 1),
  examples_per_class=4,
  top_k=3,
  num_iterations=6,
  chunk_size=4,
  sample_seed=0,
  lanczos_seed=0,
)


def _tiny_config():
  config = default.get_config("quick")
  config.data.num_train = 0
  config.data.num_test = 0
  config.data.reference_size = 0
  config.data.noise.kind = "none"
  config.data.noise.rate = 0.0
  config.ddlr.enabled = False
  config.model.width = 2
  config.model.hidden = 4
  config.train.num_epochs = 2
  config.train.batch_size = 32
  config.eval.batch_size = 50
  return config


def test_default_epochs_are_first_middle_last():
  assert hessian_spectrum.spectrum_epochs([], 8) == [1, 4, 8]
  assert hessian_spectrum.spectrum_epochs([], 3) == [1, 3]
  assert hessian_spectrum.spectrum_epochs([], 1) == [1]
  assert hessian_spectrum.spectrum_epochs(["5", "2", "2"], 8) == [2, 5]


@pytest.mark.parametrize("text", ["0", "9", "x"])
def test_epoch_outside_run_raises(text):
  with pytest.raises(ConfigError, match=f"--epochs entry '{text}' is invalid"):
    hessian_spectrum.spectrum_epochs([text], 8)


@pytest.mark.parametrize(
  ("change", "message"),
  [
    ({"classes": (0, 10)}, r"--classes entry 10 is invalid; expected a class id in \[0, 10\)"),
    ({"classes": (1, 1)}, "expected distinct class ids"),
    ({"top_k": 0}, "--top_k=0 is invalid"),
    ({"num_iterations": 2}, "--num_iterations=2 is invalid; expected at least --top_k=3"),
  ],
)
def test_invalid_settings_raise(change, message):
  settings = hessian_spectrum.SpectrumSettings(**{**SETTINGS.__dict__, **change})
  with pytest.raises(ConfigError, match=message):
    hessian_spectrum.check_settings(settings, num_classes=10)


def _fail(*args, **kwargs):
  raise AssertionError("a resumed run must not repeat this work")


def test_spectrum_run_resumes_without_retraining(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = _tiny_config()
  record_path = os.path.join(workdir, "hessian_spectrum.json")
  with tfds.testing.mock_data(num_examples=100):
    second = hessian_spectrum.run(config, workdir, ["1", "2"], SETTINGS)
    # 100 mocked training examples, batch 32: 3 steps per epoch.
    assert [point["step"] for point in second["points"]] == [3, 6]

    # A run stopped after training epoch 2 but before recording its spectra
    # recomputes them from the checkpoint, without training.
    monkeypatch.setattr(train, "train_and_evaluate", _fail)
    partial = {**second, "points": second["points"][:1]}
    with open(record_path, "w") as f:
      json.dump(partial, f)
    resumed = hessian_spectrum.run(config, workdir, ["1", "2"], SETTINGS)
    assert resumed["points"][0] == second["points"][0]
    for label in ("0", "1"):
      recomputed = resumed["points"][1]["classes"][label]
      recorded = second["points"][1]["classes"][label]
      assert recomputed["eigenvalues"] == recorded["eigenvalues"]
      assert recomputed["residual_norms"] == recorded["residual_norms"]

    monkeypatch.setattr(hessian, "top_hessian_eigenvalues", _fail)
    third = hessian_spectrum.run(config, workdir, ["1", "2"], SETTINGS)
    assert third == resumed
    data = data_lib.load_dataset(config.data)
    monkeypatch.undo()

  for point in second["points"]:
    assert sorted(point["classes"]) == ["0", "1"]
    for spectrum in point["classes"].values():
      assert len(spectrum["eigenvalues"]) == 3
      assert np.all(np.diff(spectrum["eigenvalues"]) <= 0)
  with open(record_path) as f:
    assert json.load(f) == resumed
  assert os.path.getsize(os.path.join(workdir, "hessian_spectrum.png")) > 0
  with open(os.path.join(workdir, "hessian_spectrum.md")) as f:
    table = f.read().splitlines()
  assert len(table) == 4 + 2 * 2  # caption, blank, header, rule, and 2 epochs x 2 classes
  # The small CNN of this config has no BatchNorm.
  assert second["batch_norm"] is False
  assert "BatchNorm" not in table[0]

  # The recorded values are those of the epoch-2 checkpoint on the recorded sample.
  ids = np.asarray(second["sample_ids"]["1"])
  assert np.all(data.labels[ids] == 1)
  manager = checkpoint.create_manager(os.path.join(workdir, "train"), 2)
  params, batch_stats = checkpoint.restore_model_variables(manager, 6)
  manager.close()
  model = create_model(config.model, data.num_classes)
  expected = hessian.top_hessian_eigenvalues(
    hessian.HessianVectorProduct(model, chunk_size=4),
    params,
    batch_stats,
    data.images[ids],
    data.labels[ids],
    k=3,
    num_iterations=6,
    key=jax.random.key(0),
  )
  np.testing.assert_allclose(
    second["points"][1]["classes"]["1"]["eigenvalues"], expected.eigenvalues, rtol=1e-5
  )


def _file_states(directory) -> dict[str, tuple[bytes, int]]:
  """Returns each file's contents and modification time under `directory`, by relative path."""
  states = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        states[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
  return states


def test_deleted_checkpoint_raises_before_writing(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = _tiny_config()
  config.checkpoint.max_to_keep = 1
  with tfds.testing.mock_data(num_examples=100):
    hessian_spectrum.run(config, workdir, ["2"], SETTINGS)
    before = _file_states(workdir)

    # Epoch 1 ended at step 3, and only the checkpoint at step 6 was kept.
    monkeypatch.setattr(train, "train_and_evaluate", _fail)
    monkeypatch.setattr(hessian, "top_hessian_eigenvalues", _fail)
    message = (
      r"^cannot analyse epoch 1: its checkpoint \(step 3\) was not kept, because training in "
      rf"{os.path.join(workdir, 'train')} went on to step 6 and "
      r"config.checkpoint.max_to_keep=1 kept only steps \[6\]. Use a new --workdir, or "
      r"request only the epochs still available there: 2.$"
    )
    with pytest.raises(checkpoint.ResumeError, match=message):
      hessian_spectrum.run(config, workdir, ["1", "2"], SETTINGS)

  after = _file_states(workdir)
  assert sorted(after) == sorted(before)
  for path, state in before.items():
    assert after[path] == state, f"{path} was rewritten"


def test_deleted_checkpoint_error_lists_available_epochs(tmp_path):
  config = _tiny_config()
  config.train.num_epochs = 5
  config.checkpoint.max_to_keep = 1
  config.train.stop_after_steps = 9
  with tfds.testing.mock_data(num_examples=100):
    train.train_and_evaluate(config, str(tmp_path))
  config.train.stop_after_steps = 0
  # 3 steps per epoch: epochs 1 and 2 ended before the kept checkpoint at step 9.
  message = (
    r"^cannot analyse epochs 1, 2: their checkpoints \(steps 3, 6\) were not kept, .* "
    r"request only the epochs still available there: 3 to 5.$"
  )
  with pytest.raises(checkpoint.ResumeError, match=message):
    hessian_spectrum.check_checkpoints_kept(config, str(tmp_path), [1, 2, 4], set(), 3)
  # A recorded epoch needs no checkpoint.
  with pytest.raises(checkpoint.ResumeError, match="available there: 1, 3 to 5.$"):
    hessian_spectrum.check_checkpoints_kept(config, str(tmp_path), [1, 2], {1}, 3)


def test_format_epochs_joins_consecutive_runs():
  assert hessian_spectrum.format_epochs({2}) == "2"
  assert hessian_spectrum.format_epochs({1, 3, 4, 5, 8}) == "1, 3 to 5, 8"
  assert hessian_spectrum.format_epochs({6, 7}) == "6 to 7"


def test_spectrum_record_with_other_settings_raises(tmp_path):
  path = tmp_path / "hessian_spectrum.json"
  settings = {**SETTINGS.__dict__, "classes": [0, 1], "top_k": 5, "sample_seed": 2}
  path.write_text(json.dumps({"settings": settings, "dataset": "cifar10", "points": []}))
  message = (
    f"{path} was written with other settings or data: settings.sample_seed: 2 in the record, "
    "0 now; settings.top_k: 5 in the record, 3 now; dataset: 'cifar10' in the record, "
    "'fashion_mnist' now. Use a new --workdir, or the flags and config of that run."
  )
  with pytest.raises(ConfigError) as error_info:
    hessian_record.load_record(str(path), SETTINGS, {"dataset": "fashion_mnist"})
  assert str(error_info.value) == message


def test_spectrum_record_difference_shortens_lists(tmp_path):
  path = tmp_path / "hessian_spectrum.json"
  settings = json.loads(json.dumps(SETTINGS.__dict__))
  path.write_text(json.dumps({"settings": settings, "sample_ids": {"0": list(range(100))}}))
  with pytest.raises(ConfigError) as error_info:
    hessian_record.load_record(str(path), SETTINGS, {"sample_ids": {"0": list(range(1, 101))}})
  assert str(error_info.value) == (
    f"{path} was written with other settings or data: sample_ids.0: [0, 1, 2, 3, 4, 5, ...] "
    "in the record, [1, 2, 3, 4, 5, 6, ...] now. Use a new --workdir, or the flags and config "
    "of that run."
  )


def test_rerun_with_other_num_epochs_raises(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  record_path = tmp_path / "hessian_spectrum.json"
  config = _tiny_config()
  with tfds.testing.mock_data(num_examples=100):
    first = hessian_spectrum.run(config, workdir, ["1"], SETTINGS)
    assert first["num_epochs"] == 2
    recorded = record_path.read_text()

    monkeypatch.setattr(train, "train_and_evaluate", _fail)
    monkeypatch.setattr(hessian, "top_hessian_eigenvalues", _fail)
    config.train.num_epochs = 3
    with pytest.raises(ConfigError) as error_info:
      hessian_spectrum.run(config, workdir, ["1"], SETTINGS)
    assert str(error_info.value) == (
      f"config.train.num_epochs=3 is invalid for {record_path}, whose spectra were computed "
      f"with train.num_epochs=2 (from {record_path}); the learning-rate schedule depends on "
      "it, so the spectra would mix two schedules. Use a new --workdir, or "
      "--config.train.num_epochs=2."
    )
    assert record_path.read_text() == recorded

    # A record written before it stored num_epochs is checked against the
    # training run's config.json.
    old_record = {key: value for key, value in first.items() if key != "num_epochs"}
    record_path.write_text(json.dumps(old_record))
    config_path = tmp_path / "train" / "config.json"
    with pytest.raises(ConfigError) as error_info:
      hessian_spectrum.run(config, workdir, ["1"], SETTINGS)
    assert f"with train.num_epochs=2 (from {config_path});" in str(error_info.value)

    # Without that file the old record is accepted, and with the same value too.
    config.train.num_epochs = 2
    assert hessian_spectrum.run(config, workdir, ["1"], SETTINGS) == old_record
    config_path.rename(tmp_path / "config.json.moved")
    config.train.num_epochs = 3
    assert hessian_spectrum.run(config, workdir, ["1"], SETTINGS) == old_record


def test_stop_after_steps_in_config_raises(tmp_path):
  config = _tiny_config()
  config.train.stop_after_steps = 3
  with pytest.raises(ConfigError, match="config.train.stop_after_steps=3 is invalid here"):
    hessian_spectrum.run(config, str(tmp_path), [], SETTINGS)


def test_spectrum_table_names_batch_norm_only_when_present():
  record = {
    "dataset": "cifar100",
    "model": "resnet18",
    "class_names": {"0": "apple"},
    "settings": {"top_k": 2, "examples_per_class": 8, "num_iterations": 4},
    "points": [
      {"epoch": 1, "classes": {"0": {"eigenvalues": [2.0, 1.0], "residual_norms": [0.1, 0.2]}}}
    ],
  }
  caption = "training examples per class (cifar100, resnet18, {}4 Lanczos iterations)."
  with_batch_norm = hessian_report.spectrum_table({**record, "batch_norm": True})
  assert caption.format("BatchNorm in eval mode, ") in with_batch_norm
  without_batch_norm = hessian_report.spectrum_table({**record, "batch_norm": False})
  assert caption.format("") in without_batch_norm
  assert "| 1 | 0: apple | 2 | 1 | 0.2 |" in without_batch_norm
