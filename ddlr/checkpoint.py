"""Orbax checkpoints of a run: train state, per-instance rates and loop position.

A checkpoint contains the whole `TrainState` (parameters, BatchNorm statistics,
optimizer state with every per-instance rate and its hyper-optimizer state,
the step and the PRNG key) and a JSON record of the loop (evaluation history,
step times, number of training instances). The data order is a function of the
seed and the epoch, so the step alone fixes the position in the data stream.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a process killed during a write leaves the previous checkpoints
intact and the unfinished one is ignored and removed on the next start.
"""

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from ddlr import baselines, interrupts, optim, steps

CHECKPOINT_DIR = "checkpoints"


class ResumeError(ValueError):
  """A checkpoint or config cannot continue the run in this workdir."""


@dataclasses.dataclass
class LoopRecord:
  """Position and history of the training loop, saved beside the train state."""

  num_instances: int
  test_accuracy: list[float] = dataclasses.field(default_factory=list)
  test_loss: list[float] = dataclasses.field(default_factory=list)
  # Accuracy on the target test set and on the rest of the test set per
  # epoch; empty without a target distribution.
  target_test_accuracy: list[float] = dataclasses.field(default_factory=list)
  rest_test_accuracy: list[float] = dataclasses.field(default_factory=list)
  # One entry per epoch with a timed step, so it can be shorter than the epoch
  # lists (see reporting.EpochTimer).
  seconds_per_step: list[float] = dataclasses.field(default_factory=list)
  # Mean training loss of each finished epoch, and the running sum and count
  # of the current epoch's per-step losses. Each step's loss is added in step
  # order, so a resumed run sums exactly as an uninterrupted one.
  train_loss: list[float] = dataclasses.field(default_factory=list)
  epoch_loss_sum: float = 0.0
  epoch_loss_steps: int = 0


def create_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """Returns a synchronous checkpoint manager for `workdir/checkpoints`.

  Unfinished writes of a killed process are removed first.
  """
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  _remove_unfinished_writes(directory)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=True,
    enable_async_checkpointing=False,
    # Orbax's own clean-up runs in a thread that close() does not join; a
    # process exiting early then prints a traceback. It is done above instead.
    cleanup_tmp_directories=False,
  )
  return ocp.CheckpointManager(
    directory,
    options=options,
    item_names=("state", "loop"),
  )


def _remove_unfinished_writes(directory: str) -> None:
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    # Orbax writes step N into "N.orbax-checkpoint-tmp..." and renames it when complete.
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(directory, name))
      logging.warning("Removed the unfinished checkpoint write %s.", name)


def _to_saveable(state: steps.TrainState) -> dict:
  # Typed PRNG keys have no array dtype for the checkpoint, so their raw data is saved.
  saveable = {
    "step": state.step,
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
    "rng": jax.random.key_data(state.rng),
    "reference_direction": state.reference_direction,
  }
  # Left out when None, so checkpoints of runs without a baseline keep their layout.
  if state.baseline_state is not None:
    saveable["baseline_state"] = state.baseline_state
  return saveable


def save(manager: ocp.CheckpointManager, state: steps.TrainState, loop: LoopRecord) -> int:
  """Writes a checkpoint at the state's step and returns that step.

  A Ctrl-C (SIGINT), or a SIGTERM inside `interrupts.sigterm_as_interrupt`,
  during the write takes effect when the write has finished.
  """
  step = int(state.step)
  with _deferred_interrupt():
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        loop=ocp.args.JsonSave(dataclasses.asdict(loop)),
      ),
      force=True,
    )
    manager.wait_until_finished()
  logging.info("Saved checkpoint at step %d to %s.", step, manager.directory)
  return step


@contextlib.contextmanager
def _deferred_interrupt():
  """Holds back SIGINT and SIGTERM inside the block and raises KeyboardInterrupt after it.

  An interrupted write leaves an unfinished checkpoint directory, and Orbax's
  writer threads log errors when the interpreter exits under them. Only the
  main thread can set signal handlers, so elsewhere the block runs unchanged.
  A signal whose handler does not raise KeyboardInterrupt (ignored, handled by
  the caller, or SIGTERM outside `interrupts.sigterm_as_interrupt`) is left as it is.
  """
  deferred = [s for s in (signal.SIGINT, signal.SIGTERM) if interrupts.raises_interrupt(s)]
  if threading.current_thread() is not threading.main_thread() or not deferred:
    yield
    return
  received = []
  previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in deferred}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  if received:
    logging.info("Interrupted while writing a checkpoint; stopping now that it is written.")
    raise interrupts.interrupt_for(received[0])


