r"""Compares ddlr with every baseline on noisy Fashion-MNIST and writes one table per noise.

  python -m experiments.noisy_comparison --workdir=runs/noisy_comparison \
    --size=cpu --seeds=0,1,2

Noise settings: symmetric 40%, symmetric 60% and pairflip 40%. Every method
uses the same data, model, optimizer, schedule and seeds; only the method
differs. Rows are grouped by whether the method reads the trusted clean
reference split (ddlr with `reference`, learning to reweight) or uses no
trusted data (uniform, hypergradient, Data Parameters, small loss, and ddlr
with the reference given by `--untrusted_reference`, by default `small_loss`
selected within each observed label). Runs go to
`workdir/<setting>/<method>_seed<k>`; finished runs are reused and
interrupted ones resume. Each setting's table is written to
`workdir/results_<setting>.md`.

Hyperparameters are the config defaults (see configs/default.py), except
that small loss sets its forget rate tau to the setting's true noise rate,
as Co-teaching does when the rate is known.

`--data_source`, `--data_dir` and `--manual_dir` set where every run reads
its data (config.data.source, data_dir and manual_dir), e.g. Fashion-MNIST
IDX files with `--data_source=idx --manual_dir=DIR`.
"""

import ml_collections
from absl import flags

from configs import default
from ddlr import cli
from experiments import sweep

NOISE_SETTINGS = {
  "symmetric40": ("symmetric", 0.4),
  "symmetric60": ("symmetric", 0.6),
  "pairflip40": ("pairflip", 0.4),
}
SIZES = ("full", "cpu", "smoke")
# Every name in references.REFERENCES is in exactly one of these (tested), so a
# new reference has to be classified before it can be offered as untrusted.
TRUSTED_REFERENCES = ("reference",)
UNTRUSTED_REFERENCES = ("batch", "lookahead", "split", "momentum", "small_loss", "small_loss_split")
TRUSTED_GROUP = "uses the trusted reference split"
UNTRUSTED_GROUP = "uses no trusted data"
COLUMNS = (
  ("last_epoch_test_accuracy", "last-epoch test acc."),
  ("best_epoch_test_accuracy", "best-epoch test acc."),
  ("auroc", "AUROC"),
  ("noisy_precision_lowest_10pct", "noisy share of 10% lowest"),
)

FLAGS = flags.FLAGS


def base_config(size: str) -> ml_collections.ConfigDict:
  """Returns the shared config of every run at `size`; each row changes only its method."""
  if size not in SIZES:
    raise ValueError(f"size={size!r} is invalid; expected one of {list(SIZES)}.")
  config = default.get_config()
  config.checkpoint.every_steps = 0  # epoch ends only; the runs are short
  if size == "cpu":
    config.data.num_train = 10_000
    config.model.width = 16
    config.train.num_epochs = 20
    config.baseline.small_loss.ramp_epochs = 5.0
  elif size == "smoke":
    config.data.num_train = 1024
    config.data.num_test = 1000
    config.data.reference_size = 100
    config.ddlr.reference_batch_size = 64
    config.baseline.reference_batch_size = 64
    config.model.width = 4
    config.train.num_epochs = 2
    config.train.batch_size = 64
    config.train.log_every_steps = 8
    config.baseline.small_loss.ramp_epochs = 1.0
  else:
    config.train.num_epochs = 30
  return config


