r"""Uniform against per-instance rates under label noise, over seeds.

Trains one architecture on each noise setting (symmetric 20/40/60/80% and
pairflip 40% by default), with the uniform base optimizer and with rates
learned against the clean reference split. The Markdown table gives mean ±
std over seeds of the last- and best-epoch test accuracy, the AUROC of the
learned rates against the corruption mask and the realised noise rate.

  # CIFAR-10 with ResNet-18, 3 seeds (GPU or TPU scale).
  python -m experiments.noisy_labels --dataset=cifar10 --model=resnet18 \
    --seeds=0,1,2 --workdir=runs/noisy_cifar10

  # CPU scale: Fashion-MNIST with the small CNN (or --model=resnet18).
  python -m experiments.noisy_labels --dataset=fashion_mnist --model=small_cnn \
    --seeds=0,1,2 --workdir=runs/noisy_fmnist

  # End to end in a few minutes on a CPU.
  python -m experiments.noisy_labels --dataset=fashion_mnist --model=small_cnn \
    --small --workdir=runs/noisy_small

Rerunning the same command reuses finished runs and resumes interrupted ones.
The table is written to `results.md` in the workdir.

`--data_source`, `--data_dir` and `--manual_dir` set where every run reads
its data (config.data.source, data_dir and manual_dir), e.g. the extracted
CIFAR python archive with `--data_source=idx --manual_dir=DIR`.
"""

from absl import flags

from configs import common
from ddlr import cli
from ddlr import data as data_lib
from experiments import paper_configs, sweep

FLAGS = flags.FLAGS

# Symmetric noise from 20% to 80% and pairflip at 40%.
DEFAULT_SETTINGS = (
  "symmetric:0.2",
  "symmetric:0.4",
  "symmetric:0.6",
  "symmetric:0.8",
  "pairflip:0.4",
)
COLUMNS = (
  ("last_epoch_test_accuracy", "last-epoch test acc."),
  ("best_epoch_test_accuracy", "best-epoch test acc."),
  ("auroc", "AUROC"),
  ("realised_noise_rate", "realised noise"),
)


def parse_setting(text: str) -> tuple[str, float]:
  """Returns (kind, rate) of a `kind:rate` noise setting.

  Raises:
    ValueError: for another form, an unknown kind, a rate outside (0, 1) or
      a rate that `config.data.noise` rejects for the kind (pairflip from 0.5).
  """
  kind, separator, rate_text = text.partition(":")
  noisy_kinds = [kind for kind in common.NOISE_KINDS if kind != "none"]
  if not separator or kind not in noisy_kinds:
    raise ValueError(
      f"--settings has {text!r}; expected kind:rate with kind one of {', '.join(noisy_kinds)}."
    )
  try:
    rate = float(rate_text)
  except ValueError:
    raise ValueError(f"--settings has {text!r}; the rate {rate_text!r} is not a number.") from None
  if not 0.0 < rate < 1.0:
    raise ValueError(f"--settings has {text!r}; expected a rate in (0, 1).")
  try:
    data_lib.check_noise_config(kind, rate)
  except data_lib.DataError as error:
    raise ValueError(f"--settings has {text!r}: {error}.") from None
  return kind, rate


def noise_rows(dataset: str, model: str, settings: list[str], small: bool) -> list[sweep.Row]:
  """Returns a uniform and a ddlr row for every noise setting, grouped by setting.

  Raises:
    ValueError: for an invalid setting, dataset or model, or a setting listed twice.
  """
  if model not in paper_configs.models_of(dataset):
    raise ValueError(
      f"--model={model!r} is invalid for {dataset}; expected one of "
      f"{', '.join(paper_configs.models_of(dataset))}."
    )
  parsed = [parse_setting(setting) for setting in settings]
  # Row names carry the rate as %g, so 0.4 and 0.40 are the same setting.
  sweep.check_unique("--settings", [f"{kind}:{rate:g}" for kind, rate in parsed])
  rows = []
  for kind, rate in parsed:
    group = f"{kind} {rate:g}"
    for method in paper_configs.METHODS:
      config = paper_configs.build_config(
        dataset, model, method, noise=kind, rate=rate, small=small
      )
      rows.append(sweep.Row(f"{kind}{rate:g}_{method}", config, group=group))
  return rows


def define_flags() -> None:
  """Defines the sweep's command-line flags.

  Only the entry point calls it, so tests can import this module beside other
  sweeps that define flags of the same names.
  """
  flags.DEFINE_string("workdir", None, "Directory that receives one subdirectory per run.")
  flags.DEFINE_string("dataset", "cifar10", f"One of {', '.join(paper_configs.DATASETS)}.")
  flags.DEFINE_string("model", "resnet18", "Architecture, one the dataset's config offers.")
  flags.DEFINE_list(
    "settings",
    list(DEFAULT_SETTINGS),
    "Noise settings as kind:rate, the kind symmetric or pairflip and the rate in (0, 1); "
    "a pairflip rate must be below 0.5.",
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
    rows = noise_rows(FLAGS.dataset, FLAGS.model, FLAGS.settings, FLAGS.small)
    for row in rows:
      cli.set_data_location(row.config, location)
  except ValueError as error:
    cli.exit_with_error(error)
  incomplete = sweep.run_and_report(rows, seeds, FLAGS.workdir, COLUMNS)
  sweep.exit_if_incomplete(incomplete, len(rows) * len(seeds))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
