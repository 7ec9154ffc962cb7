r"""Compares ways to personalise a model toward a target distribution, as Markdown tables.

  python -m experiments.personalisation --config=configs/personalisation.py:cpu \
    --workdir=runs/personalisation --seeds=0,1,2

Two target settings, each with the same model, schedule and seeds:

- `classes`: class-prior shift toward the classes of the config's
  `data.target.classes` (2, 4 and 6 in configs/personalisation.py);
- `transform`: covariate shift, `--fraction` of the images carry
  `--transform`.

and six methods:

- `uniform`: every training instance at the same rate (`ddlr.enabled=False`);
- `finetune`: `uniform`, then `--finetune_epochs` epochs on the target sample;
- `target_only`: training on the target sample alone
  (`data.target.train_on='target_sample'`);
- `learning_to_reweight`: `config.baseline.name='learning_to_reweight'` with
  the target sample as its clean set; skipped, with a logged message, while
  the config has no `baseline` section;
- `ddlr`: per-instance rates learned against the target sample;
- `ddlr_finetune`: `ddlr`, then the same fine-tuning as `finetune`, which
  tests whether the personalised model is the better start for fine-tuning.

Each run trains in `workdir/<setting>_<method>_seed<k>`; finished runs are
reused and interrupted ones resume. The tables (`results.md`) give mean ± std
over seeds of the target-test and rest-of-test accuracy of the final model
(after fine-tuning for `finetune` and `ddlr_finetune`), the best-epoch
target-test accuracy and, for the methods with per-instance rates, the AUROC
of the learned rates for "training instance is from the target domain" (of a
target class, or carrying the transform).
"""

import ml_collections
from absl import flags, logging

from ddlr import cli
from ddlr.data import targets
from experiments import sweep

FLAGS = flags.FLAGS

SETTINGS = ("classes", "transform")
METHODS = ("uniform", "finetune", "target_only", "learning_to_reweight", "ddlr", "ddlr_finetune")
# target_domain_auroc is in the summaries of runs with per-instance rates; other rows read n/a.
COLUMNS = (
  ("final_target_test_accuracy", "target-test acc."),
  ("final_rest_test_accuracy", "rest-of-test acc."),
  ("best_epoch_target_test_accuracy", "best-epoch target-test acc."),
  ("target_domain_auroc", "target-domain AUROC"),
)


def setting_config(
  config: ml_collections.ConfigDict, setting: str, transform: str, fraction: float
) -> ml_collections.ConfigDict:
  """Returns a copy of `config` with the target of `setting`.

  `classes` keeps the config's target classes; `transform` replaces them by
  the transformation of `fraction` of the images.
  """
  config = config.copy_and_resolve_references()
  target = config.data.target
  if setting == "classes":
    if not target.classes:
      raise ValueError(
        "the 'classes' setting needs config.data.target.classes, e.g. (5, 7, 9); "
        f"got {tuple(target.classes)!r}"
      )
    target.kind, target.transform, target.fraction = "classes", "none", 0.0
  else:
    target.kind, target.classes = "transform", ()
    target.transform, target.fraction = transform, fraction
  return config


