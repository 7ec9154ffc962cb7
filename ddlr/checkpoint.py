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
import filecmp
import json
import math
import os
import re
import shutil
import signal
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from ddlr import baselines, interrupts, optim, steps

CHECKPOINT_DIR = "checkpoints"
# Config fields whose change keeps a run resumable; any other difference
# between the saved and the new config is rejected.
SAFE_TO_CHANGE = frozenset(
  {
    "train.num_epochs",
    "train.log_every_steps",
    "train.stop_after_steps",
    "checkpoint.every_steps",
    "checkpoint.max_to_keep",
    "eval.batch_size",
    "data.source",
    "data.data_dir",
    "data.manual_dir",
    # Every alignment path computes the same alignment (tests check them
    # against per-example gradients), so switching paths keeps the method.
    "ddlr.alignment",
  }
)
# Fields of SAFE_TO_CHANGE that leave a finished run's results as they are:
# a finished run differing from the new config only in these is reused.
# train.stop_after_steps is one of them, since a finished run has no steps left
# to stop before.
OUTCOME_NEUTRAL = SAFE_TO_CHANGE - {"train.num_epochs"}
# Fields added to the config after runs were saved without them, each with the
# value that trains as those runs did. A saved config that lacks one of these
# fields is read as having that value.
ADDED_FIELDS = {"ddlr.split_batch_stats": "batch"}


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
      f"the checkpoint {step_dir} is damaged or incomplete ({_first_line(error)}); "
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
      f"is damaged ({_first_line(error)}); if it is damaged, delete that directory to "
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
      f"the checkpoint {step_dir} cannot be read ({_first_line(error)})."
    ) from error
  state = restored["state"]
  return state["params"], state.get("batch_stats") or {}


def _first_line(error: Exception) -> str:
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


def _flatten(config: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, path + "."))
    else:
      flat[path] = value
  return flat


# Baseline fields that only the baseline of the same name reads.
_BASELINE_FIELDS = {
  "baseline.reference_batch_size": "learning_to_reweight",
  "baseline.hypergradient.": "hypergradient",
  "baseline.data_parameters.": "data_parameters",
  "baseline.small_loss.": "small_loss",
}


def _is_unused(path: str, flat: dict) -> bool:
  """Returns whether a run of the flattened config `flat` never reads the field `path`."""
  if path.startswith("ddlr.") and flat.get("ddlr.enabled") is False:
    read = {"ddlr.enabled"}
    if flat.get("baseline.name") == "learning_to_reweight":
      # Learning to reweight scores examples through the ddlr alignment path.
      read.add("ddlr.alignment")
    return path not in read
  for prefix, name in _BASELINE_FIELDS.items():
    if path.startswith(prefix) and flat.get("baseline.name") != name:
      return True
  return False


def config_differences(saved_config_path: str, config: ml_collections.ConfigDict) -> dict:
  """Returns {dotted field: (saved value, new value)} for every field that differs.

  A field present in only one of the configs has the value '<missing>' in the
  other, except that a saved config lacking a field of `ADDED_FIELDS` is read
  as having that field's value. Fields that neither run reads are left out:
  the `ddlr` section when both have `ddlr.enabled=False` (but the alignment
  path for learning to reweight), and a baseline's own fields when neither
  runs that baseline. So a uniform run stays reusable when a sweep changes a
  ddlr setting.

  Raises:
    ResumeError: if the saved config is missing or is not valid JSON.
  """
  try:
    with open(saved_config_path) as f:
      saved = {**ADDED_FIELDS, **_flatten(json.load(f))}
  except (OSError, ValueError) as error:
    raise ResumeError(
      f"the saved config {saved_config_path} cannot be read ({_first_line(error)}), so the "
      "run in its directory cannot be checked against this config; restore the file or use "
      "a new --workdir."
    ) from error
  new = _flatten(json.loads(config.to_json()))
  return {
    path: (saved.get(path, "<missing>"), new.get(path, "<missing>"))
    for path in sorted(set(saved) | set(new))
    if saved.get(path, "<missing>") != new.get(path, "<missing>")
    and not (_is_unused(path, saved) and _is_unused(path, new))
  }


