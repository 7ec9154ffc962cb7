r"""Top Hessian eigenvalues of each class's training loss at several points of training.

For a few classes, the loss is the mean cross-entropy over a fixed sample of
that class's training examples (by observed label). Its top eigenvalues show
whether the curvature differs between classes and changes over training,
which motivates per-instance learning rates (Saxena, Vyas and DeCoste, 2021,
arXiv:2105.13464). Full scale, with a ResNet-18 CIFAR-100 config:

  python -m experiments.hessian_spectrum --config=configs/cifar.py \
    --workdir=runs/hessian_spectrum

Small mode: the small CNN on 8,000 clean Fashion-MNIST training examples for
4 epochs with uniform rates (`configs/default.py` shrunk). It used 2.3 minutes
of CPU time on a 2-core x86-64 machine (jax 0.10.2).

  python -m experiments.hessian_spectrum --small --workdir=runs/hessian_small

In either mode `--data_source`, `--data_dir` and `--manual_dir` set where the
run reads its data (config.data.source, data_dir and manual_dir); with
`--config` a flag and a `--config.data.<field>` override of the same field
are rejected together.

Training runs through `ddlr.train.train_and_evaluate` in `workdir/train`,
stopped with `train.stop_after_steps` at the end of each requested epoch. At
each stop the spectra are computed from that epoch's checkpoint and added to
`workdir/hessian_spectrum.json`, so rerunning the command resumes: recorded
epochs are skipped and training continues from the latest checkpoint. An
epoch that ended before the latest checkpoint and whose checkpoint was
deleted (`config.checkpoint.max_to_keep`) cannot be added later: the rerun
stops with an error before it trains or writes anything. So does a rerun
with another `config.train.num_epochs` once spectra are recorded, because the
learning-rate schedule depends on it. The record stores it as `num_epochs`.
Training stops after the last requested epoch, even before num_epochs. The
outputs `hessian_spectrum.png` and `hessian_spectrum.md` are rewritten from
the JSON at the end of every run.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags, logging

from configs import default as default_config
from ddlr import checkpoint, cli, hessian, reporting, resume, train
from ddlr import data as data_lib
from ddlr.config_checks import ConfigError, validate_config
from ddlr.models import create_model
from experiments import hessian_record, hessian_report

FLAGS = flags.FLAGS

RECORD_NAME = "hessian_spectrum.json"


@dataclasses.dataclass(frozen=True)
class SpectrumSettings:
  """Sample and Lanczos settings of every spectrum, which a resumed run must repeat."""

  classes: tuple[int, ...]
  examples_per_class: int
  top_k: int
  num_iterations: int
  chunk_size: int
  sample_seed: int
  lanczos_seed: int


def small_config():
  """Returns configs/default.py shrunk for a CPU run: clean labels, uniform rates, 4 epochs."""
  config = default_config.get_config()
  config.data.num_train = 8000
  config.data.num_test = 2000
  config.data.reference_size = 0
  config.data.noise.kind = "none"
  config.data.noise.rate = 0.0
  config.ddlr.enabled = False
  config.train.num_epochs = 4
  config.train.log_every_steps = 20
  return config


def spectrum_epochs(requested: list[str], num_epochs: int) -> list[int]:
  """Returns the sorted epochs to analyse: `requested`, or 1, num_epochs // 2 and the last.

  Raises:
    ConfigError: if an epoch is not an integer in [1, num_epochs].
  """
  if not requested:
    return sorted({1, max(1, num_epochs // 2), num_epochs})
  epochs = set()
  for text in requested:
    try:
      epoch = int(text)
    except ValueError:
      epoch = None
    if epoch is None or not 1 <= epoch <= num_epochs:
      raise ConfigError(
        f"--epochs entry {text!r} is invalid; expected an integer in [1, {num_epochs}] "
        "(config.train.num_epochs)."
      )
    epochs.add(epoch)
  return sorted(epochs)


def check_settings(settings: SpectrumSettings, num_classes: int) -> None:
  """Checks the spectrum settings against the dataset.

  Raises:
    ConfigError: naming the flag for a class outside [0, num_classes), a
      repeated class or a non-positive count.
  """
  for label in settings.classes:
    if not 0 <= label < num_classes:
      raise ConfigError(
        f"--classes entry {label} is invalid; expected a class id in [0, {num_classes})."
      )
  if not settings.classes or len(set(settings.classes)) != len(settings.classes):
    raise ConfigError(
      f"--classes={list(settings.classes)} is invalid; expected distinct class ids."
    )
  for name in ("examples_per_class", "top_k", "num_iterations", "chunk_size"):
    value = getattr(settings, name)
    if value < 1:
      raise ConfigError(f"--{name}={value} is invalid; expected a positive integer.")
  if settings.num_iterations < settings.top_k:
    raise ConfigError(
      f"--num_iterations={settings.num_iterations} is invalid; expected at least --top_k="
      f"{settings.top_k}, since Lanczos finds at most one eigenvalue per iteration."
    )


def kept_checkpoint_steps(train_dir: str, max_to_keep: int) -> list[int]:
  """Returns the sorted steps of the checkpoints in `train_dir`, without creating any directory."""
  if not os.path.isdir(os.path.join(train_dir, checkpoint.CHECKPOINT_DIR)):
    return []
  manager = checkpoint.create_manager(train_dir, max_to_keep)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def format_epochs(epochs: set[int]) -> str:
  """Returns the sorted epochs as text, runs of consecutive epochs as "first to last"."""
  runs = []
  for epoch in sorted(epochs):
    if runs and epoch == runs[-1][1] + 1:
      runs[-1][1] = epoch
    else:
      runs.append([epoch, epoch])
  return ", ".join(str(first) if first == last else f"{first} to {last}" for first, last in runs)


def check_checkpoints_kept(
  config, train_dir: str, epochs: list[int], recorded: set[int], steps_per_epoch: int
) -> None:
  """Checks that every requested epoch not in the record can still be analysed.

  Such an epoch needs its checkpoint, or a later end of training. Training
  only goes forward, so an epoch that ends before the latest checkpoint and
  whose checkpoint was deleted (`config.checkpoint.max_to_keep`) cannot be
  analysed in this workdir. The check runs before any stage, so that a
  rejected rerun writes nothing.

  Raises:
    checkpoint.ResumeError: if the saved run has a different config, so that
      its checkpoints do not belong to this one, or naming the epochs that
      cannot be analysed and those that can.
  """
  kept_steps = kept_checkpoint_steps(train_dir, config.checkpoint.max_to_keep)
  if not kept_steps:
    return
  config_path = os.path.join(train_dir, "config.json")
  if os.path.exists(config_path):
    resume.check_resumable_config(config_path, config)
  latest = kept_steps[-1]
  missing = [
    epoch
    for epoch in epochs
    if epoch not in recorded
    and epoch * steps_per_epoch < latest
    and epoch * steps_per_epoch not in kept_steps
  ]
  if not missing:
    return

  available = recorded | {
    epoch
    for epoch in range(1, config.train.num_epochs + 1)
    if epoch * steps_per_epoch in kept_steps or epoch * steps_per_epoch > latest
  }
  missing_steps = ", ".join(str(epoch * steps_per_epoch) for epoch in missing)
  if len(missing) == 1:
    problem = f"epoch {missing[0]}: its checkpoint (step {missing_steps}) was"
  else:
    problem = (
      f"epochs {', '.join(map(str, missing))}: their checkpoints (steps {missing_steps}) were"
    )
  remedy = "Use a new --workdir"
  if available:
    remedy += f", or request only the epochs still available there: {format_epochs(available)}"
  raise checkpoint.ResumeError(
    f"cannot analyse {problem} not kept, because training in {train_dir} went on to step "
    f"{latest} and config.checkpoint.max_to_keep={config.checkpoint.max_to_keep} kept only "
    f"steps {kept_steps}. {remedy}."
  )


def train_until(config, train_dir: str, step: int) -> None:
  """Trains (or resumes) the run in `train_dir` until it has a checkpoint at `step`."""
  manager = checkpoint.create_manager(train_dir, config.checkpoint.max_to_keep)
  try:
    done = step in manager.all_steps()
  finally:
    manager.close()
  if done:
    logging.info("Reusing the checkpoint at step %d in %s.", step, train_dir)
    return
  staged = config.copy_and_resolve_references()
  staged.train.stop_after_steps = step
  train.train_and_evaluate(staged, train_dir)


def restore_variables(config, train_dir: str, step: int, model, sample_images):
  """Restores params and BatchNorm statistics at `step`, checked against the model's shapes.

  Raises:
    checkpoint.ResumeError: if the checkpoint is missing or does not fit the model.
  """
  manager = checkpoint.create_manager(train_dir, config.checkpoint.max_to_keep)
  try:
    params, batch_stats = checkpoint.restore_model_variables(manager, step)
  finally:
    manager.close()
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_images, train=False))
  for name, restored in (("params", params), ("batch_stats", batch_stats)):
    restored_shapes = jax.tree.map(lambda x: tuple(x.shape), restored)
    model_shapes = jax.tree.map(lambda x: tuple(x.shape), expected.get(name, {}))
    if restored_shapes != model_shapes:
      raise checkpoint.ResumeError(
        f"the {name} of the checkpoint at step {step} in {train_dir} do not match "
        f"config.model ({config.model.name}); use a new --workdir."
      )
  return params, batch_stats


def test_accuracy_at(train_dir: str, epoch: int) -> float | None:
  """Returns the test accuracy logged for `epoch` in the run's metrics.jsonl, if any."""
  path = os.path.join(train_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  matches = [r["eval/accuracy"] for r in records if r.get("epoch") == epoch]
  return matches[-1] if matches else None


def compute_point(hvp, params, batch_stats, data, samples, settings) -> dict:
  """Returns each class's top eigenvalues, residual norms and seconds at one point."""
  spectra = {}
  for label, ids in samples.items():
    start = time.perf_counter()
    result = hessian.top_hessian_eigenvalues(
      hvp,
      params,
      batch_stats,
      data.images[ids],
      data.labels[ids],
      k=settings.top_k,
      num_iterations=settings.num_iterations,
      key=jax.random.key(settings.lanczos_seed),
    )
    seconds = time.perf_counter() - start
    logging.info(
      "Class %d (%s): top eigenvalues %s (%.1f s).",
      label, data.class_names[label], np.array2string(result.eigenvalues[:3], precision=4),
      seconds,
    )  # fmt: skip
    spectra[str(label)] = {
      "eigenvalues": result.eigenvalues.tolist(),
      "residual_norms": result.residual_norms.tolist(),
      "seconds": seconds,
    }
  return spectra


def run(config, workdir: str, requested_epochs: list[str], settings: SpectrumSettings) -> dict:
  """Trains, computes the spectra at each requested epoch and writes the outputs.

  Returns:
    The spectrum record, as written to `workdir/hessian_spectrum.json`.
  """
  validate_config(config)
  if config.train.stop_after_steps:
    raise ConfigError(
      f"config.train.stop_after_steps={config.train.stop_after_steps} is invalid here; "
      "expected 0, because this script stops training at each requested epoch itself."
    )
  started = time.perf_counter()
  data = data_lib.load_dataset(config.data)
  check_settings(settings, data.num_classes)
  epochs = spectrum_epochs(requested_epochs, config.train.num_epochs)
  steps_per_epoch = len(data.labels) // config.train.batch_size
  if steps_per_epoch == 0:
    raise data_lib.DataError(
      f"config.train.batch_size={config.train.batch_size} exceeds the "
      f"{len(data.labels)} training instances."
    )
  try:
    samples = hessian.sample_class_examples(
      data.labels, list(settings.classes), settings.examples_per_class, settings.sample_seed
    )
  except ValueError as error:
    raise ConfigError(f"--classes or --examples_per_class: {error}") from error

  record_path = os.path.join(workdir, RECORD_NAME)
  header = {
    "dataset": config.data.name,
    "model": config.model.name,
    # The learning-rate schedule depends on it, so hessian_record.check_num_epochs compares it.
    "num_epochs": config.train.num_epochs,
    "class_names": {str(c): data.class_names[c] for c in settings.classes},
    "sample_ids": {str(c): ids.tolist() for c, ids in samples.items()},
    # Classes are chosen by observed label, so with label noise a sample
    # contains corrupted examples; this is their share.
    "sample_noisy_fraction": {
      str(c): float(data.is_noisy[ids].mean()) for c, ids in samples.items()
    },
  }
  record = hessian_record.load_record(record_path, settings, header)
  train_dir = os.path.join(workdir, "train")
  hessian_record.check_num_epochs(record, record_path, config, train_dir)
  if not record["points"]:
    record["num_epochs"] = config.train.num_epochs
  recorded = {point["epoch"] for point in record["points"]}
  check_checkpoints_kept(config, train_dir, epochs, recorded, steps_per_epoch)
  os.makedirs(workdir, exist_ok=True)
  model = create_model(config.model, data.num_classes)
  # The report mentions BatchNorm in eval mode only for a model with BatchNorm layers.
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), data.images[:1], train=False))
  record["batch_norm"] = bool(jax.tree.leaves(variables.get("batch_stats", {})))
  hvp = hessian.HessianVectorProduct(model, chunk_size=settings.chunk_size)

  for epoch in epochs:
    if epoch in recorded:
      logging.info("Epoch %d is already in %s; skipping it.", epoch, record_path)
      continue
    step = epoch * steps_per_epoch
    train_until(config, train_dir, step)
    params, batch_stats = restore_variables(config, train_dir, step, model, data.images[:1])
    logging.info("Computing the Hessian spectra after epoch %d (step %d).", epoch, step)
    point = {
      "epoch": epoch,
      "step": step,
      "test_accuracy": test_accuracy_at(train_dir, epoch),
      "classes": compute_point(hvp, params, batch_stats, data, samples, settings),
    }
    record["points"] = sorted([*record["points"], point], key=lambda p: p["epoch"])
    reporting.write_json(record_path, record)

  hessian_report.plot_spectra(record, os.path.join(workdir, "hessian_spectrum.png"))
  with open(os.path.join(workdir, "hessian_spectrum.md"), "w") as f:
    f.write(hessian_report.spectrum_table(record))
  logging.info("Finished in %.0f s; outputs in %s.", time.perf_counter() - started, workdir)
  return record


