"""Tests of the workdir checks that run before a run starts or resumes (`ddlr.resume`)."""

import errno
import fcntl
import json

import pytest

from ddlr import checkpoint, reporting, resume
from ddlr.config_checks import ConfigError
from tests.run_helpers import tiny_config


def test_truncate_metrics_drops_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')

  resume.truncate_metrics(str(path), last_step=2)

  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_truncate_metrics_rejects_damaged_record(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')

  with pytest.raises(checkpoint.ResumeError, match=r"line 2 of .* is not a valid metrics record"):
    resume.truncate_metrics(str(path), last_step=2)
  assert path.read_text() == '{"step": 1}\nnot json\n{"step": 3}\n'


def test_unread_ddlr_fields_are_not_differences(tmp_path):
  config = tiny_config(**{"ddlr.enabled": False})
  path = tmp_path / "config.json"
  path.write_text(config.to_json())
  config.ddlr.hyper_learning_rate = 0.7
  config.baseline.data_parameters.momentum = 0.5
  assert resume.config_differences(str(path), config) == {}
  config.ddlr.enabled = True
  changed = resume.config_differences(str(path), config)
  assert set(changed) == {"ddlr.enabled", "ddlr.hyper_learning_rate"}


def test_reweighting_keeps_ddlr_alignment_difference(tmp_path):
  config = tiny_config(**{"ddlr.enabled": False, "baseline.name": "learning_to_reweight"})
  path = tmp_path / "config.json"
  path.write_text(config.to_json())
  config.ddlr.alignment = "vmap"
  config.ddlr.hyper_learning_rate = 0.7
  changed = resume.config_differences(str(path), config)
  assert changed == {"ddlr.alignment": ("auto", "vmap")}


def test_baseline_fields_count_for_their_baseline(tmp_path):
  config = tiny_config(**{"ddlr.enabled": False, "baseline.name": "data_parameters"})
  path = tmp_path / "config.json"
  path.write_text(config.to_json())
  config.baseline.data_parameters.momentum = 0.5
  config.baseline.reference_batch_size = 4  # read by learning_to_reweight only
  changed = resume.config_differences(str(path), config)
  assert changed == {"baseline.data_parameters.momentum": (0.9, 0.5)}


def test_added_field_missing_reads_old_value(tmp_path):
  config = tiny_config()
  saved = json.loads(config.to_json())
  del saved["ddlr"]["split_batch_stats"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))
  assert resume.config_differences(str(path), config) == {}
  config.train.num_epochs += 1
  assert resume.check_resumable_config(str(path), config) == {
    "train.num_epochs": (config.train.num_epochs - 1, config.train.num_epochs)
  }
  config.ddlr.split_batch_stats = "half"
  with pytest.raises(checkpoint.ResumeError, match=r"split_batch_stats: 'batch' -> 'half'"):
    resume.check_resumable_config(str(path), config)


def test_set_aside_accepts_own_config_copy(tmp_path):
  # An earlier attempt copied config.json and was stopped before moving the rest.
  (tmp_path / "summary.json").write_text(json.dumps({"test_accuracy_per_epoch": [0.5, 0.6]}))
  (tmp_path / "config.json").write_text('{"epochs": 2}')
  (tmp_path / "config_step8.json").write_text('{"epochs": 2}')
  resume.set_aside_final_outputs(str(tmp_path), step=8, total_steps=12, steps_per_epoch=4)
  assert (tmp_path / "summary_step8.json").exists()
  assert not (tmp_path / "summary.json").exists()
  assert (tmp_path / "config_step8.json").read_text() == '{"epochs": 2}'

  (tmp_path / "summary.json").write_text(json.dumps({"test_accuracy_per_epoch": [0.5, 0.6]}))
  (tmp_path / "summary_step8.json").unlink()
  (tmp_path / "config_step8.json").write_text('{"epochs": 1}')
  with pytest.raises(checkpoint.ResumeError, match=r"config_step8.json, which already exists"):
    resume.set_aside_final_outputs(str(tmp_path), step=8, total_steps=12, steps_per_epoch=4)


def test_set_aside_needs_summary(tmp_path):
  # A run stopped while writing its final outputs, before summary.json.
  (tmp_path / "rates.npz").write_bytes(b"rates")
  with pytest.raises(checkpoint.ResumeError, match=r"has rates.npz but no summary.json"):
    resume.set_aside_final_outputs(str(tmp_path), step=8, total_steps=12, steps_per_epoch=4)
  assert (tmp_path / "rates.npz").read_bytes() == b"rates"
  # At the end of the run the outputs are written again, so nothing needs setting aside.
  resume.set_aside_final_outputs(str(tmp_path), step=12, total_steps=12, steps_per_epoch=4)
  assert (tmp_path / "rates.npz").read_bytes() == b"rates"


def test_damaged_summary_is_rejected(tmp_path):
  path = tmp_path / "summary.json"
  path.write_text('{"test_accuracy_per_epoch": [0.5')
  with pytest.raises(checkpoint.ResumeError, match=r"of a finished run cannot be read"):
    resume.read_summary(str(path))


def test_summary_with_nan_reads_back_as_none(tmp_path):
  path = str(tmp_path / "summary.json")
  reporting.write_json(path, {"class_1_mean_rate": float("nan"), "auroc": 0.75})
  assert resume.read_summary(path) == {"class_1_mean_rate": None, "auroc": 0.75}


def test_held_workdir_rejects_second_holder(tmp_path):
  with resume.hold_workdir(str(tmp_path)):
    with pytest.raises(checkpoint.ResumeError, match=r"is in use by another run"):
      with resume.hold_workdir(str(tmp_path)):
        pass
  # Released at the end of the block.
  with resume.hold_workdir(str(tmp_path)):
    pass


def test_workdir_that_cannot_be_made(tmp_path):
  dangling = tmp_path / "link"
  dangling.symlink_to(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"is a symbolic link to .*missing, which does not exist"):
    resume.make_workdir(str(dangling))
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match=r"file/run cannot be created \(\[Errno 20\] Not a dir"):
    resume.make_workdir(str(tmp_path / "file" / "run"))


def test_unlockable_workdir_is_rejected(tmp_path, monkeypatch):
  def no_locks(descriptor, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  with pytest.raises(checkpoint.ResumeError, match=r"cannot be locked \(\[Errno 37\] No locks"):
    with resume.hold_workdir(str(tmp_path)):
      pass
