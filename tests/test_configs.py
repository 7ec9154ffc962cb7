"""Tests of the experiment configs: argument strings, validation and two training steps."""

import itertools
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from configs import cifar, common, default, fashion_mnist, imagenet, personalisation
from ddlr import data as data_lib
from ddlr import train
from ddlr.config_checks import ConfigError, check_reference_batches, validate_config
from ddlr.models import create_model
from tests.run_helpers import apply_overrides

CIFAR_ARGS = [
  f"dataset={dataset},model={model},rates={rates}{size}"
  for dataset, model, rates, size in itertools.product(
    cifar.DATASETS, cifar.MODELS, common.RATES, ("", ",small")
  )
]
NOISE_ARGS = [
  f"noise={kind},rate={rate}{size}"
  for kind, rate in [("symmetric", r) for r in (0.2, 0.4, 0.6, 0.8)] + [("pairflip", 0.4)]
  for size in ("", ",small")
]
IMAGENET_ARGS = [
  f"model={model},rates={rates},schedule={schedule}{size}"
  for model, rates, schedule, size in itertools.product(
    imagenet.MODELS, common.RATES, ("step", "cosine"), ("", ",small")
  )
]
FASHION_ARGS = [
  f"model={model},rates={rates}{noise}{size}"
  for model, rates, noise, size in itertools.product(
    fashion_mnist.MODELS,
    common.RATES,
    ("", ",noise=symmetric,rate=0.4", ",noise=pairflip,rate=0.4"),
    ("", ",small"),
  )
]
ALL_CONFIGS = (
  [(cifar, arg) for arg in CIFAR_ARGS + NOISE_ARGS + ["schedule=step", "schedule=step,small"]]
  + [(imagenet, arg) for arg in IMAGENET_ARGS + ["warmup=5", "batch=1024"]]
  + [(fashion_mnist, arg) for arg in FASHION_ARGS]
)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000, "fashion_mnist": 10}


@pytest.mark.parametrize(
  ("module", "arg"), ALL_CONFIGS, ids=[f"{m.__name__}:{a}" for m, a in ALL_CONFIGS]
)
def test_config_builds_and_validates(module, arg):
  config = module.get_config(arg)
  validate_config(config)
  # Building the module checks that every model field is a constructor argument.
  model = create_model(config.model, NUM_CLASSES[config.data.name])
  assert model.num_classes == NUM_CLASSES[config.data.name]
  assert config.data.reference_size % NUM_CLASSES[config.data.name] == 0
  assert config.data.num_train == 0 or config.data.num_train > config.data.reference_size
  # Reference batches are drawn from the reference split without replacement.
  assert config.ddlr.reference_batch_size <= config.data.reference_size
  assert config.baseline.reference_batch_size <= config.data.reference_size
  # The data section has exactly the fields the loader accepts.
  assert set(config.data.keys()) == set(data_lib.default_config().keys())


def test_cifar_full_size_matches_the_recipe():
  config = cifar.get_config("dataset=cifar100,model=wide_resnet,schedule=step")
  assert config.data.name == "cifar100"
  assert config.data.num_train == 0
  assert config.optimizer.name == "momentum"
  assert config.optimizer.momentum == 0.9
  assert config.optimizer.learning_rate == 0.1
  assert config.optimizer.weight_decay == 5e-4
  assert config.train.batch_size == 128
  assert config.train.num_epochs == 200
  assert tuple(config.optimizer.decay_epochs) == (100, 150)
  assert config.model.to_dict() == {
    "name": "wide_resnet", "depth": 28, "widen_factor": 10, "dropout_rate": 0.0
  }  # fmt: skip
  densenet = cifar.get_config("model=densenet_bc").model
  assert (densenet.depth, densenet.growth_rate, densenet.compression) == (100, 12, 0.5)


def test_rates_option_sets_ddlr_section():
  expected = {
    "uniform": (False, False, False),
    "instance": (True, True, False),
    "class": (True, False, True),
    "instance+class": (True, True, True),
  }
  for rates, (enabled, instance, per_class) in expected.items():
    ddlr = cifar.get_config(f"rates={rates}").ddlr
    assert (ddlr.enabled, ddlr.instance_rates, ddlr.class_rates) == (enabled, instance, per_class)


def test_imagenet_learning_rate_scales_with_batch():
  config = imagenet.get_config("batch=1024,warmup=5")
  assert config.optimizer.learning_rate == pytest.approx(0.4)
  assert config.train.batch_size == 1024
  assert config.optimizer.warmup_epochs == 5.0
  assert tuple(config.optimizer.decay_epochs) == (30, 60, 80)
  assert config.model.stem == "imagenet"
  assert imagenet.get_config("small").optimizer.learning_rate == pytest.approx(0.1 * 16 / 256)


