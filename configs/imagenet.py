r"""ImageNet (ILSVRC-2012) with ResNet-18/34/50, uniform or learned rates.

SGD with momentum 0.9, weight decay 1e-4, batch 256, 90 epochs and a peak
learning rate of 0.1 x batch / 256. The schedule is a step schedule (x0.1
after epochs 30, 60 and 80) or a cosine one, with an optional linear warm-up. Training
images are random resized crops at 224x224 with horizontal flips. 10,000
clean training examples (10 per class) are held out as the reference split.
tfds needs the ILSVRC-2012 archives, downloaded by hand, to prepare
`imagenet2012`. Launch from the repository root:

  python -m ddlr.main --workdir=runs/imagenet_resnet50 \
    --config=configs/imagenet.py:model=resnet50,rates=instance,warmup=5

Argument keys (comma-separated, `key=value`):
  model: resnet50 (default) | resnet18 | resnet34, each with the ImageNet stem.
  rates: instance (default) | uniform (plain SGD) | class | instance+class.
  schedule: step (default) | cosine.
  batch: the batch size (default 256, or 16 with `small`); the learning rate
    scales with it.
  warmup: epochs of linear warm-up from 0 (default 0).
  small: a switch that shrinks data, image size, model, batch and epochs to a
    CPU run of seconds.

NOTE: loading `imagenet2012` needs the pipelines branch (streaming input and
`inception_crop`); on a main without it the data loader rejects the dataset.
"""

import ml_collections

from configs import common, default

CONFIG_FILE = "configs/imagenet.py"
MODELS = ("resnet50", "resnet18", "resnet34")
# Peak learning rate at batch 256; other batch sizes scale it linearly.
BASE_LEARNING_RATE = 0.1

OPTIONS = {
  "model": common.Option("resnet50", choices=MODELS),
  "rates": common.Option("instance", choices=common.RATES),
  "schedule": common.Option("step", choices=("step", "cosine")),
  "batch": common.Option(None, int),
  "warmup": common.Option(0, int),
  "small": common.Option(False, bool),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the ImageNet config that the argument string `arg` selects."""
  args = common.parse_arguments(arg, CONFIG_FILE, OPTIONS)
  if args.batch is not None and args.batch < 1:
    raise ValueError(f"{CONFIG_FILE}: argument batch={args.batch} is invalid; expected >= 1.")
  if args.warmup < 0:
    raise ValueError(f"{CONFIG_FILE}: argument warmup={args.warmup} is invalid; expected >= 0.")
  config = default.get_config()

  config.data.name = "imagenet2012"
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)
  config.data.reference_size = 10_000
  common.set_noise(config, CONFIG_FILE, "none", 0.0)
  image_size = 32 if args.small else 224
  common.set_augmentation(config, "inception_crop", image_size)

  config.model = ml_collections.ConfigDict(
    {"name": args.model, "stem": "imagenet", "width": 8 if args.small else 64}
  )

  batch_size = args.batch
  if batch_size is None:
    batch_size = 16 if args.small else 256
  config.optimizer.name = "momentum"
  config.optimizer.learning_rate = BASE_LEARNING_RATE * batch_size / 256
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = args.schedule
  config.optimizer.warmup_epochs = float(args.warmup)
  config.optimizer.decay_factor = 0.1
  if args.schedule == "step":
    config.optimizer.decay_epochs = (30, 60, 80)

  common.set_rates(config, args.rates)

  config.train.num_epochs = 90
  config.train.batch_size = batch_size
  config.train.log_every_steps = 500
  config.checkpoint.every_steps = 5000
  config.eval.batch_size = 1000

  if args.small:
    # A multiple of the 1,000 classes, so the reference split stays class-balanced.
    config.data.reference_size = 1000
    config.data.num_train = 1064  # 64 training instances
    config.data.num_test = 64
    config.ddlr.reference_batch_size = 16
    config.train.num_epochs = 2
    config.train.log_every_steps = 2
    config.eval.batch_size = 32
    if args.schedule == "step":
      config.optimizer.decay_epochs = (1,)
  return config
