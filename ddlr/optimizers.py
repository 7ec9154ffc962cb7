"""Builds the configured optimizer: the base optimizer, wrapped by `optim.ddlr` or a baseline."""

import optax

from ddlr import optim
from ddlr.baselines import hypergradient
from ddlr.config_checks import ConfigError


def build_optimizer(config, *, num_instances, num_classes, learning_rate):
  """Returns the base optimizer, wrapped by `optim.ddlr` when the config enables it.

  The hypergradient baseline replaces the base optimizer by the same update
  direction scaled by a learned learning rate.
  """
  opt = config.optimizer
  if config.baseline.name == "hypergradient":
    return _hypergradient_optimizer(config, learning_rate)
  if opt.name == "adamw":
    base = optax.adamw(
      learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay
    )
  else:
    momentum = {"sgd": None, "momentum": opt.momentum, "nesterov": opt.momentum}[opt.name]
    base = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=opt.name == "nesterov"),
    )
  if not config.ddlr.enabled:
    return base
  settings = config.ddlr
  try:
    return _ddlr_optimizer(base, settings, num_instances, num_classes, learning_rate)
  except ValueError as error:
    raise ConfigError(f"invalid config.ddlr setting: {error}") from error


def _hypergradient_optimizer(config, learning_rate):
  """Returns the base optimizer's unit-rate direction scaled by a learned rate."""
  opt = config.optimizer
  if opt.name == "adamw":
    direction = optax.chain(
      optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
      optax.add_decayed_weights(opt.weight_decay),
      optax.scale(-1.0),
    )
  else:
    momentum = {"sgd": None, "momentum": opt.momentum, "nesterov": opt.momentum}[opt.name]
    direction = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(1.0, momentum=momentum, nesterov=opt.name == "nesterov"),
    )
  schedule = None
  if config.baseline.hypergradient.follow_schedule:
    # The learned rate multiplies the schedule's shape, eta_t / eta_0.
    schedule = lambda count: learning_rate(count) / opt.learning_rate  # noqa: E731
  return hypergradient.hypergradient_descent(
    direction,
    initial_learning_rate=opt.learning_rate,
    hyper_learning_rate=config.baseline.hypergradient.hyper_learning_rate,
    schedule=schedule,
  )


def _ddlr_optimizer(base, settings, num_instances, num_classes, learning_rate):
  return optim.ddlr(
    base,
    num_instances=num_instances,
    learning_rate=learning_rate,
    hyper_learning_rate=settings.hyper_learning_rate,
    hyper_momentum=settings.hyper_momentum,
    # The config always has a class step size; it applies only with class rates.
    class_hyper_learning_rate=(
      settings.class_hyper_learning_rate if settings.class_rates else None
    ),
    instance_rates=settings.instance_rates,
    num_classes=num_classes if settings.class_rates else None,
    init_log_lr=settings.init_log_lr,
    log_lr_decay=settings.log_lr_decay,
    log_lr_min=settings.log_lr_min,
    log_lr_max=settings.log_lr_max,
    normalize=settings.normalize,
    hypergradient_scale=settings.hypergradient_scale,
  )
