"""Validation of experiment configs, so a bad value fails before any work starts."""

import math

import flax.errors
import jax
import jax.numpy as jnp
import ml_collections

from ddlr import alignment, baselines, losses, optim_checks, references, steps
from ddlr.data import augment, imagenet
from ddlr.data import check_config as check_data_config
from ddlr.models import MODELS, create_model

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw")
SCHEDULES = ("constant", "cosine", "step")


class ConfigError(ValueError):
  """A config field has a value that the run cannot use."""


def _require_choice(config, path: str, choices) -> None:
  value = _get(config, path)
  if value not in choices:
    raise ConfigError(f"config.{path}={value!r} is invalid; expected one of {list(choices)}.")


def _require_range(config, path: str, low: float, high: float | None = None, *, integer=False):
  value = _get(config, path)
  kind = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
    raise ConfigError(f"config.{path}={value!r} is invalid; expected a finite number.")
  if value < low or (high is not None and value > high):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ConfigError(f"config.{path}={value!r} is invalid; expected a value {bound}.")


def _require_nonzero_rate(config, path: str, trained: str) -> None:
  """Raises ConfigError if the learning rate at `path` is 0, which leaves `trained` unchanged."""
  value = _get(config, path)
  if value == 0:
    raise ConfigError(
      f"config.{path}={value!r} is invalid; expected a value > 0, because a learning rate "
      f"of 0 never changes {trained}."
    )


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing; the config must define it.")
    node = node[part]
  return node


def _check_small_loss(config) -> None:
  _require_range(config, "ddlr.small_loss_fraction", 0.0, 1.0)
  if config.ddlr.small_loss_fraction == 0.0:
    raise ConfigError("config.ddlr.small_loss_fraction=0.0 is invalid; expected a value in (0, 1].")
  per_class = _get(config, "ddlr.small_loss_per_class")
  if not isinstance(per_class, bool):
    raise ConfigError(
      f"config.ddlr.small_loss_per_class={per_class!r} is invalid; expected True or False."
    )


def _check_reuse(config) -> None:
  reference = config.ddlr.reference
  if reference != "reference" and config.ddlr.reference_every_steps != 1:
    raise ConfigError(
      f"config.ddlr.reference_every_steps={config.ddlr.reference_every_steps} is invalid "
      f"with config.ddlr.reference={reference!r}; only 'reference' reuses its gradient, "
      "so set it to 1."
    )


def _check_model_arguments(config) -> None:
  # Building the model (not initialising it) checks the fields against its
  # constructor and runs the model's own argument checks.
  try:
    create_model(config.model, num_classes=2)
  except (TypeError, ValueError) as error:
    raise ConfigError(f"config.model is invalid: {error}") from error