@pytest.mark.parametrize(
  ("module", "arg", "message"),
  [
    (cifar, "dataset=svhn", r"argument dataset='svhn' is invalid; expected one of cifar10"),
    (cifar, "model=resnet101", r"argument model='resnet101' is invalid"),
    (cifar, "depth=40", r"unknown argument 'depth' in 'depth=40'; expected keys"),
    (cifar, "small,small", r"argument 'small' is given twice"),
    (cifar, "small=maybe", r"argument small='maybe' is invalid; expected true or false"),
    (cifar, "noise=symmetric", r"noise=symmetric needs a rate in \(0, 1\)"),
    (cifar, "noise=symmetric,rate=1.5", r"noise=symmetric needs a rate in \(0, 1\)"),
    (cifar, "rate=0.4", r"rate=0.4 needs a noise kind"),
    (cifar, "noise=pairflip,rate=high", r"argument rate='high' is invalid; expected a float"),
    (cifar, "model", r"argument 'model' needs a value"),
    (imagenet, "batch=0", r"argument batch=0 is invalid; expected >= 1"),
    (imagenet, "batch=2.5", r"argument batch='2.5' is invalid; expected an integer\.$"),
    (imagenet, "warmup=-1", r"argument warmup=-1 is invalid; expected >= 0"),
    (fashion_mnist, "model=vgg16_bn", r"argument model='vgg16_bn' is invalid"),
    (default, "small", r"takes no argument or 'quick'"),
  ],
)
def test_invalid_argument_raises(module, arg, message):
  with pytest.raises(ValueError, match=message):
    module.get_config(arg)


@pytest.mark.parametrize("arg", [" quick", "quick ", " quick "])
def test_default_argument_ignores_spaces(arg):
  assert default.get_config(arg).to_dict() == default.get_config("quick").to_dict()


@pytest.mark.parametrize("arg", [" ", ""])
def test_default_blank_argument_is_full_size(arg):
  assert default.get_config(arg).to_dict() == default.get_config().to_dict()


@pytest.mark.parametrize("config_file", ["configs/cifar.py:small", "configs/imagenet.py:small"])
@pytest.mark.parametrize("field", ["data_dir", "manual_dir"])
def test_data_paths_overridable(config_file, field):
  # Command-line overrides parse the string by the field's type, which a plain
  # None would not give.
  argv = ["main", f"--config={config_file}", f"--config.data.{field}=/raw/files"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)

  assert flag_values.config.data[field] == "/raw/files"


def test_streamed_imagenet_rejects_small_loss_reference():
  config = imagenet.get_config("small")
  config.ddlr.reference = "small_loss"
  with pytest.raises(ConfigError, match="reference='small_loss' is invalid for imagenet2012"):
    validate_config(config)


@pytest.mark.parametrize("reference", ["split", "small_loss_split"])
def test_split_reference_rejects_batch_of_one(reference):
  config = default.get_config("quick")
  config.ddlr.reference = reference
  config.train.batch_size = 1
  with pytest.raises(ConfigError) as raised:
    validate_config(config)
  assert str(raised.value) == (
    f"config.ddlr.reference='{reference}' needs config.train.batch_size >= 2."
  )


@pytest.mark.parametrize(
  "overrides, num_reference, num_train, message",
  [
    ({}, 100, 1000, r"ddlr.reference_batch_size=128 is larger than the reference split \(100"),
    ({}, 0, 1000, r"reference='reference' needs a reference split"),
    (
      {"ddlr.reference": "small_loss"},
      0,
      100,
      r"ddlr.reference_batch_size=128 is larger than the training set \(100 examples\)",
    ),
    (
      {"baseline.name": "learning_to_reweight", "baseline.reference_batch_size": 64},
      32,
      1000,
      r"baseline.reference_batch_size=64 is larger than the reference split \(32",
    ),
  ],
)  # fmt: skip
def test_oversized_reference_batch_rejected(overrides, num_reference, num_train, message):
  config = default.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    check_reference_batches(config, num_reference, num_train)


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    {"ddlr.reference": "small_loss"},
    {"ddlr.reference": "momentum", "ddlr.reference_batch_size": 4096},
    {"ddlr.enabled": False, "ddlr.reference_batch_size": 4096},
    {"baseline.name": "learning_to_reweight", "baseline.reference_batch_size": 128},
  ],
)
def test_fitting_reference_batch_accepted(overrides):
  config = default.get_config()
  config.update_from_flattened_dict(overrides)
  check_reference_batches(config, num_reference=128, num_train=1000)


