"""A run's working directory: what a new run must check and move before it writes there.

A workdir contains one run: `config.json`, `split_record.npz`, `checkpoints/`,
`metrics.jsonl` and, once the run finishes, its final outputs. A run that
finds earlier files resumes the run they describe, or is rejected before it
writes anything, so that no earlier result is overwritten or mixed with a
different run's.
"""

import contextlib
import fcntl
import filecmp
import json
import os
import re
import shutil

import ml_collections
import numpy as np
from absl import logging

from ddlr import data as data_lib
from ddlr.checkpoint import ResumeError, describe_error
from ddlr.config_checks import ConfigError

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
    # Where the data is read from. A resumed run checks the split it loads
    # against its split record (`check_split_record`).
    "data.source",
    "data.data_dir",
    "data.manual_dir",
    # Every alignment path computes the same alignment (tests check them
    # against per-example gradients), so switching paths keeps the method.
    "ddlr.alignment",
    # Only the order of the two halves' passes changes, not their results.
    "ddlr.split_sequential",
  }
)
# Fields of SAFE_TO_CHANGE that leave a finished run's results as they are:
# a finished run differing from the new config only in these is reused without
# loading its data. train.stop_after_steps is one of them, since a finished run
# has no steps left to stop before. data.data_dir and data.manual_dir only
# locate the same data. data.source is not one of them: the raw-file order of
# CIFAR is untested against a prepared tfds split (`raw_files.tfds_order`), so
# another source may give another split. A finished run whose source changed
# is resumed instead, which loads the data, checks the split against its
# record and then returns the saved summary.
OUTCOME_NEUTRAL = SAFE_TO_CHANGE - {"train.num_epochs", "data.source"}
# Fields added to the config after runs were saved without them, each with the
# value that trains as those runs did. A saved config that lacks one of these
# fields is read as having that value.
ADDED_FIELDS = {"ddlr.split_batch_stats": "batch", "ddlr.split_sequential": False}


