"""The data section of a run's config: its fields and the checks that need no data."""

import ml_collections

from ddlr.data import augment, catalog, checks, imagenet, sources, targets
from ddlr.data.errors import DataError
from ddlr.data.noise import check_noise_config


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

  Checks everything that can be checked before reading any data, so that
  sweeps can check every run's data config before the first one trains.
  `load_dataset` checks the rest once it reads the data: the directories
  and files, the split sizes where `num_train` or `num_test` is 0, and
  which examples are of the target classes. A message on one field starts
  with `invalid config.data:`, and one on the sizes names the
  `config.data` fields it relates.
  """
  try:
    _check_config(config)
  except DataError as error:
    # The checks name fields relative to the data section.
    raise DataError(f"invalid config.data: {error}") from error
  _check_sizes(config)


def check_reference_size(reference_size: int, num_examples: int) -> None:
  """Raise DataError unless `reference_size` is less than the `num_examples` it is held out of."""
  if reference_size >= num_examples:
    raise DataError(
      f"config.data.reference_size={reference_size} must be less than the {num_examples} "
      f"training examples it is held out of; set it below {num_examples}"
    )


def _check_sizes(config) -> None:
  """Check the sizes that the config fixes before any data is read.

  A nonzero `num_train` or `num_test` is the number of examples loaded,
  since `load_dataset` raises on fewer, and the reference pool has exactly
  `reference_size / num_classes` examples of every class.
  """
  num_train, num_test = config["num_train"], config["num_test"]
  reference_size = config["reference_size"]
  if num_train:
    check_reference_size(reference_size, num_train)

  target = config["target"]
  if target["kind"] == "classes":
    per_class = reference_size // catalog.get_spec(config["name"]).num_classes
    targets.check_sample_size(target, per_class * len(target["classes"]), reference_size)
  elif target["kind"] == "transform":
    targets.check_sample_size(target, reference_size, reference_size)
    fraction = target["fraction"]
    if num_test:
      targets.check_domain_split(target, "test", num_test, targets.domain_size(num_test, fraction))
    if num_train and target["train_on"] == "all":
      count = num_train - reference_size
      targets.check_domain_split(target, "training", count, targets.domain_size(count, fraction))


def _check_config(config) -> None:
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
  check_noise_config(noise["kind"], noise["rate"])
  _check_target_config(config, spec)
  if spec.name == imagenet.NAME:
    _check_imagenet_config(config)
  elif config["source"] == "idx":
    sources.check_raw_file_reader(spec.name)


def _check_imagenet_config(config) -> None:
  if config["source"] != "tfds":
    raise DataError(
      f"source={config['source']!r} is invalid for imagenet2012, which is read only "
      "through tfds; set source='tfds'"
    )
  if config["target"]["kind"] != "none":
    raise DataError(
      f"target.kind={config['target']['kind']!r} is not supported for imagenet2012, whose "
      "images stream from disk; set target.kind='none'"
    )
  image_size = config["image_size"]
  if not checks.is_integer(image_size) or image_size < 1:
    raise DataError(f"image_size must be a positive integer, got {image_size!r}")


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