def _check_adam_moments(config) -> None:
  # b = 1 would divide by zero in Adam's bias correction 1 - b**t.
  for name in ("b1", "b2"):
    value = _get(config, f"optimizer.{name}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
      raise ConfigError(
        f"config.optimizer.{name}={value!r} is invalid; expected a value in [0, 1)."
      )
  eps = _get(config, "optimizer.eps")
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < math.inf:
    raise ConfigError(f"config.optimizer.eps={eps!r} is invalid; expected a finite value > 0.")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every section of `config` and its seed, so that a run or a sweep fails before training.

  The data section gets `ddlr.data.check_config`, the checks that need no
  data. `load_dataset` checks the rest once the data is loaded.

  Raises:
    ConfigError: naming the first invalid field, its value and what was expected.
    DataError: the data section is invalid, from `ddlr.data.check_config`.
  """
  _validate_augmentation(config)
  check_data_config(config.data)
  _require_choice(config, "model.name", sorted(MODELS))
  if "width" in config.model:
    _require_range(config, "model.width", 1, integer=True)
  _check_model_arguments(config)
  _require_choice(config, "optimizer.name", OPTIMIZERS)
  _require_choice(config, "optimizer.schedule", SCHEDULES)
  _require_range(config, "optimizer.learning_rate", 0.0)
  _require_nonzero_rate(config, "optimizer.learning_rate", "the model parameters")
  _require_range(config, "optimizer.warmup_epochs", 0.0)
  _require_range(config, "optimizer.momentum", 0.0, 1.0)
  _require_range(config, "optimizer.weight_decay", 0.0)
  _check_adam_moments(config)

  _require_choice(config, "ddlr.reference", references.REFERENCES)
  _require_choice(config, "ddlr.reference_at", references.REFERENCE_POINTS)
  _require_choice(config, "ddlr.split_batch_stats", steps.SPLIT_BATCH_STATS)
  _require_choice(config, "ddlr.alignment", alignment.ALIGNMENT_METHODS)
  _require_choice(config, "ddlr.hypergradient_scale", optim_checks.HYPERGRADIENT_SCALES)
  _require_range(config, "ddlr.reference_batch_size", 1, integer=True)
  _require_range(config, "ddlr.reference_every_steps", 1, integer=True)
  _check_small_loss(config)
  _check_reuse(config)
  _require_range(config, "ddlr.hyper_learning_rate", 0.0)
  _require_range(config, "ddlr.hyper_momentum", 0.0, 1.0)
  if config.ddlr.hyper_momentum == 1.0:
    raise ConfigError("config.ddlr.hyper_momentum=1.0 is invalid; expected a value in [0, 1).")
  _require_range(config, "ddlr.class_hyper_learning_rate", 0.0)
  if config.ddlr.enabled and config.ddlr.instance_rates:
    _require_nonzero_rate(config, "ddlr.hyper_learning_rate", "the per-instance rates")
  if config.ddlr.enabled and config.ddlr.class_rates:
    _require_nonzero_rate(config, "ddlr.class_hyper_learning_rate", "the class rates")
  for field in ("init_log_lr", "log_lr_min", "log_lr_max"):
    _require_range(config, f"ddlr.{field}", -math.inf)
  _require_range(config, "ddlr.log_lr_decay", 0.0)
  if config.ddlr.enabled and not (config.ddlr.instance_rates or config.ddlr.class_rates):
    raise ConfigError(
      "config.ddlr.enabled=True needs instance_rates or class_rates; "
      "set config.ddlr.enabled=False for the uniform baseline."
    )
  if config.ddlr.enabled and config.ddlr.reference == "momentum":
    if config.optimizer.name == "sgd":
      raise ConfigError(
        "config.ddlr.reference='momentum' needs a momentum buffer; "
        "config.optimizer.name='sgd' keeps none."
      )
  if config.ddlr.reference_every_steps > 1 and config.ddlr.reference_at == "current":
    raise ConfigError(
      f"config.ddlr.reference_at='current' applies only to reference_every_steps=1, got "
      f"reference_every_steps={config.ddlr.reference_every_steps}: a reused reference gradient "
      "is computed after every k-th update, at the parameters it produced. Set "
      "reference_at='lookahead' or reference_every_steps=1."
    )
  _require_bool(config, "ddlr.split_sequential")
  if config.ddlr.split_sequential and config.ddlr.reference != "split":
    raise ConfigError(
      f"config.ddlr.split_sequential=True applies only to reference='split', got "
      f"reference={config.ddlr.reference!r}. Set split_sequential=False or reference='split'."
    )
  if config.ddlr.split_batch_stats == "half" and config.ddlr.reference != "split":
    raise ConfigError(
      f"config.ddlr.split_batch_stats='half' applies only to reference='split', got "
      f"reference={config.ddlr.reference!r}. Set split_batch_stats='batch' or reference='split'."
    )
  if config.ddlr.enabled and config.ddlr.reference in references.SPLIT_REFERENCES:
    if config.train.batch_size < 2:
      raise ConfigError(
        f"config.ddlr.reference={config.ddlr.reference!r} needs config.train.batch_size >= 2."
      )

  _validate_baseline(config)

  _require_range(config, "train.num_epochs", 1, integer=True)
  if config.optimizer.warmup_epochs > config.train.num_epochs:
    raise ConfigError(
      f"config.optimizer.warmup_epochs={config.optimizer.warmup_epochs} exceeds "
      f"config.train.num_epochs={config.train.num_epochs}, so the peak learning rate "
      "would never be reached."
    )
  _check_step_schedule(config)
  _require_range(config, "train.batch_size", 1, integer=True)
  _require_range(config, "train.log_every_steps", 1, integer=True)
  _require_range(config, "train.stop_after_steps", 0, integer=True)
  # jax.random.key keeps only the low 32 bits of the seed (jax 0.10.2, x64 off), so
  # -1 and 2**32 would silently repeat seeds 4294967295 and 0. The streamed input's
  # np.random.SeedSequence also raises on a negative seed.
  _require_range(config, "seed", 0, 2**32 - 1, integer=True)
  _require_range(config, "checkpoint.every_steps", 0, integer=True)
  _require_range(config, "checkpoint.max_to_keep", 1, integer=True)
  _require_range(config, "eval.batch_size", 1, integer=True)
  _require_range(config, "finetune.epochs", 0, integer=True)
  _require_range(config, "finetune.learning_rate", 0.0)
  if config.finetune.epochs and not config.finetune.learning_rate > 0:
    raise ConfigError(
      f"config.finetune.learning_rate={config.finetune.learning_rate!r} is invalid; "
      "fine-tuning needs a learning rate > 0."
    )
  if config.finetune.epochs and not config.data.reference_size:
    raise ConfigError(
      f"config.finetune.epochs={config.finetune.epochs} fine-tunes on the reference split "
      "(the target sample), but config.data.reference_size is 0; set it > 0."
    )


def _check_step_schedule(config) -> None:
  """Checks `decay_epochs` and `decay_factor`, which only the step schedule reads."""
  opt = config.optimizer
  _require_range(config, "optimizer.decay_factor", 0.0, 1.0)
  if opt.decay_factor == 0.0:
    raise ConfigError("config.optimizer.decay_factor=0.0 is invalid; expected a value in (0, 1].")
  epochs = _get(config, "optimizer.decay_epochs")
  if not isinstance(epochs, (tuple, list)):
    raise ConfigError(
      f"config.optimizer.decay_epochs={epochs!r} is invalid; expected a tuple of epochs."
    )
  if opt.schedule != "step":
    if epochs:
      raise ConfigError(
        f"config.optimizer.decay_epochs={tuple(epochs)} is set but "
        f"config.optimizer.schedule={opt.schedule!r} ignores it; set schedule='step' or "
        "decay_epochs=()."
      )
    return
  if not epochs:
    raise ConfigError(
      "config.optimizer.schedule='step' needs config.optimizer.decay_epochs, the epochs "
      "after which the learning rate is multiplied by decay_factor; got ()."
    )
  for epoch in epochs:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
      raise ConfigError(
        f"config.optimizer.decay_epochs={tuple(epochs)} is invalid; expected integers."
      )
    if not opt.warmup_epochs < epoch < config.train.num_epochs:
      raise ConfigError(
        f"config.optimizer.decay_epochs={tuple(epochs)} is invalid; expected every epoch "
        f"after warmup_epochs={opt.warmup_epochs} and before "
        f"config.train.num_epochs={config.train.num_epochs}."
      )
  if list(epochs) != sorted(set(epochs)):
    raise ConfigError(
      f"config.optimizer.decay_epochs={tuple(epochs)} is invalid; expected strictly "
      "increasing epochs."
    )


def _require_bool(config, path: str) -> None:
  value = _get(config, path)
  if not isinstance(value, bool):
    raise ConfigError(f"config.{path}={value!r} is invalid; expected True or False.")


def _validate_baseline(config) -> None:
  """Checks `config.baseline`, every method's fields whichever method is selected."""
  _require_choice(config, "baseline.name", baselines.NAMES)
  name = config.baseline.name
  if name != "none" and config.ddlr.enabled:
    raise ConfigError(
      f"config.baseline.name={name!r} needs config.ddlr.enabled=False; "
      "a baseline replaces the per-instance rates."
    )
  _require_range(config, "baseline.reference_batch_size", 1, integer=True)

  _require_range(config, "baseline.hypergradient.hyper_learning_rate", 0.0)
  _require_bool(config, "baseline.hypergradient.follow_schedule")

  section = "baseline.data_parameters"
  _require_bool(config, f"{section}.use_class")
  _require_bool(config, f"{section}.use_instance")
  params = config.baseline.data_parameters
  if name == "data_parameters" and not (params.use_class or params.use_instance):
    raise ConfigError(
      f"config.{section}.use_class and use_instance are both False; "
      "expected at least one to be True."
    )
  for field in ("init_log_temperature", "log_temperature_min", "log_temperature_max"):
    _require_range(config, f"{section}.{field}", -math.inf)
  if params.log_temperature_min > params.log_temperature_max:
    raise ConfigError(
      f"config.{section}.log_temperature_min={params.log_temperature_min} exceeds "
      f"log_temperature_max={params.log_temperature_max}; expected min <= max."
    )
  for field in ("class_learning_rate", "instance_learning_rate"):
    _require_range(config, f"{section}.{field}", 0.0)
  _require_range(config, f"{section}.momentum", 0.0, 1.0)
  if params.momentum == 1.0:
    raise ConfigError(f"config.{section}.momentum=1.0 is invalid; expected a value in [0, 1).")
  for field in ("class_weight_decay", "instance_weight_decay"):
    _require_range(config, f"{section}.{field}", 0.0)

  _require_range(config, "baseline.small_loss.forget_rate", 0.0, 1.0)
  if config.baseline.small_loss.forget_rate == 1.0:
    raise ConfigError(
      "config.baseline.small_loss.forget_rate=1.0 is invalid; it would leave out every "
      "example. Expected a value in [0, 1)."
    )
  _require_range(config, "baseline.small_loss.ramp_epochs", 0.0)


def _validate_augmentation(config) -> None:
  _require_choice(config, "data.augmentation", augment.AUGMENTATIONS)
  _require_range(config, "data.image_size", 1, integer=True)
  augmentation, name = config.data.augmentation, config.data.name
  if augmentation == "inception_crop" and name != imagenet.NAME:
    raise ConfigError(
      f"config.data.augmentation='inception_crop' is invalid for config.data.name={name!r} "
      f"because it runs only in the {imagenet.NAME} stream. Use 'crop_flip' or 'none'."
    )
  if augmentation == "crop_flip" and name == imagenet.NAME:
    raise ConfigError(
      f"config.data.augmentation='crop_flip' is invalid for {imagenet.NAME}, whose batches "
      "stream from the host instead of device memory; use 'inception_crop' or 'none'."
    )
  if name == imagenet.NAME and config.ddlr.enabled and config.ddlr.reference == "small_loss":
    raise ConfigError(
      f"config.ddlr.reference='small_loss' is invalid for {imagenet.NAME}: it draws a second "
      "training batch from device memory, but this dataset streams from the host. Use "
      "'small_loss_split' or another reference."
    )


def _reference_batch_source(config) -> tuple[str, str, str] | None:
  """Returns who draws reference batches, their size's field and their source, or None."""
  if config.baseline.name == "learning_to_reweight":
    user, field = "config.baseline.name='learning_to_reweight'", "baseline.reference_batch_size"
    return user, field, "reference split"
  if config.ddlr.enabled and config.ddlr.reference in ("reference", "small_loss"):
    source = "training set" if config.ddlr.reference == "small_loss" else "reference split"
    return f"config.ddlr.reference={config.ddlr.reference!r}", "ddlr.reference_batch_size", source
  return None


def reference_batch_source(config) -> str | None:
  """Returns what a run of `config` draws reference batches from, or None if it draws none.

  The source is 'reference split', or 'training set' for the `small_loss` reference.
  """
  drawn = _reference_batch_source(config)
  return None if drawn is None else drawn[2]


def check_reference_batches(config, num_reference: int, num_train: int) -> None:
  """Raises ConfigError unless each reference batch fits in the examples it is drawn from.

  `num_reference` and `num_train` are the sizes of the loaded reference split
  and training set; `num_train` is read only when `reference_batch_source`
  is the training set. A batch larger than its source would have to repeat
  examples, so it is rejected rather than drawn with replacement.
  """
  drawn = _reference_batch_source(config)
  if drawn is None:
    return
  user, field, source = drawn
  available = num_train if source == "training set" else num_reference
  if not available and source == "reference split":
    raise ConfigError(f"{user} needs a reference split; set config.data.reference_size > 0.")
  batch_size = _get(config, field)
  if batch_size > available:
    fix = f"set it to at most {available}"
    if source == "reference split" and config.data.target.kind != "none":
      source = "reference split, the target sample"
      fix += (
        " or draw a larger target sample (config.data.target.sample_size; 0 takes every "
        "example of the target in the pool of config.data.reference_size)"
      )
    raise ConfigError(
      f"config.{field}={batch_size} is larger than the {source} ({available} examples), from "
      f"which {user} draws each reference batch without replacement; {fix}."
    )


def check_model_deterministic(model, batch_stats, params, images, *, model_name: str) -> None:
  """Raises ConfigError if `model` draws random numbers in training mode.

  `losses.make_loss_fn` applies the model without a PRNG key, so a layer such as
  `nn.Dropout` would fail inside the first jitted step. Tracing the loss once
  with `jax.eval_shape` finds it without compiling or running the model.

  Args:
    model: the Flax model.
    batch_stats: its BatchNorm statistics, {} without BatchNorm.
    params: its parameters.
    images: a sample batch, [n, H, W, C].
    model_name: the config's model name, which the error names.
  """
  labels = jnp.zeros(images.shape[:1], jnp.int32)
  loss_fn = losses.make_loss_fn(model, batch_stats, images, labels)
  try:
    jax.eval_shape(loss_fn, params)
  except flax.errors.InvalidRngError as error:
    raise ConfigError(
      f"config.model.name={model_name!r} draws random numbers in training mode ({error}). "
      "ddlr applies models without a PRNG key, so its models must not draw random numbers in "
      "training mode. Remove nn.Dropout and other random layers."
    ) from error