def make_workdir(workdir: str) -> None:
  """Creates `workdir` and its parents if missing.

  Raises:
    ConfigError: if `workdir` exists and is not a directory, is a dangling
      symbolic link, cannot be created or is not writable.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} exists and is not a directory; give a directory.")
  if os.path.islink(workdir) and not os.path.exists(workdir):
    raise ConfigError(
      f"--workdir {workdir} is a symbolic link to {os.readlink(workdir)}, which does not exist; "
      "create that directory or give another --workdir."
    )
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise ConfigError(
      f"--workdir {workdir} cannot be created ({describe_error(error)}); give a directory "
      "that can be created."
    ) from error
  if not os.access(workdir, os.W_OK):
    raise ConfigError(f"--workdir {workdir} is not writable; give a writable directory.")


@contextlib.contextmanager
def hold_workdir(workdir: str):
  """Holds an exclusive lock on the directory `workdir` while the block runs.

  Two runs in one workdir would write into each other's checkpoints and
  metrics. The lock is an advisory `flock` on the directory itself, so the
  workdir gains no file, and the system releases it when the process ends,
  even when it is killed, so no stale lock is left.

  Raises:
    ResumeError: if another process holds the lock, or the file system
      cannot lock the directory.
  """
  descriptor = os.open(workdir, os.O_RDONLY)
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ResumeError(
        f"{workdir} is in use by another run, which has locked it; wait for that run to "
        "end or use another --workdir."
      ) from None
    except OSError as error:
      raise ResumeError(
        f"{workdir} cannot be locked ({describe_error(error)}), so a second run there could "
        "not be stopped; its file system may not support flock (e.g. NFS without a lock "
        "daemon). Use a workdir on a local file system."
      ) from error
    yield
  finally:
    os.close(descriptor)


@contextlib.contextmanager
def removed_if_rejected(directory: str, missing: list[str] | None = None):
  """Removes `directory` and its parents that were created for it, if the block raised a rejection.

  A rejection is a ConfigError, DataError or ResumeError. The checkpoint
  manager creates `checkpoints/` before the data checks run, and
  `make_workdir` creates a run's workdir and its parents, so without this a
  rejected run would leave the workdir changed or an empty folder behind.
  Only empty directories are removed (`os.rmdir`), so a file that another
  process wrote there in the meantime keeps its directory.

  Args:
    directory: the directory that the block may create.
    missing: `missing_directories(directory)` taken before the caller created
      it; by default taken when the block starts.
  """
  if missing is None:
    missing = missing_directories(directory)
  try:
    yield
  except (ConfigError, data_lib.DataError, ResumeError):
    for path in missing:
      try:
        os.rmdir(path)
      except FileNotFoundError:
        continue  # never created
      except OSError:
        break  # not empty, so its parents are not empty either
    raise


def missing_directories(directory: str) -> list[str]:
  """Returns `directory` and its parents up to the first one that exists, deepest first."""
  missing = []
  path = os.path.abspath(directory)
  while not os.path.lexists(path) and path != os.path.dirname(path):
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def read_summary(path: str) -> dict:
  """Returns the summary of a finished run, read from its `summary.json` at `path`.

  Raises:
    ResumeError: if the file cannot be read, is not valid JSON or does not
      contain a JSON object.
  """
  run_dir = os.path.dirname(path) or "."
  remedy = (
    f"move it out of {run_dir} so that the run resumes from its last checkpoint and writes "
    "it again, or remove that run folder to train the run again"
  )
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError) as error:
    raise ResumeError(
      f"the summary {path} of a finished run cannot be read ({describe_error(error)}); {remedy}."
    ) from error
  if not isinstance(summary, dict):
    raise ResumeError(f"the summary {path} of a finished run is not a JSON object; {remedy}.")
  return summary


def check_run_record(workdir: str) -> None:
  """Checks that a workdir with checkpoints also has the files that describe its run.

  Raises:
    ResumeError: if `config.json` or `split_record.npz` is missing.
  """
  for name in ("config.json", "split_record.npz"):
    if not os.path.exists(os.path.join(workdir, name)):
      raise ResumeError(
        f"{workdir} has checkpoints but no {name}, so the run's config cannot be "
        "checked before resuming; restore the file or use a new --workdir."
      )


def check_split_record(record_path: str, data: data_lib.TrainingData) -> None:
  """Checks that `data` has the split recorded in `record_path` by the run being resumed.

  Raises:
    ResumeError: if the noise mask, the labels, the reference ids or the
      target-domain mask differ from the record.
  """
  saved = data_lib.load_split_record(record_path)
  same = (
    np.array_equal(saved.is_noisy, data.is_noisy)
    and np.array_equal(saved.labels, data.labels)
    and np.array_equal(saved.reference_source_index, data.reference_source_index)
    and np.array_equal(saved.is_target_domain, data.is_target_domain)
  )
  if not same:
    raise ResumeError(
      f"{record_path} records a different split (noise mask, labels, reference ids or "
      "target-domain mask) "
      "than this config produces, so the run cannot be resumed; use a new --workdir."
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
      f"the saved config {saved_config_path} cannot be read ({describe_error(error)}), so the "
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


def check_resumable_config(saved_config_path: str, config: ml_collections.ConfigDict) -> dict:
  """Compares the config saved with a run to the new one before resuming.

  Only fields in `SAFE_TO_CHANGE` may differ; any other difference
  (dataset, its size, the noise, the model, the optimizer, the ddlr settings,
  the seed) is rejected.

  Returns:
    {dotted field: (saved value, new value)} for the fields that differ, all
    in `SAFE_TO_CHANGE`, for `log_config_changes` once the resume goes ahead.

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
  return changed


def log_config_changes(changed: dict) -> None:
  """Logs each config field that a resumed run changed, from `check_resumable_config`."""
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
        logging.warning(
          "Dropping the unreadable last line of %s (%s).", path, describe_error(error)
        )
        continue
      raise ResumeError(
        f"line {number} of {path} is not a valid metrics record ({describe_error(error)}); "
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
      output is overwritten, or if final outputs are there without the
      summary.json that gives their step.
  """
  summary_path = os.path.join(workdir, "summary.json")
  if step >= total_steps:
    return
  if not os.path.exists(summary_path):
    # A run stopped while writing its final outputs writes summary.json last.
    found = [name for name in FINAL_OUTPUTS if os.path.exists(os.path.join(workdir, name))]
    if found:
      raise ResumeError(
        f"{workdir} has {', '.join(found)} but no summary.json, so the step these final "
        "outputs describe is unknown and they cannot be set aside before the run trains "
        "further; move them out of the workdir to resume."
      )
    return
  try:
    with open(summary_path) as f:
      final_step = len(json.load(f)["test_accuracy_per_epoch"]) * steps_per_epoch
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise ResumeError(
      f"{summary_path} cannot be read ({describe_error(error)}), so the step it describes is "
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