def check_no_data_override(location: dict[str, str], overrides: list[str]) -> None:
  """Raises ValueError if a data flag and a `--config.data.<field>` override set the same field.

  `location` is `cli.data_location()`, `overrides` the `--config.` arguments.
  """
  for flag, field in cli.DATA_FLAGS.items():
    override = f"--config.data.{field}"
    if field in location and any(arg.split("=", 1)[0] == override for arg in overrides):
      raise ValueError(
        f"--{flag} and {override} both set config.data.{field}; give only one of them."
      )


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags has rejected positional arguments.
  logging.set_verbosity(logging.INFO)
  overrides = [arg for arg in sys.argv if arg.startswith("--config.")]
  if FLAGS.small and (FLAGS["config"].present or overrides):
    cli.exit_with_error(
      "--small trains its own config; give --small or --config and its overrides, not both. "
      "--data_source, --data_dir and --manual_dir set where either reads its data."
    )
  # cli.parse_flags has loaded --config already, so a missing file ended the program there.
  config = small_config() if FLAGS.small else FLAGS.config
  try:
    location = cli.data_location()
    check_no_data_override(location, overrides)
    cli.set_data_location(config, location)
  except ValueError as error:
    cli.exit_with_error(error)
  try:
    classes = tuple(int(text) for text in FLAGS.classes)
  except ValueError:
    cli.exit_with_error(f"--classes={FLAGS.classes} is invalid; expected integer ids.")
  settings = SpectrumSettings(
    classes=classes,
    examples_per_class=FLAGS.examples_per_class,
    top_k=FLAGS.top_k,
    num_iterations=FLAGS.num_iterations,
    chunk_size=FLAGS.chunk_size,
    sample_seed=FLAGS.sample_seed,
    lanczos_seed=FLAGS.lanczos_seed,
  )
  record = run(config, FLAGS.workdir, FLAGS.epochs, settings)
  print(hessian_report.spectrum_table(record))
  print(f"outputs in {FLAGS.workdir}")


