r"""Fashion-MNIST at CPU scale: a small CNN or a narrow ResNet-18, uniform or learned rates.

The CPU-scale stand-in for the CIFAR experiments of configs/cifar.py: the
first 11,000 training images, of which 1,000 clean ones are held out as the
reference split, SGD with momentum 0.9 and a cosine schedule, batch 128,
EPOCHS epochs. Launch from the repository root:

  python -m ddlr.main --workdir=runs/fmnist_resnet18 \
    --config=configs/fashion_mnist.py:model=resnet18,noise=symmetric,rate=0.4

Argument keys (comma-separated, `key=value`):
  model: small_cnn (default) | resnet18 (CIFAR stem, width RESNET_WIDTH).
  noise: none (default) | symmetric | pairflip; rate: the corrupted fraction,
    required with a noise kind.
  rates: instance (default) | uniform (plain SGD) | class | instance+class.
  small: a switch that shrinks data, model, batch and epochs to a run of
    seconds.

The dataset is prepared offline from Debian's dataset-fashion-mnist package,
as in configs/default.py.
"""

import ml_collections

from configs import common, default

CONFIG_FILE = "configs/fashion_mnist.py"
MODELS = ("small_cnn", "resnet18")
EPOCHS = 12
# The CIFAR stem keeps 28x28 inputs at full resolution, and the three strided
# stages take them to 14, 7 and 4 pixels. Width 8 has 1/64 of the parameters
# of the width-64 ResNet-18 (176,258 parameters).
# On the 2-core x86-64 CPU, shared with two other runs, a 12-epoch run took
# about 5 minutes uniform and 12 minutes with per-instance rates.
RESNET_WIDTH = 8

OPTIONS = {
  "model": common.Option("small_cnn", choices=MODELS),
  "noise": common.Option("none", choices=common.NOISE_KINDS),
  "rate": common.Option(0.0, float),
  "rates": common.Option("instance", choices=common.RATES),
  "small": common.Option(False, bool),
}


def model_config(name: str, small: bool) -> ml_collections.ConfigDict:
  """Returns the model section for `name` (small_cnn or resnet18) at full or small size."""
  if name == "small_cnn":
    return ml_collections.ConfigDict(
      {"name": name, "width": 8 if small else 32, "batch_norm": False}
    )
  return ml_collections.ConfigDict(
    {"name": name, "stem": "cifar", "width": 4 if small else RESNET_WIDTH}
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the Fashion-MNIST config that the argument string `arg` selects."""
  args = common.parse_arguments(arg, CONFIG_FILE, OPTIONS)
  config = default.get_config()

  config.data.num_train = 11_000
  config.data.reference_size = 1000
  common.set_noise(config, CONFIG_FILE, args.noise, args.rate)

  config.model = model_config(args.model, args.small)
  common.set_rates(config, args.rates)

  config.train.num_epochs = EPOCHS
  config.train.batch_size = 128
  config.train.log_every_steps = 50

  if args.small:
    common.shrink_to_small(config)
  return config
