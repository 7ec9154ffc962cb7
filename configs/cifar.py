r"""CIFAR-10/100 with each CNN architecture, optional label noise, uniform or learned rates.

SGD with momentum 0.9, weight decay 5e-4, batch 128, 200 epochs from a
learning rate of 0.1 with a cosine or step schedule. The rates are learned
against a trusted reference split of 1,000 clean training examples (10 per
class on CIFAR-100). The uniform baseline trains on the same 49,000 other
examples. Launch from the repository root:

  python -m ddlr.main --workdir=runs/cifar10_resnet18 \
    --config=configs/cifar.py:dataset=cifar10,model=resnet18,rates=instance

Argument keys (comma-separated, `key=value`):
  dataset: cifar10 (default) | cifar100.
  model: resnet18 (default) | resnet34 | resnet50 | wide_resnet (WRN-28-10) |
    vgg16_bn | densenet_bc (DenseNet-BC-100, k=12).
  noise: none (default) | symmetric | pairflip; rate: the corrupted fraction,
    required with a noise kind, e.g. noise=symmetric,rate=0.4.
  rates: instance (default) | uniform (plain SGD) | class | instance+class.
  schedule: cosine (default) | step (x0.1 after epochs 100 and 150).
  small: a switch that shrinks data, model, batch and epochs to a CPU run of
    seconds, e.g. `configs/cifar.py:model=vgg16_bn,small`.

Any field can still be overridden, e.g. `--config.train.num_epochs=100`.
"""

import ml_collections

from configs import common, default

CONFIG_FILE = "configs/cifar.py"
DATASETS = ("cifar10", "cifar100")

# Constructor arguments of each architecture: full size, then the `small` size.
# Dropout stays off because the train step passes no dropout RNG.
MODELS = {
  "resnet18": ({"stem": "cifar", "width": 64}, {"stem": "cifar", "width": 8}),
  "resnet34": ({"stem": "cifar", "width": 64}, {"stem": "cifar", "width": 4}),
  "resnet50": ({"stem": "cifar", "width": 64}, {"stem": "cifar", "width": 4}),
  "wide_resnet": (
    {"depth": 28, "widen_factor": 10, "dropout_rate": 0.0},
    {"depth": 10, "widen_factor": 1, "dropout_rate": 0.0},
  ),
  "vgg16_bn": (
    {"width": 64, "hidden_layer": True, "dropout_rate": 0.0},
    {"width": 4, "hidden_layer": True, "dropout_rate": 0.0},
  ),
  "densenet_bc": (
    {"depth": 100, "growth_rate": 12, "compression": 0.5},
    {"depth": 10, "growth_rate": 4, "compression": 0.5},
  ),
}

OPTIONS = {
  "dataset": common.Option("cifar10", choices=DATASETS),
  "model": common.Option("resnet18", choices=tuple(MODELS)),
  "noise": common.Option("none", choices=common.NOISE_KINDS),
  "rate": common.Option(0.0, float),
  "rates": common.Option("instance", choices=common.RATES),
  "schedule": common.Option("cosine", choices=("cosine", "step")),
  "small": common.Option(False, bool),
}


def model_config(name: str, small: bool) -> ml_collections.ConfigDict:
  """Returns the model section for architecture `name` at full or small size."""
  full, reduced = MODELS[name]
  return ml_collections.ConfigDict({"name": name, **(reduced if small else full)})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the CIFAR config that the argument string `arg` selects."""
  args = common.parse_arguments(arg, CONFIG_FILE, OPTIONS)
  config = default.get_config()

  config.data.name = args.dataset
  # With source='idx', manual_dir is the extracted python archive.
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)
  # A multiple of 100, so the reference split is class-balanced on CIFAR-100 too.
  config.data.reference_size = 1000
  common.set_noise(config, CONFIG_FILE, args.noise, args.rate)
  common.set_augmentation(config, "crop_flip")

  config.model = model_config(args.model, args.small)

  config.optimizer.name = "momentum"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = args.schedule
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.decay_factor = 0.1

  common.set_rates(config, args.rates)

  config.train.num_epochs = 200
  config.train.batch_size = 128
  config.train.log_every_steps = 100
  config.checkpoint.every_steps = 1000
  config.eval.batch_size = 1000

  if args.small:
    common.shrink_to_small(config)

  if args.schedule == "step":
    # The same fractions of training, 1/2 and 3/4, at both sizes.
    num_epochs = config.train.num_epochs
    config.optimizer.decay_epochs = tuple(sorted({num_epochs // 2, 3 * num_epochs // 4}))
  return config
