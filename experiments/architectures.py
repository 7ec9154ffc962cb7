r"""Uniform against per-instance rates for each CNN architecture, over seeds.

Tests whether learned rates help across CNN architectures. The sweep trains
every listed model with the uniform base optimizer and with per-instance rates
(configs/cifar.py or configs/fashion_mnist.py, clean labels) and writes a
Markdown table of mean ± std over seeds.

  # CIFAR-10, every architecture, 3 seeds (GPU or TPU scale).
  python -m experiments.architectures --dataset=cifar10 --seeds=0,1,2 \
    --workdir=runs/architectures_cifar10

  # CPU scale: Fashion-MNIST, small CNN and narrow ResNet-18.
  python -m experiments.architectures --dataset=fashion_mnist --seeds=0,1,2 \
    --workdir=runs/architectures_fmnist

  # End to end in a few minutes on a CPU.
  python -m experiments.architectures --dataset=fashion_mnist --small \
    --workdir=runs/architectures_small

Rerunning the same command reuses finished runs and resumes interrupted ones.
The table is written to `results.md` in the workdir.

`--data_source`, `--data_dir` and `--manual_dir` set where every run reads
its data (config.data.source, data_dir and manual_dir), e.g. the extracted
CIFAR python archive with `--data_source=idx --manual_dir=DIR`.
"""

from absl import flags

from ddlr import cli
from experiments import paper_configs, sweep

FLAGS = flags.FLAGS

COLUMNS = (
  ("last_epoch_test_accuracy", "last-epoch test acc."),
  ("best_epoch_test_accuracy", "best-epoch test acc."),
  ("seconds_per_step", "s/step"),
)


def architecture_rows(dataset: str, models: list[str], small: bool) -> list[sweep.Row]:
  """Returns a uniform and a ddlr row for every model, grouped by model.

  Raises:
    ValueError: for an unknown dataset, a model its config does not offer or
      a model listed twice.
  """
  sweep.check_unique("--models", models)
  available = paper_configs.models_of(dataset)
  unknown = [model for model in models if model not in available]
  if unknown:
    raise ValueError(
      f"--models has {', '.join(unknown)}, which {dataset} does not offer; expected "
      f"some of {', '.join(available)}."
    )
  rows = []
  for model in models or available:
    for method in paper_configs.METHODS:
      config = paper_configs.build_config(dataset, model, method, small=small)
      rows.append(sweep.Row(f"{model}_{method}", config, group=model))
  return rows


def define_flags() -> None:
  """Defines the sweep's command-line flags.

  Only the entry point calls it, so tests can import this module beside other
  sweeps that define flags of the same names.
  """
  flags.DEFINE_string("workdir", None, "Directory that receives one subdirectory per run.")
  flags.DEFINE_string("dataset", "cifar10", f"One of {', '.join(paper_configs.DATASETS)}.")
  flags.DEFINE_list(
    "models", [], "Architectures to compare; every model of the dataset when left out."
  )
  flags.DEFINE_list("seeds", ["0"], "Comma-separated training seeds.")
  flags.DEFINE_bool("small", False, "Use the configs' `small` size, a run of seconds on a CPU.")
  cli.define_data_flags()
  flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags has rejected positional arguments.
  try:
    seeds = sweep.parse_seeds(FLAGS.seeds)
    location = cli.data_location()
    rows = architecture_rows(FLAGS.dataset, FLAGS.models, FLAGS.small)
    for row in rows:
      cli.set_data_location(row.config, location)
  except ValueError as error:
    cli.exit_with_error(error)
  incomplete = sweep.run_and_report(rows, seeds, FLAGS.workdir, COLUMNS)
  sweep.exit_if_incomplete(incomplete, len(rows) * len(seeds))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