def method_rows(
  config: ml_collections.ConfigDict, kind: str, rate: float, untrusted_reference: str
) -> list[sweep.Row]:
  """Returns the rows of one noise setting, trusted-reference methods first."""
  config = config.copy_and_resolve_references()
  config.data.noise.kind = kind
  config.data.noise.rate = rate

  def variant(ddlr_enabled: bool, baseline: str = "none", reference: str = "reference"):
    row_config = config.copy_and_resolve_references()
    row_config.ddlr.enabled = ddlr_enabled
    row_config.ddlr.reference = reference
    row_config.baseline.name = baseline
    # Selecting within each label keeps hard classes from losing their rates as a whole.
    row_config.ddlr.small_loss_per_class = reference.startswith("small_loss")
    if baseline == "small_loss":
      row_config.baseline.small_loss.forget_rate = rate
    return row_config

  return [
    sweep.Row("ddlr_reference", variant(True), TRUSTED_GROUP),
    sweep.Row("learning_to_reweight", variant(False, "learning_to_reweight"), TRUSTED_GROUP),
    sweep.Row("uniform", variant(False), UNTRUSTED_GROUP),
    sweep.Row("hypergradient", variant(False, "hypergradient"), UNTRUSTED_GROUP),
    sweep.Row("data_parameters", variant(False, "data_parameters"), UNTRUSTED_GROUP),
    sweep.Row("small_loss", variant(False, "small_loss"), UNTRUSTED_GROUP),
    sweep.Row(
      f"ddlr_{untrusted_reference}", variant(True, reference=untrusted_reference), UNTRUSTED_GROUP
    ),
  ]


def setting_table(
  setting: str, rows: list[sweep.Row], summaries: dict[str, list[dict]], seeds
) -> str:
  """Returns the Markdown table of one noise setting, with its heading and groups."""
  kind, rate = NOISE_SETTINGS[setting]
  groups = {row.name: row.group for row in rows}
  table = sweep.results_table(summaries, seeds, COLUMNS, groups=groups, relative_time_to="uniform")
  return f"## {kind} noise, rate {rate:g}\n\n{table}"


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags has rejected positional arguments.
  unknown = [name for name in FLAGS.settings if name not in NOISE_SETTINGS]
  try:
    seeds = sweep.parse_seeds(FLAGS.seeds)
    if unknown:
      raise ValueError(f"--settings has unknown {unknown}; expected some of {list(NOISE_SETTINGS)}")
    sweep.check_unique("--settings", FLAGS.settings)
    config = base_config(FLAGS.size)
    cli.set_data_location(config, cli.data_location())
  except ValueError as error:
    cli.exit_with_error(error)
  # Every setting runs before the exit, so one sweep command advances all of them.
  incomplete, num_runs = [], 0
  for setting in FLAGS.settings:
    kind, rate = NOISE_SETTINGS[setting]
    rows = method_rows(config, kind, rate, FLAGS.untrusted_reference)
    setting_dir = f"{FLAGS.workdir}/{setting}"
    summaries = sweep.run_rows(rows, seeds, setting_dir)
    setting_incomplete = sweep.incomplete_runs(summaries, seeds, setting_dir)
    table = setting_table(setting, rows, summaries, seeds)
    sweep.write_and_print(
      FLAGS.workdir, table, setting_incomplete, len(rows) * len(seeds), f"results_{setting}.md"
    )
    incomplete += setting_incomplete
    num_runs += len(rows) * len(seeds)
  sweep.exit_if_incomplete(incomplete, num_runs)


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a program, so importing is free."""
  flags.DEFINE_string("workdir", None, "Directory that receives one subdirectory per setting.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Comma-separated training seeds.")
  flags.DEFINE_enum(
    "size",
    "cpu",
    SIZES,
    "full: every training example, width 32, 30 epochs (an accelerator); cpu: 10,000 "
    "training examples, width 16, 20 epochs; smoke: a plumbing check of a few seconds a run.",
  )
  flags.DEFINE_enum(
    "untrusted_reference",
    "small_loss",
    UNTRUSTED_REFERENCES,
    "config.ddlr.reference of the ddlr row that uses no trusted data; the small-loss "
    "references select within each observed label (config.ddlr.small_loss_per_class).",
  )
  flags.DEFINE_list(
    "settings", list(NOISE_SETTINGS), f"Noise settings to run, a subset of {list(NOISE_SETTINGS)}."
  )
  cli.define_data_flags()
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
