"""Shared machinery of the sweeps: run a grid of configs over seeds and tabulate the summaries.

A sweep is a list of `Row`s (a name, a config and an optional group) run for
every seed. Each run trains in `workdir/<name>_seed<k>`. A finished run with
the same config is reused and an interrupted run resumes from its latest
checkpoint, so a sweep can be stopped and restarted at any point.

A run stopped by `config.train.stop_after_steps` before its last step has no
results yet. The tables mark its row `incomplete`, the written file starts
with a list of such runs, and `exit_if_incomplete` ends the program with
`INCOMPLETE_EXIT_STATUS`.
"""

import dataclasses
import os
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging

from ddlr import checkpoint, resume, train
from ddlr import data as data_lib
from ddlr.config_checks import check_reference_batches, reference_batch_source, validate_config

# (summary key, column title) of the default table.
DEFAULT_COLUMNS = (
  ("last_epoch_test_accuracy", "last-epoch test acc."),
  ("best_epoch_test_accuracy", "best-epoch test acc."),
  ("auroc", "AUROC"),
  ("seconds_per_step", "s/step"),
)
# Cell text of a row with a run that has not reached its last step.
INCOMPLETE = "incomplete"
# Written under a table of several seeds, because `format_cell` uses np.std's default ddof=0.
STD_NOTE = "Values after ± are population standard deviations (ddof=0) over seeds."
# Exit status of a sweep that wrote its tables with incomplete rows, distinct from the 1 of errors.
INCOMPLETE_EXIT_STATUS = 3


@dataclasses.dataclass(frozen=True)
class Row:
  """One method or setting of a sweep: a table row, run once per seed."""

  name: str  # also the run directory prefix, so it must be unique within a sweep
  config: ml_collections.ConfigDict
  group: str = ""  # rows with the same group share a sub-table heading


@dataclasses.dataclass(frozen=True)
class IncompleteRun:
  """A run of a sweep that stopped at `config.train.stop_after_steps` before its last step."""

  name: str  # the row's name
  seed: int
  directory: str
  step: int  # the step the run stopped after
  total_steps: int  # the step the run ends at when finished


def run_directory(workdir: str, name: str, seed: int) -> str:
  """Returns the directory of the run of row `name` with `seed`."""
  return os.path.join(workdir, f"{name}_seed{seed}")


def is_finished(summary: dict) -> bool:
  """Returns whether `summary` is a finished run's, not the step reached by a stopped run."""
  # A summary.json lacking the key predates it and was written by a finished run.
  return summary.get("completed", True)


def is_reused(config, workdir: str) -> bool:
  """Returns whether `workdir` contains a finished run that `run_or_load` reuses for `config`.

  That is a run with a `summary.json` whose saved config equals `config` up
  to fields that do not change results (`resume.OUTCOME_NEUTRAL`).
  """
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    return False
  changed = resume.config_differences(os.path.join(workdir, "config.json"), config)
  return set(changed) <= resume.OUTCOME_NEUTRAL


def seed_config(row: Row, seed: int) -> ml_collections.ConfigDict:
  """Returns a copy of the row's config with `seed`."""
  config = row.config.copy_and_resolve_references()
  config.seed = seed
  return config


def run_or_load(config, workdir: str) -> dict:
  """Returns the summary of the run in `workdir`, training it first if it has none.

  A finished run is reused only when its saved config equals `config` up to
  fields that do not change results (`resume.OUTCOME_NEUTRAL`). A run
  whose config differs only in resumable fields (e.g. more epochs, or another
  `data.source`) resumes with `config`, which checks its data split first.

  Raises:
    checkpoint.ResumeError: the finished run was trained with a different
      method, model or data, or for more epochs than `config`, so it is
      neither reused nor overwritten, or its `summary.json` cannot be read.
  """
  summary_path = os.path.join(workdir, "summary.json")
  if is_reused(config, workdir):
    logging.info("Reusing the finished run in %s.", workdir)
    return resume.read_summary(summary_path)
  if os.path.exists(summary_path):
    config_path = os.path.join(workdir, "config.json")
    changed = resume.check_resumable_config(config_path, config)
    _check_fewer_epochs(workdir, changed)
    logging.info(
      "The finished run in %s differs from this sweep's config in %s; resuming it, which "
      "checks its data split and trains only the steps it lacks.",
      workdir,
      ", ".join(sorted(changed)),
    )
  return train.train_and_evaluate(config, workdir)


