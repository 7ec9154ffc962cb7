r"""Trains a config with and without per-instance rates and writes a Markdown table.

  python -m experiments.uniform_vs_ddlr --config=configs/default.py \
    --workdir=runs/uniform_vs_ddlr --seeds=0,1,2

Each (method, seed) run gets its own subdirectory; a run whose `summary.json`
exists is not repeated, so an interrupted sweep resumes where it stopped. The
table (`results.md` in the workdir) gives mean ± standard deviation over seeds
of the last- and best-epoch test accuracy, the AUROC of the learned rates
against the corruption mask, and the seconds per step.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ddlr import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
flags.DEFINE_string("workdir", None, "Directory that receives one subdirectory per run.")
flags.DEFINE_list("seeds", ["0"], "Comma-separated training seeds.")
flags.mark_flags_as_required(["workdir"])

METHODS = {"uniform": False, "ddlr": True}
COLUMNS = (
  ("last_epoch_test_accuracy", "last-epoch test acc."),
  ("best_epoch_test_accuracy", "best-epoch test acc."),
  ("auroc", "AUROC"),
  ("seconds_per_step", "s/step"),
)


def run_or_load(config, workdir: str) -> dict:
  """Returns the summary of the run in `workdir`, training it first if it has none."""
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    logging.info("Reusing the finished run in %s.", workdir)
    with open(summary_path) as f:
      return json.load(f)
  return train.train_and_evaluate(config, workdir)


def format_cell(values: list[float]) -> str:
  """Formats mean ± std (population) of `values`, or `n/a` when there are none."""
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def results_table(summaries: dict[str, list[dict]], seeds: list[int]) -> str:
  """Returns the Markdown table of the summaries, one row per method."""
  header = "| method | " + " | ".join(title for _, title in COLUMNS) + " |"
  lines = [f"Seeds: {', '.join(map(str, seeds))}.", "", header]
  lines.append("|---" * (len(COLUMNS) + 1) + "|")
  for method, runs in summaries.items():
    cells = [format_cell([run[key] for run in runs if key in run]) for key, _ in COLUMNS]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected command-line arguments: {argv[1:]}.")
  try:
    seeds = [int(seed) for seed in FLAGS.seeds]
  except ValueError:
    print(f"error: --seeds must be integers, got {FLAGS.seeds}.", file=sys.stderr)
    sys.exit(1)
  summaries = {}
  for method, enabled in METHODS.items():
    summaries[method] = []
    for seed in seeds:
      config = FLAGS.config.copy_and_resolve_references()
      config.ddlr.enabled = enabled
      config.seed = seed
      workdir = os.path.join(FLAGS.workdir, f"{method}_seed{seed}")
      summaries[method].append(run_or_load(config, workdir))
  table = results_table(summaries, seeds)
  path = os.path.join(FLAGS.workdir, "results.md")
  with open(path, "w") as f:
    f.write(table)
  print(table)
  print(f"table written to {path}")


if __name__ == "__main__":
  app.run(main)