def check_resumable_config(saved_config_path: str, config: ml_collections.ConfigDict) -> None:
  """Compares the config saved with a run to the new one before resuming.

  Changes of fields in `SAFE_TO_CHANGE` are logged; any other difference
  (dataset, its size, the noise, the model, the optimizer, the ddlr settings,
  the seed) is rejected.

  Raises:
    ResumeError: naming every field that differs, with both values.
  """
  changed = config_differences(saved_config_path, config)
  unsafe = {path: values for path, values in changed.items() if path not in SAFE_TO_CHANGE}
  if unsafe:
    differences = "; ".join(f"config.{p}: {old!r} -> {new!r}" for p, (old, new) in unsafe.items())
    run_dir = os.path.dirname(saved_config_path) or "."
    raise ResumeError(
      f"{run_dir} contains a run with a different config, so it cannot be resumed: "
      f"{differences}. Use a new --workdir (in a sweep, remove this run's directory), "
      "or restore these values."
    )
  for path, (old, new_value) in changed.items():
    logging.info("Resuming with config.%s changed from %r to %r.", path, old, new_value)
  if "train.num_epochs" in changed:
    logging.warning(
      "config.train.num_epochs changed, so the learning-rate schedule is rebuilt for the "
      "new number of steps from here on."
    )


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops records after `last_step` from a `metrics.jsonl`, which the resumed run rewrites.

  A final line that is not valid JSON, a record cut short when the run was
  killed while writing it, is dropped with a warning.

  Raises:
    ResumeError: if a line before the last is not a valid record.
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for number, line in enumerate(lines, start=1):
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError) as error:
      if number == len(lines):
        logging.warning("Dropping the unreadable last line of %s (%s).", path, _first_line(error))
        continue
      raise ResumeError(
        f"line {number} of {path} is not a valid metrics record ({_first_line(error)}); "
        "repair or remove that line to resume."
      ) from error
    if step <= last_step:
      records.append(line if line.endswith("\n") else line + "\n")
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    f.writelines(records)
  os.replace(temporary, path)


# Files a run writes when it finishes, which describe the run up to that step.
FINAL_OUTPUTS = ("summary.json", "rates.npz", "rates_histogram.png", "baseline_scores.npz")


# The name of a final output set aside at step N, e.g. summary_step60.json.
_SET_ASIDE = re.compile(
  "|".join(
    re.escape(os.path.splitext(name)[0]) + r"_step\d+" + re.escape(os.path.splitext(name)[1])
    for name in FINAL_OUTPUTS
  )
)


def check_no_final_outputs(workdir: str) -> None:
  """Raises ResumeError if `workdir` has final outputs but the run would start afresh.

  Without a checkpoint a run starts from step 0 and rewrites config.json, the
  split record and metrics.jsonl. The final outputs of the earlier run, or
  those it set aside (summary_step60.json), would then describe another
  config, and a sweep would reuse a summary.json as this run's.
  """
  found = sorted(
    name for name in os.listdir(workdir) if name in FINAL_OUTPUTS or _SET_ASIDE.fullmatch(name)
  )
  if found:
    raise ResumeError(
      f"{workdir} has the final outputs of a finished run ({', '.join(found)}) but no "
      "checkpoint to resume from, so a run there would start afresh beside them; use a new "
      "--workdir, or move those files out of it to start afresh there."
    )


def set_aside_final_outputs(
  workdir: str, step: int, total_steps: int, steps_per_epoch: int
) -> None:
  """Renames a finished run's final outputs before the run trains further.

  A resumed run that trains more steps (more epochs) writes its final outputs
  only at its end. Until then no summary.json may describe the shorter run,
  or a sweep would reuse it, and the new outputs must not overwrite the old
  ones. Each file of `FINAL_OUTPUTS` is kept with `_step<N>` before its
  extension, e.g. summary_step60.json, where N is the step the outputs
  describe: the epochs in summary.json times `steps_per_epoch`. It can be
  later than `step`, the step the run resumes at, when the last checkpoints
  were deleted. config.json is copied to config_step<N>.json, because the
  caller then rewrites it with the new `train.num_epochs`.

  Raises:
    ResumeError: if a file of that name is already there, so that no earlier
      output is overwritten.
  """
  summary_path = os.path.join(workdir, "summary.json")
  if step >= total_steps or not os.path.exists(summary_path):
    return
  try:
    with open(summary_path) as f:
      final_step = len(json.load(f)["test_accuracy_per_epoch"]) * steps_per_epoch
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise ResumeError(
      f"{summary_path} cannot be read ({_first_line(error)}), so the step it describes is "
      "unknown and it cannot be set aside; move it out of the workdir to resume."
    ) from error
  moves = []
  for name in ("config.json", *FINAL_OUTPUTS):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      stem, extension = os.path.splitext(name)
      aside_path = os.path.join(workdir, f"{stem}_step{final_step}{extension}")
      if (
        name == "config.json"
        and os.path.exists(aside_path)
        and filecmp.cmp(path, aside_path, shallow=False)
      ):
        # Copied by an earlier attempt that was stopped before the other files moved.
        continue
      if os.path.exists(aside_path):
        raise ResumeError(
          f"{path} would be set aside as {aside_path}, which already exists; move one of "
          "them out of the workdir to resume."
        )
      moves.append((name, path, aside_path))
  for name, path, aside_path in moves:
    # config.json is copied, so that a run killed before the caller rewrites it can still resume.
    if name == "config.json":
      shutil.copyfile(path, aside_path)
    else:
      os.replace(path, aside_path)
    logging.info(
      "Resuming at step %d to train to step %d, so %s (step %d) is kept as %s.",
      step, total_steps, name, final_step, aside_path,
    )  # fmt: skip