def check_fraction(fraction: float, num_test: int) -> None:
  """Raises ValueError unless `--fraction` is in (0, 1) and marks some, not all, test images.

  `num_test` is `config.data.num_test`. When it is 0 (the whole test split)
  the count is checked once the data is loaded, in config terms.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(
      f"--fraction={fraction:g} is invalid; expected the share of training and test images "
      "that carry --transform, in (0, 1), e.g. 0.1."
    )
  marked = targets.domain_size(num_test, fraction)
  if num_test and not 0 < marked < num_test:
    raise ValueError(
      f"--fraction={fraction:g} marks round({fraction:g} * {num_test}) = {marked} of the "
      f"{num_test} test images (config.data.num_test), so the target or the rest of the test "
      f"set is empty; expected a fraction from 1/{num_test} to {num_test - 1}/{num_test}, "
      "e.g. 0.1."
    )


def method_config(config, method: str, finetune_epochs: int) -> ml_collections.ConfigDict | None:
  """Returns `config` set up for `method`, or None when the code lacks the method."""
  config = config.copy_and_resolve_references()
  config.ddlr.enabled = method in ("ddlr", "ddlr_finetune")
  if method in ("finetune", "ddlr_finetune"):
    config.finetune.epochs = finetune_epochs
  elif method == "target_only":
    config.data.target.train_on = "target_sample"
  elif method == "learning_to_reweight":
    if "baseline" not in config:
      logging.warning(
        "Skipping learning_to_reweight: this config has no `baseline` section, so the "
        "method is not available in this version of ddlr."
      )
      return None
    # Its clean set is the reference split, which here is the target sample.
    config.baseline.name = "learning_to_reweight"
  return config


def sweep_rows(config, *, transform: str, fraction: float, finetune_epochs: int, methods):
  """Returns the sweep's rows, setting by setting, each method in the order of `methods`."""
  rows = []
  for setting in SETTINGS:
    base = setting_config(config, setting, transform, fraction)
    for method in methods:
      row_config = method_config(base, method, finetune_epochs)
      if row_config is None:
        continue
      rows.append(sweep.Row(f"{setting}_{method}", row_config, group=setting))
  return rows


def tables(summaries: dict[str, list[dict]], seeds: list[int], transform: str) -> str:
  """Returns one Markdown table per setting."""
  parts = []
  for setting, title in (
    ("classes", "Class-prior shift"),
    ("transform", f"Covariate shift ({transform})"),
  ):
    rows = {name: runs for name, runs in summaries.items() if name.startswith(f"{setting}_")}
    if rows:
      parts.append(f"### {title}\n\n" + sweep.results_table(rows, seeds, COLUMNS))
  return "\n".join(parts)


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so tests can import this module."""
  cli.define_config_flag(
    "configs/personalisation.py", "Experiment config file; ':cpu' or ':quick' shrinks it."
  )
  flags.DEFINE_string("workdir", None, "Directory that receives one subdirectory per run.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Comma-separated training seeds.")
  flags.DEFINE_enum(
    "transform", "rot90", ["rot90", "invert"], "Transformation of the covariate shift."
  )
  flags.DEFINE_float(
    "fraction",
    0.1,
    "Share of training and test images that carry the transform, in (0, 1); sets "
    "config.data.target.fraction of the covariate-shift rows.",
  )
  # 0 epochs would make `finetune` a copy of `uniform` and `ddlr_finetune` of `ddlr`.
  flags.DEFINE_integer(
    "finetune_epochs",
    10,
    "Epochs of the `finetune` and `ddlr_finetune` methods on the target sample, at least 1.",
    lower_bound=1,
  )
  flags.DEFINE_list("methods", None, "Methods to run, all when unset.")
  flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags has rejected positional arguments.
  methods = FLAGS.methods or list(METHODS)
  unknown = sorted(set(methods) - set(METHODS))
  try:
    seeds = sweep.parse_seeds(FLAGS.seeds)
    if unknown:
      raise ValueError(f"--methods has unknown names {unknown}; expected some of {list(METHODS)}")
    sweep.check_unique("--methods", methods)
    check_fraction(FLAGS.fraction, FLAGS.config.data.num_test)
    rows = sweep_rows(
      FLAGS.config,
      transform=FLAGS.transform,
      fraction=FLAGS.fraction,
      finetune_epochs=FLAGS.finetune_epochs,
      methods=methods,
    )
  except ValueError as error:
    cli.exit_with_error(error)
  summaries = sweep.run_rows(rows, seeds, FLAGS.workdir)
  incomplete = sweep.incomplete_runs(summaries, seeds, FLAGS.workdir)
  num_runs = len(rows) * len(seeds)
  table = tables(summaries, seeds, FLAGS.transform)
  sweep.write_and_print(FLAGS.workdir, table, incomplete, num_runs)
  sweep.exit_if_incomplete(incomplete, num_runs)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