def _check_fewer_epochs(workdir: str, changed: dict) -> None:
  """Raises ResumeError when the finished run in `workdir` has more epochs than requested.

  Its last checkpoint lies past the end of the shorter run, so the run can be
  neither reused nor resumed. `changed` is `resume.config_differences`.
  """
  if "train.num_epochs" not in changed:
    return
  saved, requested = changed["train.num_epochs"]
  if isinstance(saved, int) and saved > requested:
    raise checkpoint.ResumeError(
      f"{workdir} contains a finished run with config.train.num_epochs={saved}, more than the "
      f"{requested} requested, so it can be neither reused nor resumed; request at least "
      f"{saved} epochs, or remove that run folder to train the run again."
    )


def run_rows(rows: Sequence[Row], seeds: Sequence[int], workdir: str) -> dict[str, list[dict]]:
  """Trains (or reuses) every row for every seed.

  Every row's config is validated before the first run trains, so an invalid
  value fails at once rather than after the rows before it have trained. That
  includes the data section, except the checks that need the loaded data
  (`ddlr.data.check_config`), and the reference batch of each row that
  still has to train.

  Returns:
    The summaries, keyed by row name, one per seed in the order of `seeds`.
    A run stopped by `config.train.stop_after_steps` gives
    `{"completed": False, "step": ..., "total_steps": ...}`.

  Raises:
    ValueError: two rows share a name.
    ConfigError: a row's config is invalid, or its reference batch is larger
      than the examples it is drawn from.
    DataError: a row's data config is invalid, or the data of a row that
      draws reference batches cannot be loaded or is too small for its config.
  """
  names = [row.name for row in rows]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f"sweep rows must have unique names; repeated: {duplicates}")
  for row in rows:
    validate_config(row.config)
  _check_reference_batches(rows, seeds, workdir)
  summaries = {}
  num_runs, run_number = len(rows) * len(seeds), 0
  for row in rows:
    summaries[row.name] = []
    for seed in seeds:
      config = seed_config(row, seed)
      run_dir = run_directory(workdir, row.name, seed)
      run_number += 1
      logging.info(
        "Run %d of %d of this table: %s, seed %d, in %s.",
        run_number,
        num_runs,
        row.name,
        seed,
        run_dir,
      )
      summaries[row.name].append(run_or_load(config, run_dir))
  return summaries


def _check_reference_batches(rows: Sequence[Row], seeds: Sequence[int], workdir: str) -> None:
  """Checks the reference batch of every row that will draw one against the examples it has.

  `train_and_evaluate` checks it once the data is loaded, so without this a
  sweep would train the rows before an oversized one. Rows whose runs are
  all reused are skipped, so that tabulating a finished sweep needs no data.
  Without a target the reference split has `data.reference_size` examples;
  otherwise each distinct data config is loaded once.
  """
  sizes = {}
  for row in rows:
    source = reference_batch_source(row.config)
    if source is None or all(
      is_reused(seed_config(row, seed), run_directory(workdir, row.name, seed)) for seed in seeds
    ):
      continue
    data_config = row.config.data
    if source == "reference split" and data_config.target.kind == "none":
      # load_dataset holds out exactly reference_size examples or raises.
      check_reference_batches(row.config, data_config.reference_size, num_train=0)
      continue
    key = data_config.to_json()
    if key not in sizes:
      data = data_lib.load_dataset(data_config)
      sizes[key] = (len(data.reference_labels), len(data.labels))
      del data  # only the sizes are kept, so one dataset is in memory at a time
    check_reference_batches(row.config, *sizes[key])


def incomplete_runs(
  summaries: dict[str, list[dict]], seeds: Sequence[int], workdir: str
) -> list[IncompleteRun]:
  """Returns the runs of `summaries` (as `run_rows` returns them) that have not finished."""
  return [
    IncompleteRun(name, seed, run_directory(workdir, name, seed), run["step"], run["total_steps"])
    for name, runs in summaries.items()
    for seed, run in zip(seeds, runs, strict=True)
    if not is_finished(run)
  ]