def restore_latest(
  manager: ocp.CheckpointManager, template: steps.TrainState, num_instances: int
) -> tuple[steps.TrainState, LoopRecord] | None:
  """Restores the latest checkpoint into the structure of `template`.

  Returns:
    The restored state and loop record, or None when there is no checkpoint.

  Raises:
    ResumeError: if the checkpoint's per-instance table does not have one
      entry per training instance, or its arrays do not match the template.
  """
  step = manager.latest_step()
  if step is None:
    return None
  step_dir = os.path.join(str(manager.directory), str(step))
  try:
    saved = manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"]
    if "train_loss" not in saved:
      # Written before the per-epoch train loss was kept: the loss of its
      # epochs, and of the steps done in the current one, is unknown (NaN).
      saved.pop("last_train_loss", None)
      saved["train_loss"] = [math.nan] * len(saved.get("test_accuracy", []))
      saved["epoch_loss_sum"] = math.nan
    loop = LoopRecord(**saved)
  except (KeyError, ValueError, TypeError, OSError) as error:
    raise ResumeError(
      f"the checkpoint {step_dir} is damaged or incomplete ({describe_error(error)}); "
      "delete that directory to resume from the previous checkpoint."
    ) from error
  if loop.num_instances != num_instances:
    raise ResumeError(
      f"the checkpoint at step {step} in {manager.directory} has per-instance rates for "
      f"{loop.num_instances} training instances, but the dataset has {num_instances}; "
      "rates are never clamped or padded, so use a new workdir."
    )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
  try:
    restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
  # Orbax (0.12) raises a plain Exception when it cannot read an array's data.
  except Exception as error:
    raise ResumeError(
      f"the checkpoint {step_dir} does not match this config's model and optimizer, or "
      f"is damaged ({describe_error(error)}); if it is damaged, delete that directory to "
      "resume from the previous checkpoint."
    ) from error
  _check_table_length(restored["opt_state"], num_instances, step)
  _check_baseline_table_length(restored.get("baseline_state"), num_instances, step)
  state = template.replace(
    step=restored["step"],
    params=restored["params"],
    batch_stats=restored["batch_stats"],
    opt_state=restored["opt_state"],
    rng=jax.random.wrap_key_data(restored["rng"]),
    reference_direction=restored["reference_direction"],
    baseline_state=restored.get("baseline_state"),
  )
  logging.info("Restored checkpoint at step %d from %s.", step, manager.directory)
  return state, loop


def restore_model_variables(manager: ocp.CheckpointManager, step: int) -> tuple[Any, Any]:
  """Restores the parameters and BatchNorm statistics saved at `step`.

  The arrays are restored as saved, without a template, so no optimizer needs
  to be built; the caller checks them against its model.

  Returns:
    (params, batch_stats), with batch_stats `{}` for models without BatchNorm.

  Raises:
    ResumeError: if there is no checkpoint at `step` or it cannot be read.
  """
  step_dir = os.path.join(str(manager.directory), str(step))
  if step not in manager.all_steps():
    raise ResumeError(
      f"no checkpoint at step {step} in {manager.directory}; it has steps "
      f"{sorted(manager.all_steps())}."
    )
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  # Orbax (0.12) raises a plain Exception when it cannot read an array's data.
  except Exception as error:
    raise ResumeError(
      f"the checkpoint {step_dir} cannot be read ({describe_error(error)})."
    ) from error
  state = restored["state"]
  return state["params"], state.get("batch_stats") or {}


def describe_error(error: Exception) -> str:
  """Returns the first line of `error`'s message (at most 300 characters), or its type name."""
  text = str(error).strip().splitlines()
  return text[0][:300] if text else type(error).__name__


def _check_table_length(opt_state, num_instances: int, step: int) -> None:
  try:
    log_lr = optim.find_ddlr_state(opt_state).log_lr
  except ValueError:
    return  # the uniform baseline keeps no per-instance table
  if log_lr is not None and log_lr.shape[0] != num_instances:
    raise ResumeError(
      f"the checkpoint at step {step} has a per-instance table of {log_lr.shape[0]} rates, "
      f"but the dataset has {num_instances} training instances; refusing to resume."
    )


def _check_baseline_table_length(baseline_state, num_instances: int, step: int) -> None:
  length = baselines.table_length(baseline_state)
  if length is not None and length != num_instances:
    raise ResumeError(
      f"the checkpoint at step {step} has a baseline table of {length} instances, "
      f"but the dataset has {num_instances} training instances; refusing to resume."
    )
