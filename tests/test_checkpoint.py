"""Checkpoints: bit-identical resumption, a kill during a write, and rejected resumes."""

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddlr import checkpoint, interrupts, reporting, resume, train
from ddlr import data as data_lib
from experiments import sweep
from tests.run_helpers import MOCK_EXAMPLES, latest_state, run_on_mock, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  return tiny_config(
    **{
      "ddlr.hyper_momentum": 0.5,  # so the momentum table is checkpointed too
      "ddlr.reference_every_steps": 2,  # so is the cached reference gradient
      "data.augmentation": "crop_flip",  # the crops must continue from the carried key
      "train.num_epochs": 2,
      "train.batch_size": 16,  # 5 steps per epoch
      "checkpoint.every_steps": 3,
      **overrides,
    }
  )


def _assert_bit_identical(state_a, state_b):
  leaves_a = jax.tree.leaves((state_a.params, state_a.batch_stats, state_a.opt_state, state_a.step))
  leaves_b = jax.tree.leaves((state_b.params, state_b.batch_stats, state_b.opt_state, state_b.step))
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """An uninterrupted two-epoch run: its workdir and final summary."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, run_on_mock(_config(), workdir)


@pytest.mark.parametrize("stop_after", [7, 5])  # 5 is the end of epoch 1
def test_resumed_run_is_bit_identical(finished_run, tmp_path, stop_after):
  reference_dir, reference_summary = finished_run
  stopped = run_on_mock(_config(**{"train.stop_after_steps": stop_after}), tmp_path)
  assert stopped == {"completed": False, "step": stop_after, "total_steps": 10}

  summary = run_on_mock(_config(), tmp_path)

  assert summary["test_accuracy_per_epoch"] == reference_summary["test_accuracy_per_epoch"]
  state, loop = latest_state(tmp_path, _config())
  reference_state, _ = latest_state(reference_dir, _config())
  assert int(state.step) == 10
  _assert_bit_identical(state, reference_state)
  rates = np.load(tmp_path / "rates.npz")
  reference_rates = np.load(reference_dir / "rates.npz")
  np.testing.assert_array_equal(rates["log_lr"], reference_rates["log_lr"])
  assert np.count_nonzero(rates["log_lr"]) > 0
  assert loop.test_accuracy == reference_summary["test_accuracy_per_epoch"]
  # Each epoch's mean train loss sums every step's loss, wherever the run stopped.
  assert summary["train_loss_per_epoch"] == reference_summary["train_loss_per_epoch"]
  assert summary["final_train_loss"] == reference_summary["train_loss_per_epoch"][-1]
  assert len(summary["train_loss_per_epoch"]) == 2


KILL_DURING_WRITE = textwrap.dedent(
  """
  import sys, time
  import orbax.checkpoint as ocp
  import tensorflow_datasets as tfds
  from ddlr import train
  from tests.run_helpers import MOCK_EXAMPLES
  from tests.test_checkpoint import _config

  marker = sys.argv[2]
  original = ocp.JsonCheckpointHandler.async_save
  calls = []

  async def save_then_hang(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint: its files are half written
      open(marker, "w").close()
      time.sleep(600)
    return await original(self, *args, **kwargs)

  ocp.JsonCheckpointHandler.async_save = save_then_hang
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train.train_and_evaluate(_config(), sys.argv[1])
  """
)


def test_sigkill_during_checkpoint_write_resumes(finished_run, tmp_path):
  reference_dir, reference_summary = finished_run
  workdir, marker = tmp_path / "run", tmp_path / "writing"
  child = subprocess.Popen(
    [sys.executable, "-c", KILL_DURING_WRITE, str(workdir), str(marker)],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 240
  while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  assert marker.exists(), "the child never reached its second checkpoint write"
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=30)

  checkpoints = sorted(os.listdir(workdir / "checkpoints"))
  assert "3" in checkpoints
  assert any("tmp" in name for name in checkpoints)  # the unfinished write of step 5

  summary = run_on_mock(_config(), workdir)
  assert summary["test_accuracy_per_epoch"] == reference_summary["test_accuracy_per_epoch"]
  state, _ = latest_state(workdir, _config())
  reference_state, _ = latest_state(reference_dir, _config())
  _assert_bit_identical(state, reference_state)


@pytest.mark.parametrize(
  ("path", "value", "message"),
  [
    ("data.name", "mnist", r"config.data.name: 'fashion_mnist' -> 'mnist'"),
    ("data.num_train", 80, r"config.data.num_train: 0 -> 80"),
    ("data.reference_size", 20, r"config.data.reference_size: 10 -> 20"),
    ("model.width", 8, r"config.model.width: 4 -> 8"),
  ],
)
def test_resume_with_changed_config_is_rejected(finished_run, tmp_path, path, value, message):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  with pytest.raises(checkpoint.ResumeError, match=message):
    run_on_mock(_config(**{path: value}), workdir)


def test_resume_with_changed_noise_is_rejected(finished_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  config = _config()
  config.data.noise.rate = 0.2
  with pytest.raises(checkpoint.ResumeError, match=r"config.data.noise.rate: 0.4 -> 0.2"):
    run_on_mock(config, workdir)


def test_resume_with_more_epochs_is_allowed(finished_run, tmp_path, caplog):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  caplog.set_level("INFO", logger="absl")
  summary = run_on_mock(_config(**{"train.num_epochs": 3}), workdir)
  assert len(summary["test_accuracy_per_epoch"]) == 3
  assert summary["test_accuracy_per_epoch"][:2] == finished_run[1]["test_accuracy_per_epoch"]
  assert "Resuming with config.train.num_epochs changed from 2 to 3." in caplog.messages


def test_checkpoint_of_other_dataset_size_is_rejected(finished_run, tmp_path):
  # With a config and split record that fit the new dataset (as when
  # checkpoints are copied between runs), the checkpoint itself must catch
  # that its per-instance table does not fit.
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  config = _config(**{"data.num_train": 90})
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    data_lib.save_split_record(data_lib.load_dataset(config.data), workdir / "split_record.npz")
  reporting.write_json(str(workdir / "config.json"), json.loads(config.to_json()))
  with pytest.raises(
    checkpoint.ResumeError, match=r"per-instance rates for 90 training instances.*has 80"
  ):
    run_on_mock(_config(**{"data.num_train": 90}), workdir)


def test_non_finite_loss_keeps_loadable_checkpoint(tmp_path, monkeypatch):
  # A NaN image in the third batch of epoch 1 makes exactly step 3 non-finite.
  config = _config(**{"checkpoint.every_steps": 1})
  order_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  poisoned_id = int(train.epoch_batches(order_rng, 1, 90, config.train.batch_size)[2][0])
  load_dataset = train.data_lib.load_dataset

  def load_with_nan_image(data_config):
    data = load_dataset(data_config)
    images = data.images.copy()
    images[poisoned_id] = np.nan
    return dataclasses.replace(data, images=images)

  monkeypatch.setattr(train.data_lib, "load_dataset", load_with_nan_image)
  with pytest.raises(train.NonFiniteLossError, match=r"at step 3 \(epoch 1\)"):
    run_on_mock(config, tmp_path)
  state, _ = latest_state(tmp_path, config)
  assert int(state.step) == 2
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("name", ["config.json", "split_record.npz"])
def test_missing_run_record_is_rejected(finished_run, tmp_path, name):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  os.remove(workdir / name)
  with pytest.raises(checkpoint.ResumeError, match=f"has checkpoints but no {name}"):
    run_on_mock(_config(), workdir)


def test_checkpoint_past_the_end_is_rejected(finished_run, tmp_path, caplog):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  caplog.set_level("INFO", logger="absl")
  with pytest.raises(checkpoint.ResumeError, match=r"step 10 is past the end of this run"):
    run_on_mock(_config(**{"train.num_epochs": 1}), workdir)
  # A rejected resume does not log the config change it rejected.
  assert not [message for message in caplog.messages if message.startswith("Resuming with")]


def test_damaged_checkpoint_is_rejected(finished_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  os.mkdir(workdir / "checkpoints" / "999")
  with pytest.raises(checkpoint.ResumeError, match=r"checkpoints/999 is damaged or incomplete"):
    run_on_mock(_config(), workdir)


def test_damaged_array_data_is_rejected(tmp_path):
  stopped = run_on_mock(_config(**{"train.stop_after_steps": 4}), tmp_path)
  assert stopped == {"completed": False, "step": 4, "total_steps": 10}
  latest = tmp_path / "checkpoints" / "4" / "state"
  largest = max((path for path in latest.rglob("*") if path.is_file()), key=os.path.getsize)
  largest.write_bytes(b"")

  with pytest.raises(
    checkpoint.ResumeError, match=r"checkpoints/4 does not match .* or is damaged"
  ):
    run_on_mock(_config(), tmp_path)


def test_run_in_held_workdir_is_rejected(finished_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  before = {path.name: path.read_bytes() for path in workdir.iterdir() if path.is_file()}
  with resume.hold_workdir(str(workdir)):
    with pytest.raises(checkpoint.ResumeError, match=r"is in use by another run"):
      run_on_mock(_config(**{"train.num_epochs": 3}), workdir)
  assert {path.name: path.read_bytes() for path in workdir.iterdir() if path.is_file()} == before


def test_damaged_summary_of_finished_run_is_rejected(finished_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  (workdir / "summary.json").write_text("{")
  with pytest.raises(checkpoint.ResumeError, match=r"of a finished run cannot be read"):
    run_on_mock(_config(), workdir)


def test_unreadable_saved_config_is_rejected(finished_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  (workdir / "config.json").write_text("{")

  with pytest.raises(checkpoint.ResumeError, match=r"config.json cannot be read"):
    run_on_mock(_config(), workdir)


def test_rejected_shorter_run_stays_rejected(tmp_path):
  run_on_mock(tiny_config(**{"train.num_epochs": 2}), tmp_path)
  shorter = tiny_config(**{"train.num_epochs": 1})
  # The first rejection must not leave a config.json that makes the sweep reuse the run.
  for _ in range(2):
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
      with pytest.raises(checkpoint.ResumeError, match=r"num_epochs=2, more than the 1 requested"):
        sweep.run_or_load(shorter, str(tmp_path))


def test_extended_run_sets_outputs_aside(tmp_path):
  first = run_on_mock(tiny_config(), tmp_path)  # 1 epoch of 2 steps
  first_rates = (tmp_path / "rates.npz").read_bytes()
  first_config = (tmp_path / "config.json").read_bytes()
  stopped = run_on_mock(
    tiny_config(**{"train.num_epochs": 2, "train.stop_after_steps": 3}), tmp_path
  )
  assert stopped == {"completed": False, "step": 3, "total_steps": 4}
  assert not (tmp_path / "summary.json").exists()
  assert not (tmp_path / "rates.npz").exists()
  with open(tmp_path / "summary_step2.json") as f:
    assert json.load(f) == first
  assert (tmp_path / "rates_step2.npz").read_bytes() == first_rates
  assert (tmp_path / "rates_histogram_step2.png").exists()
  # The set-aside outputs keep the config they were trained with.
  assert (tmp_path / "config_step2.json").read_bytes() == first_config
  assert json.loads(first_config)["train"]["num_epochs"] == 1
  assert json.loads((tmp_path / "config.json").read_text())["train"]["num_epochs"] == 2

  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    extended = sweep.run_or_load(tiny_config(**{"train.num_epochs": 2}), str(tmp_path))
  assert len(extended["test_accuracy_per_epoch"]) == 2
  assert (tmp_path / "rates.npz").exists()
  assert (tmp_path / "rates_step2.npz").read_bytes() == first_rates


def _script_step_times(monkeypatch):
  """Makes every train step take 1 s on the clock of the loop, and the first of a process 100 s.

  The first call of the jitted step in a process includes its compilation.
  """
  now = [0.0]
  build = train._build

  def build_with_scripted_steps(config, workdir, data):
    run, state = build(config, workdir, data)
    train_fn, calls = run.train_fn, []

    def scripted_train_fn(*args):
      now[0] += 1.0 if calls else 100.0
      calls.append(1)
      return train_fn(*args)

    return dataclasses.replace(run, train_fn=scripted_train_fn), state

  monkeypatch.setattr(train, "_build", build_with_scripted_steps)
  timer = functools.partial(reporting.EpochTimer, clock=lambda: now[0])
  monkeypatch.setattr(reporting, "EpochTimer", timer)


def _recorded_seconds_per_step(workdir):
  steps = [int(path.name) for path in (workdir / "checkpoints").iterdir()]
  metadata = workdir / "checkpoints" / str(max(steps)) / "loop" / "metadata"
  return json.loads(metadata.read_text())["seconds_per_step"]


@pytest.mark.parametrize(
  ("overrides", "stop_after", "per_epoch"),
  [
    ({"train.num_epochs": 2}, None, [1.0, 1.0]),  # 2 steps per epoch
    # 5 steps per epoch, resumed at step 2 of 5: step 3 is not timed, steps 4 and 5 are.
    ({"train.batch_size": 16}, 2, [1.0]),
    # Resumed at step 3 of 4, so epoch 2 has no timed step and no entry.
    ({"train.num_epochs": 2}, 3, [1.0]),
  ],
)
def test_step_time_leaves_out_compilation(tmp_path, monkeypatch, overrides, stop_after, per_epoch):
  _script_step_times(monkeypatch)
  if stop_after is not None:
    stopping = tiny_config(**overrides, **{"train.stop_after_steps": stop_after})
    assert run_on_mock(stopping, tmp_path)["step"] == stop_after

  summary = run_on_mock(tiny_config(**overrides), tmp_path)

  assert _recorded_seconds_per_step(tmp_path) == per_epoch
  assert summary["seconds_per_step"] == 1.0
  assert summary["examples_per_second"] == tiny_config(**overrides).train.batch_size


@pytest.mark.parametrize("set_aside", [False, True])
def test_outputs_without_checkpoint_are_rejected(tmp_path, set_aside):
  run_on_mock(tiny_config(), tmp_path)
  shutil.rmtree(tmp_path / "checkpoints")
  if set_aside:  # as a run extended past step 2 leaves them
    for name in ("summary.json", "rates.npz"):
      stem, extension = os.path.splitext(name)
      os.replace(tmp_path / name, tmp_path / f"{stem}_step2{extension}")
  before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}

  changed = tiny_config(**{"data.noise.rate": 0.2})
  with pytest.raises(checkpoint.ResumeError, match=r"has the final outputs of a finished run"):
    run_on_mock(changed, tmp_path)
  after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
  assert after == before  # no file changed, and no checkpoints directory made


def _as_older_loop_record(workdir, step):
  """Rewrites the loop record of checkpoint `step` in the format of the older code."""
  path = workdir / "checkpoints" / str(step) / "loop" / "metadata"
  record = json.loads(path.read_text())
  for field in ("train_loss", "epoch_loss_sum", "epoch_loss_steps"):
    del record[field]
  record["last_train_loss"] = 2.0
  path.write_text(json.dumps(record))


@pytest.mark.parametrize("stop_after", [3, 2])  # in epoch 2, and at its start
def test_older_loop_record_resumes(tmp_path, stop_after):
  config = tiny_config(**{"train.num_epochs": 2})  # 2 steps per epoch
  reference = run_on_mock(config, tmp_path / "uninterrupted")
  run_on_mock(config.copy_and_resolve_references(), tmp_path / "run")
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
  for name in ("summary.json", "rates.npz", "rates_histogram.png"):
    (tmp_path / "run" / name).unlink()
  if stop_after == 2:
    _as_older_loop_record(tmp_path / "run", 2)
  else:
    stopped = tiny_config(**{"train.num_epochs": 2, "train.stop_after_steps": 3})
    shutil.rmtree(tmp_path / "run")
    run_on_mock(stopped, tmp_path / "run")
    _as_older_loop_record(tmp_path / "run", 3)

  summary = run_on_mock(config, tmp_path / "run")

  assert summary["test_accuracy_per_epoch"] == reference["test_accuracy_per_epoch"]
  # Epoch 1's loss is unknown, and so is epoch 2's when the run resumes after its first
  # step, whose loss the older record did not keep.
  assert math.isnan(summary["train_loss_per_epoch"][0])
  if stop_after == 2:
    assert summary["train_loss_per_epoch"][1] == reference["train_loss_per_epoch"][1]
  else:
    assert math.isnan(summary["train_loss_per_epoch"][1])
  assert len(summary["train_loss_per_epoch"]) == 2


def test_finished_run_returns_its_summary(tmp_path):
  first = run_on_mock(tiny_config(), tmp_path)
  _as_older_loop_record(tmp_path, 2)  # a finished run of the older code reruns as well
  outputs = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}

  again = run_on_mock(tiny_config(), tmp_path)

  assert again == first
  assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == outputs


def test_set_aside_outputs_name_their_step(tmp_path):
  config = tiny_config(**{"train.num_epochs": 2})  # 2 steps per epoch
  first = run_on_mock(config, tmp_path)
  # Without the last checkpoint the run resumes at step 2 and trains steps 3 and 4 again.
  shutil.rmtree(tmp_path / "checkpoints" / "4")

  again = run_on_mock(config, tmp_path)

  with open(tmp_path / "summary_step4.json") as f:
    assert json.load(f) == first
  assert not (tmp_path / "summary_step2.json").exists()
  assert again["test_accuracy_per_epoch"] == first["test_accuracy_per_epoch"]


@pytest.mark.parametrize("taken", ["summary_step4.json", "config_step4.json"])
def test_set_aside_never_overwrites(tmp_path, taken):
  config = tiny_config(**{"train.num_epochs": 2})
  run_on_mock(config, tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  (tmp_path / taken).write_text("{}")

  with pytest.raises(checkpoint.ResumeError, match=rf"{taken}, which already exists"):
    run_on_mock(config, tmp_path)
  assert (tmp_path / taken).read_text() == "{}"
  assert (tmp_path / "summary.json").exists()
  assert (tmp_path / "config.json").exists()
  other = {"summary_step4.json", "config_step4.json"} - {taken}
  assert not (tmp_path / other.pop()).exists()  # nothing is set aside when one name is taken


def test_finished_run_keeps_its_config_file(tmp_path):
  run_on_mock(tiny_config(), tmp_path)
  saved = (tmp_path / "config.json").read_bytes()

  run_on_mock(tiny_config(**{"ddlr.alignment": "jvp"}), tmp_path)

  assert (tmp_path / "config.json").read_bytes() == saved


def test_split_half_resume_is_bit_identical(tmp_path):
  overrides = {
    "model.batch_norm": True,
    "ddlr.reference": "split",
    "ddlr.split_batch_stats": "half",
    "ddlr.reference_every_steps": 1,  # only the reference-split gradient is reused
  }
  run_on_mock(_config(**overrides), tmp_path / "uninterrupted")
  stopped = run_on_mock(_config(**overrides, **{"train.stop_after_steps": 7}), tmp_path / "resumed")
  assert stopped == {"completed": False, "step": 7, "total_steps": 10}
  run_on_mock(_config(**overrides), tmp_path / "resumed")

  state, _ = latest_state(tmp_path / "resumed", _config(**overrides))
  reference_state, _ = latest_state(tmp_path / "uninterrupted", _config(**overrides))
  assert len(jax.tree.leaves(state.batch_stats)) == 4
  _assert_bit_identical(state, reference_state)


def test_interrupt_during_write_deferred():
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  finished = False
  try:
    with pytest.raises(KeyboardInterrupt):
      with checkpoint._deferred_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs here, and must not raise
        finished = True
  finally:
    signal.signal(signal.SIGINT, previous)
  assert finished


def test_ignored_interrupt_stays_ignored():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with checkpoint._deferred_interrupt():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
  finally:
    signal.signal(signal.SIGINT, previous)


def test_sigterm_raises_interrupt_inside_block():
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  try:
    with pytest.raises(interrupts.Terminated):
      with interrupts.sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert interrupts.exit_status(interrupts.Terminated()) == 143
    assert interrupts.exit_status(KeyboardInterrupt()) == 130
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_write_deferred():
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  finished = False
  try:
    with pytest.raises(interrupts.Terminated):
      with interrupts.sigterm_as_interrupt(), checkpoint._deferred_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here, and must not raise
        finished = True
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert finished
