"""Baselines that run on ddlr's data, model, schedule and train step.

Each method changes how the train step weights the per-example losses or
which loss it differentiates, or (hypergradient) how the optimizer scales its
update; everything else is shared with ddlr and the uniform baseline:

  none                  uniform weights (with `config.ddlr.enabled=False`)
  hypergradient         one global learning rate learned by hypergradient descent
  data_parameters       learned per-class and per-instance logit temperatures
  learning_to_reweight  weights from each example's alignment with the reference split
  small_loss            the lowest-loss fraction of each batch (Co-teaching, one network)
"""

import dataclasses
from typing import Any

import numpy as np

from ddlr.baselines import data_parameters as data_parameters_lib
from ddlr.baselines import learning_to_reweight as learning_to_reweight_lib
from ddlr.baselines import small_loss as small_loss_lib

NAMES = ("none", "hypergradient", "data_parameters", "learning_to_reweight", "small_loss")


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
  """Static choices of the train step for a baseline; a method's own part is None otherwise."""

  name: str = "none"
  data_parameters: data_parameters_lib.DataParametersSettings | None = None
  small_loss: small_loss_lib.SmallLossSettings | None = None


def settings_from_config(config, steps_per_epoch: int) -> BaselineSettings:
  """Returns the train-step settings of `config.baseline`."""
  name = config.baseline.name
  if name == "data_parameters":
    fields = config.baseline.data_parameters
    return BaselineSettings(
      name=name,
      data_parameters=data_parameters_lib.DataParametersSettings(
        use_class=fields.use_class,
        use_instance=fields.use_instance,
        class_learning_rate=fields.class_learning_rate,
        instance_learning_rate=fields.instance_learning_rate,
        momentum=fields.momentum,
        class_weight_decay=fields.class_weight_decay,
        instance_weight_decay=fields.instance_weight_decay,
        log_temperature_min=fields.log_temperature_min,
        log_temperature_max=fields.log_temperature_max,
      ),
    )
  if name == "small_loss":
    fields = config.baseline.small_loss
    return BaselineSettings(
      name=name,
      small_loss=small_loss_lib.SmallLossSettings(
        forget_rate=fields.forget_rate,
        ramp_epochs=fields.ramp_epochs,
        steps_per_epoch=steps_per_epoch,
      ),
    )
  return BaselineSettings(name=name)


def init_state(config, num_instances: int, num_classes: int) -> Any:
  """Returns the initial per-instance tables of `config.baseline`, or None if it keeps none.

  The hypergradient baseline keeps its learned rate in the optimizer state instead.
  """
  name = config.baseline.name
  if name == "data_parameters":
    return data_parameters_lib.init_state(
      num_instances, num_classes, config.baseline.data_parameters.init_log_temperature
    )
  if name == "learning_to_reweight":
    return learning_to_reweight_lib.init_state(num_instances)
  if name == "small_loss":
    return small_loss_lib.init_state(num_instances)
  return None


def instance_scores(name: str, state: Any) -> np.ndarray | None:
  """Returns each instance's score (higher: more likely clean), or None for a method without one."""
  modules = {
    "data_parameters": data_parameters_lib,
    "learning_to_reweight": learning_to_reweight_lib,
    "small_loss": small_loss_lib,
  }
  if name not in modules:
    return None
  return np.asarray(modules[name].instance_scores(state))


def table_length(state: Any) -> int | None:
  """Returns the length of the per-instance table in `state`, or None without one."""
  if isinstance(state, data_parameters_lib.DataParametersState):
    return int(state.log_instance_temperature.shape[0])
  if isinstance(state, learning_to_reweight_lib.ReweightState):
    return int(state.last_weight.shape[0])
  if isinstance(state, small_loss_lib.SmallLossState):
    return int(state.last_loss.shape[0])
  return None