@pytest.mark.parametrize(
  ("module", "arg"),
  [(default, None), (default, "quick"), (personalisation, None), (personalisation, "cpu"),
   (personalisation, "quick")],
)  # fmt: skip
def test_reference_batches_fit_target_sample(module, arg):
  config = module.get_config(arg)
  target = config.data.target
  split_size = config.data.reference_size
  if target.kind != "none" and target.sample_size:
    split_size = target.sample_size
  assert config.ddlr.reference_batch_size <= split_size
  assert config.baseline.reference_batch_size <= split_size


def test_configs_set_standard_augmentation():
  assert cifar.get_config("small").data.augmentation == "crop_flip"
  assert imagenet.get_config("small").data.augmentation == "inception_crop"
  assert imagenet.get_config("").data.image_size == 224
  assert fashion_mnist.get_config("").data.augmentation == "none"


def test_step_schedule_values():
  config = default.get_config().optimizer
  config.learning_rate = 0.1
  config.schedule = "step"
  config.decay_epochs = (2, 4)
  config.decay_factor = 0.1
  schedule = train.learning_rate_schedule(config, total_steps=60, steps_per_epoch=10)
  # Epochs 1-2 are steps 0-19, epochs 3-4 steps 20-39, then the rest.
  expected = {0: 0.1, 19: 0.1, 20: 0.01, 39: 0.01, 40: 0.001, 59: 0.001}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step

  config.warmup_epochs = 1.0
  schedule = train.learning_rate_schedule(config, total_steps=60, steps_per_epoch=10)
  # Linear warm-up over steps 0-9; the milestones stay at epochs 2 and 4.
  expected = {0: 0.0, 5: 0.05, 10: 0.1, 19: 0.1, 20: 0.01, 40: 0.001}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-6, abs=1e-9), step


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"schedule": "step"}, r"schedule='step' needs config.optimizer.decay_epochs"),
    ({"decay_epochs": (4,)}, r"decay_epochs=\(4,\) is set but config.optimizer.schedule="),
    ({"schedule": "step", "decay_epochs": (8,)}, r"before config.train.num_epochs=8"),
    ({"schedule": "step", "decay_epochs": (0,)}, r"expected every epoch after warmup_epochs"),
    ({"schedule": "step", "decay_epochs": (4, 2)}, r"expected strictly increasing epochs"),
    ({"schedule": "step", "decay_epochs": (2, 2)}, r"expected strictly increasing epochs"),
    ({"schedule": "step", "decay_epochs": (2.5,)}, r"expected integers"),
    ({"schedule": "step", "decay_epochs": (2,), "decay_factor": 0.0}, r"decay_factor=0.0"),
    ({"schedule": "step", "decay_epochs": (2,), "decay_factor": 2.0}, r"decay_factor=2.0"),
    (
      {"schedule": "step", "decay_epochs": (2,), "warmup_epochs": 3.0},
      r"expected every epoch after warmup_epochs=3.0",
    ),
  ],
)
def test_invalid_step_schedule_raises(overrides, message):
  config = default.get_config()
  for field, value in overrides.items():
    config.optimizer[field] = value
  with pytest.raises(ConfigError, match=message):
    validate_config(config)


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    (
      {"optimizer.learning_rate": 0.0},
      "config.optimizer.learning_rate=0.0 is invalid; expected a value > 0, because a "
      "learning rate of 0 never changes the model parameters.",
    ),
    (
      # The hypergradient baseline starts its learned rate here, so it would stay 0.
      {"optimizer.learning_rate": 0.0, "ddlr.enabled": False, "baseline.name": "hypergradient"},
      "config.optimizer.learning_rate=0.0 is invalid; expected a value > 0, because a "
      "learning rate of 0 never changes the model parameters.",
    ),
    (
      {"ddlr.hyper_learning_rate": 0.0},
      "config.ddlr.hyper_learning_rate=0.0 is invalid; expected a value > 0, because a "
      "learning rate of 0 never changes the per-instance rates.",
    ),
    (
      {"ddlr.class_rates": True, "ddlr.class_hyper_learning_rate": 0.0},
      "config.ddlr.class_hyper_learning_rate=0.0 is invalid; expected a value > 0, because a "
      "learning rate of 0 never changes the class rates.",
    ),
  ],
)
def test_zero_learning_rate_raises(overrides, message):
  config = default.get_config("quick")
  apply_overrides(config, overrides)
  with pytest.raises(ConfigError) as raised:
    validate_config(config)
  assert str(raised.value) == message