def incomplete_notice(incomplete: Sequence[IncompleteRun], num_runs: int) -> str:
  """Returns a Markdown paragraph listing the incomplete runs and how to resume them."""
  lines = [
    f"Incomplete: {len(incomplete)} of {num_runs} runs stopped at config.train.stop_after_steps "
    f"before their last step, so their rows read `{INCOMPLETE}`:",
    "",
  ]
  for run in incomplete:
    lines.append(
      f"- {run.name}, seed {run.seed}: step {run.step} of {run.total_steps}, in {run.directory}"
    )
  lines += [
    "",
    "To resume them, rerun this command without --config.train.stop_after_steps, or with a "
    "later step.",
  ]
  return "\n".join(lines) + "\n"


def exit_if_incomplete(incomplete: Sequence[IncompleteRun], num_runs: int) -> None:
  """Prints the incomplete runs on standard error and exits with `INCOMPLETE_EXIT_STATUS`.

  Returns without output when `incomplete` is empty.
  """
  if not incomplete:
    return
  print(incomplete_notice(incomplete, num_runs), file=sys.stderr, end="")
  sys.exit(INCOMPLETE_EXIT_STATUS)


def format_cell(values: Sequence[float], digits: int = 4) -> str:
  """Formats mean ± std (population) of `values`, or `n/a` when there are none."""
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def results_table(
  summaries: dict[str, list[dict]],
  seeds: Sequence[int],
  columns: Sequence[tuple[str, str]] = DEFAULT_COLUMNS,
  *,
  groups: dict[str, str] | None = None,
  relative_time_to: str | None = None,
) -> str:
  """Returns a Markdown table of the summaries: one row per name, mean ± std over seeds.

  Args:
    summaries: row name -> summaries (as `run_rows` returns).
    seeds: the seeds the summaries came from, stated above the table.
    columns: (summary key, title) pairs; a key absent from a run is left out
      of that cell, and a cell with no values reads `n/a`. Every cell of a row
      with an unfinished run reads `incomplete`.
    groups: optional row name -> group title; rows are listed in the order of
      `summaries` under a bold group line whenever the group changes.
    relative_time_to: a row name; adds a column with each row's median
      seconds per step divided by that row's, over the same seeds.

  Returns:
    The seeds line, the table and, with more than one seed, `STD_NOTE` under it.

  Raises:
    KeyError: `relative_time_to` is not a row of `summaries`.
  """
  titles = [title for _, title in columns]
  if relative_time_to is not None:
    titles.append(f"time/step vs {relative_time_to}")
    reference_runs = summaries[relative_time_to]
    reference_finished = all(map(is_finished, reference_runs))
    reference_time = _median_time(reference_runs)
  lines = [f"Seeds: {', '.join(map(str, seeds))}.", ""]
  lines.append("| method | " + " | ".join(titles) + " |")
  lines.append("|---" * (len(titles) + 1) + "|")
  current_group = None
  for name, runs in summaries.items():
    group = (groups or {}).get(name)
    if group is not None and group != current_group:
      lines.append(f"| **{group}** |" + " |" * len(titles))
      current_group = group
    if not all(map(is_finished, runs)):
      lines.append(f"| {name} | " + " | ".join([INCOMPLETE] * len(titles)) + " |")
      continue
    cells = [
      format_cell([run[key] for run in runs if run.get(key) is not None]) for key, _ in columns
    ]
    if relative_time_to is not None and not reference_finished:
      cells.append(INCOMPLETE)
    elif relative_time_to is not None:
      time = _median_time(runs)
      ratio = time / reference_time if time and reference_time else None
      cells.append("n/a" if ratio is None else f"{ratio:.2f}x")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if len(seeds) > 1:
    lines += ["", STD_NOTE]
  return "\n".join(lines) + "\n"


def _median_time(runs: list[dict]) -> float | None:
  times = [run["seconds_per_step"] for run in runs if run.get("seconds_per_step")]
  return float(np.median(times)) if times else None


