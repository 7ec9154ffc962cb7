r"""Personalisation toward three Fashion-MNIST classes with per-instance rates.

The model trains on every training image. The rates are learned against a
500-example sample of the target distribution, classes 2, 4 and 6 (pullover,
coat, shirt), drawn from a 2,000-example held-out pool. Launch:

  python -m ddlr.main --config=configs/personalisation.py --workdir=runs/personalisation

Covariate shift instead (10% of the images rotated by 90 degrees):

  python -m ddlr.main --config=configs/personalisation.py --workdir=runs/rot90 \
    --config.data.target.kind=transform --config.data.target.classes='()' \
    --config.data.target.transform=rot90 --config.data.target.fraction=0.1

Footwear (classes 5, 7 and 9) instead: `--config.data.target.classes='(5, 7, 9)'`.

Sizes: no argument for all of Fashion-MNIST; `:cpu` for a CPU run (10,000
train examples, width 16, 10 epochs); `:quick` for a smoke run of seconds.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the personalisation config; `arg` is None, 'cpu' or 'quick' (see the docstring)."""
  if arg not in (None, "", "cpu", "quick"):
    raise ValueError(
      f"configs/personalisation.py takes no argument, 'cpu' or 'quick', got {arg!r}."
    )
  config = default.get_config()
  config.data.noise.kind = "none"
  config.data.noise.rate = 0.0
  # The pool is class-balanced, so 2,000 contains 600 examples of three
  # classes, enough for a 500-example target sample; the rest is never used.
  config.data.reference_size = 2000
  config.data.target.kind = "classes"
  # Pullover, coat and shirt, the classes uniform training confuses most. A
  # uniform ':cpu' model (seed 0) was scored on the held-out pool, not on the
  # test set. Restricting its predictions to the target classes gained 8
  # points on these, against 0.3 points on footwear (5, 7, 9), which it
  # already classifies at 94%. So footwear leaves personalisation no room.
  config.data.target.classes = (2, 4, 6)
  config.data.target.sample_size = 500
  # Fine-tuning (off here; the personalisation sweep turns it on): a fifth
  # of the peak learning rate, so it adapts the converged model without
  # undoing it.
  config.finetune.epochs = 0
  config.finetune.learning_rate = 0.01
  # NOTE: hyper_learning_rate stays at the default config's 0.3, untuned. In
  # ':cpu' runs (seed 0) 0.1 and 1.0 did not raise the rot90 target-domain
  # AUROC of the rates above 0.71 (0.67 at 0.3).

  if arg == "cpu":
    config.data.num_train = 10000
    config.model.width = 16
    config.train.num_epochs = 10
  elif arg == "quick":
    config.data.num_train = 2048
    config.data.num_test = 1000
    config.data.reference_size = 500
    config.data.target.sample_size = 100
    config.ddlr.reference_batch_size = 64
    config.baseline.reference_batch_size = 64
    config.model.width = 8
    config.train.num_epochs = 2
    config.train.batch_size = 64
    config.train.log_every_steps = 8
    config.eval.batch_size = 500
  return config