def define_flags() -> None:
  """Defines the command-line flags; only the entry point calls it, so tests can import this."""
  cli.define_config_flag(
    "configs/cifar.py", "Experiment config file to train; rejected with --small."
  )
  flags.DEFINE_string("workdir", None, "Directory for the training run and the spectrum outputs.")
  flags.DEFINE_bool(
    "small", False, "Train configs/default.py shrunk to a few CPU minutes instead of --config."
  )
  flags.DEFINE_list(
    "epochs", [], "Epochs after which to compute the spectra; default 1, num_epochs // 2, last."
  )
  flags.DEFINE_list("classes", ["0", "1", "2", "3"], "Class ids whose spectra are computed.")
  flags.DEFINE_integer("examples_per_class", 256, "Training examples sampled per class.")
  flags.DEFINE_integer("top_k", 10, "Number of largest eigenvalues per spectrum.")
  flags.DEFINE_integer(
    "num_iterations", 40, "Lanczos iterations per spectrum, one Hessian-vector product each."
  )
  flags.DEFINE_integer(
    "chunk_size", 128, "Examples per Hessian-vector product chunk (memory bound)."
  )
  flags.DEFINE_integer("sample_seed", 0, "Seed of the per-class example sample.")
  flags.DEFINE_integer("lanczos_seed", 0, "Seed of the Lanczos start vector.")
  cli.define_data_flags()
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
