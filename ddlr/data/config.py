"""The data section of a run's config: its fields and the checks that need no data."""

import ml_collections

from ddlr.data import augment, catalog, checks, sources, targets
from ddlr.data.errors import DataError
from ddlr.data.noise import NOISE_KINDS


def default_config() -> ml_collections.ConfigDict:
  """Return the data config with every field that `load_dataset` reads.

  Fields:
    name: dataset, one of `catalog.SUPPORTED_DATASETS`.
    source: `'tfds'` or `'idx'` (raw files in `manual_dir`).
    data_dir: tfds data directory, None for the tfds default.
    manual_dir: directory with raw files, None if unused.
    num_train: keep the first this many examples of the train split
      before the reference hold-out, 0 for all.
    num_test: keep the first this many test examples, 0 for all.
    reference_size: size of the class-balanced reference set held out of
      training, 0 for none. With a target distribution it is the pool
      that the target sample is drawn from.
    noise.kind: one of `noise.NOISE_KINDS`.
    noise.rate: fraction of training examples to corrupt, in [0, 1).
    seed: seed of the reference hold-out, the label noise and the target.
    target: the target distribution of personalisation, with the fields
      of `targets.default_config()`.
    augmentation: training augmentation, one of `augment.AUGMENTATIONS`;
      `crop_flip` runs in the train step, `inception_crop` in the
      imagenet2012 stream.
    image_size: side of the square images that imagenet2012 is resized and
      cropped to; the other datasets keep their own size.
  """
  config = ml_collections.ConfigDict()
  config.name = "fashion_mnist"
  config.source = "tfds"
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.num_train = 0
  config.num_test = 0
  config.reference_size = 0
  config.noise = ml_collections.ConfigDict()
  config.noise.kind = "none"
  config.noise.rate = 0.0
  config.seed = 0
  config.target = targets.default_config()
  config.augmentation = "none"
  config.image_size = 224
  return config


_FIELDS = frozenset(default_config().keys())
_NOISE_FIELDS = frozenset(default_config().noise.keys())


def check_config(config) -> None:
  """Raise DataError naming the first missing, unknown or invalid field of a data config.

  Checks everything that can be checked before loading any data. The
  message starts with `invalid config.data:`.
  """
  try:
    _check_config(config)
  except DataError as error:
    # The checks name fields relative to the data section.
    raise DataError(f"invalid config.data: {error}") from error


def _check_config(config) -> None:
  """Raise DataError naming the first missing, unknown or invalid field.

  Checks everything that can be checked before loading any data.
  """
  _check_fields(config, _FIELDS, prefix="")
  noise = config["noise"]
  if not hasattr(noise, "keys"):
    raise DataError(f"noise must be a ConfigDict with kind and rate, got {noise!r}")
  _check_fields(noise, _NOISE_FIELDS, prefix="noise.")

  for field, value in (
    ("name", config["name"]),
    ("source", config["source"]),
    ("noise.kind", noise["kind"]),
  ):
    if not isinstance(value, str):
      raise DataError(f"{field} must be a string, got {value!r}")
  spec = catalog.get_spec(config["name"])
  if config["source"] not in sources.SOURCES:
    raise DataError(
      f"invalid source {config['source']!r}. Expected one of {', '.join(sources.SOURCES)}"
    )
  if config["augmentation"] not in augment.AUGMENTATIONS:
    raise DataError(
      f"unknown augmentation {config['augmentation']!r}. Expected one of "
      f"{', '.join(augment.AUGMENTATIONS)}"
    )
  for field in ("data_dir", "manual_dir"):
    if config[field] is not None and not isinstance(config[field], str):
      raise DataError(f"{field} must be a path string or None, got {config[field]!r}")

  for field in ("num_train", "num_test", "reference_size", "seed"):
    checks.check_count(field, config[field])
  if config["reference_size"] % spec.num_classes:
    raise DataError(
      f"reference_size={config['reference_size']} is not a multiple of the "
      f"{spec.num_classes} classes of {spec.name}, so the reference set "
      "cannot be class-balanced"
    )
  if noise["kind"] not in NOISE_KINDS:
    raise DataError(
      f"unknown noise.kind {noise['kind']!r}. Expected one of {', '.join(NOISE_KINDS)}"
    )
  rate = noise["rate"]
  if not checks.is_real(rate) or not 0.0 <= rate < 1.0:
    raise DataError(f"noise.rate must be a number in [0, 1), got {rate!r}")
  if noise["kind"] == "pairflip" and rate >= 0.5:
    raise DataError(
      f"noise.rate={rate!r} is invalid for pairflip noise; expected a value below 0.5, since "
      "from 0.5 on the flipped class c + 1 is at least as frequent as the true class c"
    )
  if noise["kind"] == "none" and rate != 0.0:
    raise DataError(
      f"noise.kind is 'none' but noise.rate is {rate!r}. Set noise.rate to 0 or choose a noise kind"
    )
  _check_target_config(config, spec)


def _check_target_config(config, spec: catalog.DatasetSpec) -> None:
  target = config["target"]
  if not hasattr(target, "keys"):
    raise DataError(
      f"target must be a ConfigDict with the fields {', '.join(sorted(targets.FIELDS))}, "
      f"got {target!r}"
    )
  _check_fields(target, targets.FIELDS, prefix="target.")
  targets.check_config(target, spec.num_classes)
  if target["kind"] != "none" and config["reference_size"] == 0:
    raise DataError(
      f"target.kind={target['kind']!r} draws the target sample from the reference pool, "
      "but reference_size is 0; set reference_size > 0"
    )
  if target["train_on"] == "target_sample" and config["noise"]["kind"] != "none":
    raise DataError(
      "target.train_on='target_sample' trains on the clean target sample, so label noise "
      f"would not apply; set noise.kind='none', got {config['noise']['kind']!r}"
    )


def _check_fields(section, expected: frozenset[str], prefix: str) -> None:
  keys = set(section.keys())
  missing = sorted(prefix + key for key in expected - keys)
  unknown = sorted(prefix + key for key in keys - expected)
  if missing:
    raise DataError(f"data config is missing the fields {', '.join(missing)}")
  if unknown:
    raise DataError(
      f"unknown data config fields {', '.join(unknown)}. Expected "
      f"{', '.join(sorted(prefix + key for key in expected))}"
    )
