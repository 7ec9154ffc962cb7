r"""Data Parameters: learned per-class and per-instance temperatures on the logits.

Every class :math:`c` and instance :math:`i` has a temperature, kept in log
space, :math:`\sigma^{class}_c = e^{k_c}` and :math:`\sigma^{inst}_i = e^{t_i}`.
In training, example :math:`i` with label :math:`y_i` has its logits divided
by :math:`\sigma^*_i = \sigma^{class}_{y_i} + \sigma^{inst}_i`, so a high
temperature flattens its softmax and shrinks its gradient. The log
temperatures are learned by gradient descent on the same mean training loss
as the model, with their own SGD with momentum. Evaluation uses plain logits.

References:
  Saxena, Tuzel, DeCoste. Data Parameters: A New Family of Parameters for
  Learning a Differentiable Curriculum. NeurIPS 2019.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class DataParametersState(NamedTuple):
  """Log temperatures and their momentum; rows outside a batch never change."""

  log_class_temperature: jax.Array  # [num_classes] float32, k_c
  log_instance_temperature: jax.Array  # [num_instances] float32, t_i
  class_momentum: jax.Array  # [num_classes] float32
  instance_momentum: jax.Array  # [num_instances] float32


@dataclasses.dataclass(frozen=True)
class DataParametersSettings:
  """Settings of the learned temperatures and their optimizer. Both tables share the bounds."""

  use_class: bool = True
  use_instance: bool = True
  class_learning_rate: float = 0.1
  instance_learning_rate: float = 0.1
  momentum: float = 0.9
  class_weight_decay: float = 0.0
  instance_weight_decay: float = 0.0
  log_temperature_min: float = -2.995732273553991  # log(1/20)
  log_temperature_max: float = 2.995732273553991  # log(20)


def init_state(num_instances: int, num_classes: int, init_log_temperature: float = 0.0):
  """Returns tables with every temperature exp(`init_log_temperature`) and zero momentum."""
  return DataParametersState(
    log_class_temperature=jnp.full([num_classes], init_log_temperature, jnp.float32),
    log_instance_temperature=jnp.full([num_instances], init_log_temperature, jnp.float32),
    class_momentum=jnp.zeros([num_classes], jnp.float32),
    instance_momentum=jnp.zeros([num_instances], jnp.float32),
  )


def batch_temperatures(
  state: DataParametersState, ids, labels, settings: DataParametersSettings
) -> jax.Array:
  """Returns sigma* [B] = exp(k_{y_i}) + exp(t_{ids_i}) of a batch, leaving out a disabled term."""
  return _temperatures(
    state.log_class_temperature, state.log_instance_temperature, ids, labels, settings
  )


def _temperatures(log_class, log_instance, ids, labels, settings):
  temperature = jnp.zeros(ids.shape, jnp.float32)
  if settings.use_class:
    temperature = temperature + jnp.exp(log_class[labels])
  if settings.use_instance:
    temperature = temperature + jnp.exp(log_instance[ids])
  return temperature


def temperature_gradients(
  state: DataParametersState, logits, ids, labels, settings: DataParametersSettings
):
  r"""Returns the gradients of the mean tempered loss w.r.t. both log-temperature tables.

  The loss is :math:`\frac{1}{B}\sum_i \mathrm{CE}(z_i / \sigma^*_i, y_i)` with
  the raw logits :math:`z` held fixed (they do not depend on the
  temperatures). The gradients are dense, [num_classes] and
  [num_instances], and zero outside the batch and for a disabled table;
  repeated ids and labels sum.
  """

  def mean_loss(log_class, log_instance):
    temperature = _temperatures(log_class, log_instance, ids, labels, settings)
    scaled = jax.lax.stop_gradient(logits) / temperature[:, None]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(scaled, labels))

  return jax.grad(mean_loss, argnums=(0, 1))(
    state.log_class_temperature, state.log_instance_temperature
  )


def update(
  state: DataParametersState, logits, ids, labels, settings: DataParametersSettings
) -> DataParametersState:
  r"""Takes one sparse SGD-with-momentum step on the log temperatures of the batch.

  For each table row :math:`k` present in the batch (its instance id or its
  class label), with gradient :math:`g_k` from `temperature_gradients` and
  weight decay :math:`\lambda`:

  .. math::
    m_k \leftarrow \mu m_k + g_k + \lambda x_k, \qquad
    x_k \leftarrow \mathrm{clip}(x_k - \eta m_k, x_{\min}, x_{\max}).

  Rows not in the batch, and every row of a disabled table, keep their value
  and their momentum exactly, so an instance's momentum does not decay
  between its visits.
  """
  class_grad, instance_grad = temperature_gradients(state, logits, ids, labels, settings)
  # A disabled table counts as absent everywhere, so it keeps its initial values.
  class_present = (
    jnp.zeros(state.log_class_temperature.shape, bool).at[labels].set(settings.use_class)
  )
  instance_present = (
    jnp.zeros(state.log_instance_temperature.shape, bool).at[ids].set(settings.use_instance)
  )
  bounds = (settings.log_temperature_min, settings.log_temperature_max)
  log_class, class_momentum = _sparse_momentum_step(
    state.log_class_temperature, state.class_momentum, class_grad, class_present,
    learning_rate=settings.class_learning_rate, momentum=settings.momentum,
    weight_decay=settings.class_weight_decay, bounds=bounds,
  )  # fmt: skip
  log_instance, instance_momentum = _sparse_momentum_step(
    state.log_instance_temperature, state.instance_momentum, instance_grad, instance_present,
    learning_rate=settings.instance_learning_rate, momentum=settings.momentum,
    weight_decay=settings.instance_weight_decay, bounds=bounds,
  )  # fmt: skip
  return DataParametersState(log_class, log_instance, class_momentum, instance_momentum)


def _sparse_momentum_step(
  values, velocity, grad, present, *, learning_rate, momentum, weight_decay, bounds
):
  new_velocity = momentum * velocity + grad + weight_decay * values
  stepped = jnp.clip(values - learning_rate * new_velocity, *bounds)
  return jnp.where(present, stepped, values), jnp.where(present, new_velocity, velocity)


def instance_scores(state: DataParametersState):
  """Returns the per-instance score, higher for instances more likely clean: -log sigma_inst."""
  return -state.log_instance_temperature