def write_table(workdir: str, table: str, name: str = "results.md") -> str:
  """Writes `table` to `workdir/name` and returns the path.

  A rerun with other seeds, rows or settings tabulates other runs, so an
  existing file with different content is first renamed to the first free
  `<stem>.<k><extension>` (results.1.md, results.2.md, ...), with a warning.
  A file with the same content is left untouched.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  content = table.encode("utf-8")
  if os.path.exists(path):
    with open(path, "rb") as f:
      if f.read() == content:
        return path
    earlier_path = _first_free_numbered_path(path)
    os.replace(path, earlier_path)
    logging.warning(
      "%s had a different table, which was moved to %s before writing the new one.",
      path, earlier_path,
    )  # fmt: skip
  with open(path, "wb") as f:
    f.write(content)
  return path


def _first_free_numbered_path(path: str) -> str:
  """Returns `<stem>.<k><extension>` of `path` for the smallest k >= 1 that does not exist."""
  stem, extension = os.path.splitext(path)
  k = 1
  while os.path.exists(f"{stem}.{k}{extension}"):
    k += 1
  return f"{stem}.{k}{extension}"


def write_and_print(
  workdir: str,
  table: str,
  incomplete: Sequence[IncompleteRun],
  num_runs: int,
  name: str = "results.md",
) -> str:
  """Writes `table` to `workdir/name`, after the incomplete notice if a run is unfinished.

  Prints the table and the path. The caller ends with `exit_if_incomplete`,
  which prints the notice.

  Returns:
    The path written.
  """
  text = table
  if incomplete:
    text = incomplete_notice(incomplete, num_runs) + "\n" + table
  path = write_table(workdir, text, name)
  print(table)
  if incomplete:
    runs = "run" if len(incomplete) == 1 else "runs"
    print(f"partial table, with {len(incomplete)} incomplete {runs}, written to {path}")
  else:
    print(f"table written to {path}")
  return path


def run_and_report(
  rows: Sequence[Row],
  seeds: Sequence[int],
  workdir: str,
  columns: Sequence[tuple[str, str]] = DEFAULT_COLUMNS,
  *,
  relative_time_to: str | None = None,
) -> list[IncompleteRun]:
  """Runs every row for every seed, then writes `results.md` and prints the table.

  Rows with a non-empty group are listed under their group's heading. With
  incomplete runs the table is still written, see `write_and_print`.

  Returns:
    The runs that have not finished, for `exit_if_incomplete`.
  """
  summaries = run_rows(rows, seeds, workdir)
  groups = {row.name: row.group for row in rows if row.group} or None
  table = results_table(summaries, seeds, columns, groups=groups, relative_time_to=relative_time_to)
  incomplete = incomplete_runs(summaries, seeds, workdir)
  write_and_print(workdir, table, incomplete, len(rows) * len(seeds))
  return incomplete


def parse_seeds(values: Sequence[str]) -> list[int]:
  """Returns the integer seeds of a `--seeds` list flag.

  Raises:
    ValueError: a value is not an integer in [0, 2**32 - 1], the range of
      `config.seed`, or is repeated (the message names it).
  """
  seeds = []
  for value in values:
    try:
      seed = int(value)
    except ValueError:
      raise ValueError(f"--seeds must be comma-separated integers, got {value!r}") from None
    if not 0 <= seed <= 2**32 - 1:
      raise ValueError(
        f"--seeds has {seed}, which is invalid; expected seeds in [0, 4294967295], the range "
        "of config.seed."
      )
    seeds.append(seed)
  if not seeds:
    raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds=0,1,2")
  check_unique("--seeds", [str(seed) for seed in seeds])
  return seeds


def check_unique(flag: str, values: Sequence[str]) -> None:
  """Raises ValueError naming the values that the list flag `flag` repeats.

  A repeated value would make two rows share a run directory, or count one
  run twice in a mean.
  """
  repeated = sorted({value for value in values if values.count(value) > 1})
  if repeated:
    raise ValueError(f"{flag} lists {', '.join(repeated)} more than once; give each value once.")
