"""Base learning-rate schedules: optional linear warm-up, then constant, cosine or step."""

import ml_collections
import optax


def learning_rate_schedule(
  config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
  """Returns the schedule that `config` (the optimizer section) describes.

  `'step'` multiplies the rate by `decay_factor` after every epoch listed in
  `decay_epochs`. Epochs count from 1 at the start of training, warm-up
  included, so the milestones do not move when warm-up is added.
  """
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "constant":
    main = optax.constant_schedule(config.learning_rate)
  elif config.schedule == "step":
    # The schedule after warm-up counts from the end of warm-up.
    boundaries = {
      int(epoch * steps_per_epoch) - warmup_steps: config.decay_factor
      for epoch in config.decay_epochs
    }
    main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  else:
    main = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - warmup_steps, 1))
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])
