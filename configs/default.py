r"""Fashion-MNIST with 40% symmetric label noise, a small CNN and per-instance rates.

The rates are learned against a 1,000-example trusted clean reference split
held out of training. Launch:

  python -m ddlr.main --config=configs/default.py --workdir=runs/default

Uniform baseline (plain SGD with momentum, same data and schedule):

  python -m ddlr.main --config=configs/default.py --workdir=runs/uniform \
    --config.ddlr.enabled=False

A baseline, e.g. Data Parameters:

  python -m ddlr.main --config=configs/default.py --workdir=runs/data_parameters \
    --config.ddlr.enabled=False --config.baseline.name=data_parameters

A CPU smoke run of a few seconds: `--config=configs/default.py:quick`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config; `arg='quick'` shrinks data and steps for a CPU check."""
  # Spaces around the argument are ignored, as configs.common.parse_arguments does.
  argument = (arg or "").strip()
  if argument not in ("", "quick"):
    raise ValueError(f"configs/default.py takes no argument or 'quick', got {arg!r}.")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  # 'tfds' prepares the dataset with tensorflow_datasets (offline from
  # manual_dir when there is no network); 'idx' reads the raw files.
  config.data.source = "tfds"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds default when None
  # Debian's dataset-fashion-mnist package installs the raw files here.
  config.data.manual_dir = "/usr/share/datasets/fashion-mnist"
  # Examples read from the train split, 0 for all of it. The reference split
  # is held out of these, so num_train - reference_size instances train.
  config.data.num_train = 0
  config.data.num_test = 0  # 0 keeps the whole test split
  # Trusted clean examples held out of training; the `reference` alignment
  # scores each training example against their gradient.
  config.data.reference_size = 1000
  config.data.noise = ml_collections.ConfigDict()
  config.data.noise.kind = "symmetric"  # none | symmetric | uniform | pairflip
  config.data.noise.rate = 0.4
  config.data.seed = 0  # noise and reference split; independent of the training seed
  # Target distribution for personalisation (ddlr/data/targets.py): 'none',
  # 'classes' (class-prior shift, set classes) or 'transform' (covariate
  # shift, set transform and fraction). With a target, reference_size is the
  # held-out pool and the reference split is a target sample of sample_size
  # drawn from it (0: every pool example of the target).
  config.data.target = ml_collections.ConfigDict()
  config.data.target.kind = "none"
  config.data.target.classes = ()  # e.g. (5, 7, 9), the footwear of Fashion-MNIST
  config.data.target.transform = "none"  # none | rot90 | invert
  config.data.target.fraction = 0.0  # share of training and test images transformed
  config.data.target.sample_size = 0
  config.data.target.train_on = "all"  # all | target_sample (train on the target sample alone)
  # none | crop_flip | inception_crop. crop_flip pads by 4, crops and flips on
  # the device, for the in-memory datasets. inception_crop takes a random
  # resized crop and flips in tf.data, for imagenet2012 only.
  config.data.augmentation = "none"
  # Side of the square images imagenet2012 is cropped to; other datasets keep their size.
  config.data.image_size = 224

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"
  config.model.width = 32
  config.model.batch_norm = False

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "momentum"  # sgd | momentum | nesterov | adamw
  config.optimizer.learning_rate = 0.05  # for SGD; adamw needs about 1e-3
  config.optimizer.schedule = "cosine"  # constant | cosine | step
  # The step schedule multiplies the learning rate by decay_factor after each
  # epoch listed here; epochs count from 1 at the start of training.
  config.optimizer.decay_epochs = ()
  config.optimizer.decay_factor = 0.1  # step schedule only
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.b1 = 0.9  # adamw only
  config.optimizer.b2 = 0.999  # adamw only
  config.optimizer.eps = 1e-8  # adamw only

  config.ddlr = ml_collections.ConfigDict()
  config.ddlr.enabled = True  # False trains the uniform baseline
  config.ddlr.instance_rates = True
  config.ddlr.class_rates = False
  # batch | lookahead | split | momentum | reference | small_loss | small_loss_split;
  # the small_loss references need no reference split (reference_size may be 0).
  config.ddlr.reference = "reference"
  config.ddlr.reference_at = "lookahead"  # lookahead (exact for SGD) | current (cheaper)
  config.ddlr.reference_batch_size = 128
  # Recompute the reference-split gradient every this many steps (1: every
  # step); in between the last one is reused, saving its forward and backward.
  # Above 1 it is computed after every k-th update, so reference_at must stay
  # 'lookahead'.
  config.ddlr.reference_every_steps = 1
  # BatchNorm statistics with the split reference: batch (the whole batch, as
  # without per-instance rates) | half (each half on its own). With half the
  # step is cheaper, and the other half's gradient is independent of the scored example.
  config.ddlr.split_batch_stats = "batch"
  # With the split reference on a model without BatchNorm over the whole
  # batch: True runs one half's forward and backward pass after the other's.
  # The results are the same. It lowers peak memory (1.15x a uniform step's
  # against 1.51x on the small CNN) but was slower on a 2-core CPU, where XLA
  # otherwise runs the halves at once (docs/performance.md).
  config.ddlr.split_sequential = False
  # Share of a batch kept as the pseudo-clean reference, lowest loss first. The
  # batch is one of reference_batch_size training instances for small_loss, and
  # each half of the training batch for small_loss_split. With
  # small_loss_per_class the share is taken within each observed label.
  config.ddlr.small_loss_fraction = 0.3
  config.ddlr.small_loss_per_class = False
  # auto: layerwise (one forward-like pass per reference) where the model
  # allows it, else jvp (forward mode); vmap forms per-example gradients.
  config.ddlr.alignment = "auto"  # auto | layerwise | jvp | vmap
  # With 'rms' each visit moves an instance's log rate by about
  # hyper_learning_rate, whatever the scale of the gradients.
  config.ddlr.hypergradient_scale = "rms"
  config.ddlr.hyper_learning_rate = 0.3
  # The class table steps every batch with the sum over its instances, so it
  # needs a much smaller step than the instance table, which steps once per visit.
  config.ddlr.class_hyper_learning_rate = 0.001
  config.ddlr.hyper_momentum = 0.0
  config.ddlr.init_log_lr = 0.0
  config.ddlr.log_lr_decay = 0.0
  config.ddlr.log_lr_min = -6.0
  config.ddlr.log_lr_max = 2.0
  # Dividing the batch's rates by their mean keeps the global step size.
  config.ddlr.normalize = True

  # Baselines on the same data, model and schedule; any name but 'none' needs
  # config.ddlr.enabled=False.
  config.baseline = ml_collections.ConfigDict()
  # none | hypergradient | data_parameters | learning_to_reweight | small_loss
  config.baseline.name = "none"
  # Reference-split batch size for learning_to_reweight.
  config.baseline.reference_batch_size = 128
  config.baseline.hypergradient = ml_collections.ConfigDict()
  # Step of the learned global rate per unit of g_t . u_{t-1}; 1e-3 is the
  # value Baydin et al. use for SGD and SGD with Nesterov momentum.
  config.baseline.hypergradient.hyper_learning_rate = 1e-3
  # True: the learned rate multiplies the schedule's shape eta_t / eta_0, so
  # the run keeps the shared schedule; False: the learned rate alone.
  config.baseline.hypergradient.follow_schedule = True
  # NOTE: these defaults (temperature 1, SGD step 0.1 with momentum 0.9,
  # bounds [1/20, 20]) follow our reading of Saxena et al. 2019 and were not
  # checked against their released code.
  config.baseline.data_parameters = ml_collections.ConfigDict()
  config.baseline.data_parameters.use_class = True
  config.baseline.data_parameters.use_instance = True
  config.baseline.data_parameters.init_log_temperature = 0.0  # temperature 1
  config.baseline.data_parameters.class_learning_rate = 0.1
  config.baseline.data_parameters.instance_learning_rate = 0.1
  config.baseline.data_parameters.momentum = 0.9
  config.baseline.data_parameters.class_weight_decay = 0.0
  config.baseline.data_parameters.instance_weight_decay = 0.0
  # Temperatures are kept in [1/20, 20].
  config.baseline.data_parameters.log_temperature_min = -2.995732273553991
  config.baseline.data_parameters.log_temperature_max = 2.995732273553991
  config.baseline.small_loss = ml_collections.ConfigDict()
  # tau: the final fraction of each batch left out. It is its own field, not
  # read from config.data.noise.rate, because the true rate is unknown in practice.
  config.baseline.small_loss.forget_rate = 0.4
  # T_k: epochs over which the forget rate ramps linearly from 0 to tau.
  config.baseline.small_loss.ramp_epochs = 10.0

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 8
  config.train.batch_size = 128
  config.train.log_every_steps = 100
  # Stop (with a checkpoint) after this many steps, 0 for no limit; rerunning
  # the same command continues, e.g. under a job time limit.
  config.train.stop_after_steps = 0

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000  # also at the end of every epoch; 0 for epoch ends only
  config.checkpoint.max_to_keep = 2

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 1000

  # After the main training, fine-tune on the reference split (the target
  # sample) with the base optimizer at a constant learning rate; 0 epochs
  # skips it. Evaluated after every fine-tuning epoch; not checkpointed, so
  # an interrupted run repeats the whole fine-tuning.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.epochs = 0
  config.finetune.learning_rate = 0.01

  if argument == "quick":
    config.data.num_train = 2048
    config.data.num_test = 512
    config.data.reference_size = 100
    config.ddlr.reference_batch_size = 64
    config.baseline.reference_batch_size = 64
    config.model.width = 8
    config.train.num_epochs = 2
    config.train.batch_size = 64
    config.train.log_every_steps = 8
    config.eval.batch_size = 256
  return config
