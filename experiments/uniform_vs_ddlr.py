r"""Trains a config with and without per-instance rates and writes a Markdown table.

  python -m experiments.uniform_vs_ddlr --config=configs/default.py \
    --workdir=runs/uniform_vs_ddlr --seeds=0,1,2

Each (method, seed) run gets its own subdirectory; a run whose `summary.json`
exists is not repeated, so an interrupted sweep resumes where it stopped. The
table (`results.md` in the workdir) gives mean ± standard deviation over seeds
of the last- and best-epoch test accuracy, the AUROC of the learned rates
against the corruption mask, and the seconds per step. The sweep sets
`config.ddlr.enabled` of each row itself, so a config with `ddlr.enabled=False`
or a baseline is rejected before any run starts.
"""

from absl import flags

from ddlr import cli
from ddlr.config_checks import ConfigError
from experiments import sweep

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; only the entry point calls it, so tests can import this."""
  cli.define_config_flag("configs/default.py", "Experiment config file.")
  flags.DEFINE_string("workdir", None, "Directory that receives one subdirectory per run.")
  flags.DEFINE_list("seeds", ["0"], "Comma-separated training seeds.")
  flags.mark_flags_as_required(["workdir"])


def check_supported(config) -> None:
  """Raises ConfigError naming each setting of `config` that the sweep cannot apply.

  These are `ddlr.enabled=False`, which the sweep overrides in its ddlr row,
  and a baseline other than 'none', which its ddlr row cannot train with.
  """
  unsupported, reasons = [], []
  if not config.ddlr.enabled:
    unsupported.append("config.ddlr.enabled=False")
    reasons.append(
      "The sweep sets config.ddlr.enabled itself, to False in its uniform row and True in its "
      "ddlr row."
    )
  if config.baseline.name != "none":
    unsupported.append(f"config.baseline.name={config.baseline.name!r}")
    reasons.append(
      "A baseline replaces the per-instance rates, so the ddlr row cannot train with one."
    )
  if unsupported:
    settings = "these settings" if len(unsupported) > 1 else "this setting"
    hint = ""
    if config.baseline.name != "none":
      hint = " To compare the baselines, run experiments.noisy_comparison."
    raise ConfigError(
      f"uniform_vs_ddlr does not support {' and '.join(unsupported)}. {' '.join(reasons)} "
      f"Remove {settings} and rerun.{hint}"
    )


def method_rows(config) -> list[sweep.Row]:
  """Returns the two rows of the sweep: `config` without and with per-instance rates.

  Raises:
    ConfigError: from `check_supported`.
  """
  check_supported(config)
  rows = []
  for name, enabled in (("uniform", False), ("ddlr", True)):
    row_config = config.copy_and_resolve_references()
    row_config.ddlr.enabled = enabled
    rows.append(sweep.Row(name, row_config))
  return rows


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags has rejected positional arguments.
  try:
    seeds = sweep.parse_seeds(FLAGS.seeds)
    rows = method_rows(FLAGS.config)
  except ValueError as error:
    cli.exit_with_error(error)
  incomplete = sweep.run_and_report(rows, seeds, FLAGS.workdir, relative_time_to="uniform")
  sweep.exit_if_incomplete(incomplete, len(rows) * len(seeds))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