@pytest.mark.parametrize(
  "overrides",
  [
    # Unused rates: the uniform baseline learns no rates, the default learns no class rates.
    {"ddlr.enabled": False, "ddlr.hyper_learning_rate": 0.0},
    {"ddlr.class_hyper_learning_rate": 0.0},
    # Fine-tuning is off (0 epochs), so its learning rate is unused.
    {"finetune.learning_rate": 0.0},
  ],
)
def test_unused_zero_learning_rate_accepted(overrides):
  config = default.get_config("quick")
  for path, value in overrides.items():
    section, field = path.split(".")
    config[section][field] = value
  validate_config(config)


def test_finetune_zero_learning_rate_raises():
  config = default.get_config("quick")
  config.finetune.epochs = 1
  config.finetune.learning_rate = 0.0
  with pytest.raises(ConfigError) as raised:
    validate_config(config)
  assert str(raised.value) == (
    "config.finetune.learning_rate=0.0 is invalid; fine-tuning needs a learning rate > 0."
  )


def _labels_cycle_dataset(builder, *args, **kwargs):
  """Mock tfds data whose labels cycle through every class, for a class-balanced split."""
  del args, kwargs
  num_classes = builder.info.features["label"].num_classes
  # ImageNet images have no fixed size; any size above the crop will do.
  shape = tuple(48 if size is None else size for size in builder.info.features["image"].shape)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2 * num_classes + 256, *shape), dtype=np.uint8)
  labels = np.arange(len(images)) % num_classes
  if builder.name == "imagenet2012":
    # The ImageNet stream skips tfds decoding and decodes the JPEG bytes itself.
    encoded = [tf.io.encode_jpeg(image).numpy() for image in images]
    return tf.data.Dataset.from_tensor_slices({"image": encoded, "label": labels})
  return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})


# One two-step run per architecture and per dataset, covering each noise kind
# and rates option at least once; every run compiles its own train step.
TRAINING_RUNS = [
  (cifar, "dataset=cifar10,model=resnet18,noise=symmetric,rate=0.4,small"),
  (cifar, "dataset=cifar10,model=resnet34,rates=uniform,small"),
  (cifar, "dataset=cifar10,model=resnet50,noise=pairflip,rate=0.4,rates=instance+class,small"),
  (cifar, "dataset=cifar10,model=wide_resnet,rates=class,small"),
  (cifar, "dataset=cifar10,model=vgg16_bn,schedule=step,small"),
  (cifar, "dataset=cifar10,model=densenet_bc,small"),
  (cifar, "dataset=cifar100,model=resnet18,noise=symmetric,rate=0.2,rates=uniform,small"),
  (fashion_mnist, "model=small_cnn,noise=symmetric,rate=0.4,small"),
  (fashion_mnist, "model=resnet18,rates=uniform,small"),
  (imagenet, "model=resnet18,small"),
]


@pytest.mark.parametrize(
  ("module", "arg"), TRAINING_RUNS, ids=[f"{m.__name__}:{a}" for m, a in TRAINING_RUNS]
)
def test_two_training_steps_run(tmp_path, module, arg):
  config = module.get_config(arg)
  if config.data.name not in data_lib.SUPPORTED_DATASETS:
    pytest.skip(f"the data loader on this branch does not support {config.data.name} yet")
  # One step per epoch for two epochs, so a step schedule decays between them.
  batch_size = config.train.batch_size
  config.data.num_train = config.data.reference_size + batch_size
  config.data.num_test = 64
  config.train.num_epochs = 2
  config.train.log_every_steps = 1
  config.eval.batch_size = 64

  with tfds.testing.mock_data(as_dataset_fn=_labels_cycle_dataset):
    summary = train.train_and_evaluate(config, str(tmp_path))

  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
  assert summary["completed"]
  assert 0.0 <= summary["last_epoch_test_accuracy"] <= 1.0

  record = data_lib.load_split_record(os.path.join(tmp_path, "split_record.npz"))
  num_noisy = round(config.data.noise.rate * batch_size)
  assert int(record.is_noisy.sum()) == num_noisy
  if config.data.noise.kind == "pairflip":
    noisy = record.is_noisy
    num_classes = NUM_CLASSES[config.data.name]
    np.testing.assert_array_equal(
      record.labels[noisy], (record.true_labels[noisy] + 1) % num_classes
    )

  rates_path = os.path.join(tmp_path, "rates.npz")
  assert os.path.exists(rates_path) == config.ddlr.enabled
  if config.ddlr.instance_rates and config.ddlr.enabled:
    # Every step visits all batch_size instances.
    log_lr = np.load(rates_path)["log_lr"]
    assert log_lr.shape == (batch_size,)
    assert np.count_nonzero(log_lr) == batch_size
  if config.optimizer.schedule == "step":
    learning_rates = [r["train/learning_rate"] for r in records if "train/loss" in r]
    peak, factor = config.optimizer.learning_rate, config.optimizer.decay_factor
    assert learning_rates == pytest.approx([peak, peak * factor])
