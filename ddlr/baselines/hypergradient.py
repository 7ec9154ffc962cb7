r"""Global hypergradient descent on the learning rate as an optax transformation.

One scalar learning rate, kept in the optimizer state and learned online from
the inner product of consecutive gradient and update directions.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class HypergradientState(NamedTuple):
  """State of the `hypergradient_descent` transformation."""

  count: jax.Array  # [] int32, number of updates taken
  learning_rate: jax.Array  # [] float32, the learned rate alpha_t, plain (not log) space
  previous_direction: optax.Params  # u_{t-1}, like params; zeros before the first step
  direction_state: optax.OptState  # state of the unit-rate direction


def hypergradient_descent(
  direction: optax.GradientTransformation,
  *,
  initial_learning_rate: float,
  hyper_learning_rate: float,
  schedule: optax.Schedule | None = None,
) -> optax.GradientTransformation:
  r"""Scales a unit-rate update direction by a learning rate learned by hypergradient descent.

  `direction` maps the loss gradient :math:`g_t` to the update of a step with
  learning rate 1 (for SGD with momentum and weight decay,
  :math:`d_t = -(m_t)` with :math:`m_t = \mu m_{t-1} + g_t + \lambda\theta_t`).
  With the schedule factor :math:`s_t` (1 without a schedule) the step is
  :math:`\theta_{t+1} = \theta_t + \alpha_t u_t` with :math:`u_t = s_t d_t`,
  so :math:`\partial\theta_t / \partial\alpha = u_{t-1}` and the
  hypergradient of the loss at :math:`\theta_t` is
  :math:`h_t = g_t \cdot u_{t-1}`. Each update first takes

  .. math::
    \alpha_t = \alpha_{t-1} - \beta\, g_t \cdot u_{t-1},

  then returns :math:`\alpha_t u_t`. For plain SGD, :math:`u_{t-1} = -g_{t-1}`
  and the rule is the paper's :math:`\alpha_t = \alpha_{t-1} + \beta\, g_t
  \cdot g_{t-1}`. The first step has :math:`u_{-1} = 0`, so it uses
  :math:`\alpha_0` unchanged.

  Momentum and weight decay live inside `direction`, so the hypergradient
  sees them through :math:`u_{t-1}`; :math:`g_t` is the gradient passed as
  `updates`, that is the data loss without the weight-decay term. The rate
  is not clipped: a large :math:`\beta` can drive it negative or make it
  diverge, which the train loop's non-finite check reports.

  Args:
    direction: transformation giving the update of a unit learning rate, for
      example `optax.chain(optax.add_decayed_weights(wd), optax.trace(0.9),
      optax.scale(-1.0))`.
    initial_learning_rate: :math:`\alpha_0`.
    hyper_learning_rate: :math:`\beta \ge 0`; 0 keeps :math:`\alpha_0`.
    schedule: optional step -> factor :math:`s_t` multiplying the learned
      rate, so the learned rate rides on a fixed schedule shape.

  Returns:
    An `optax.GradientTransformation` whose state is `HypergradientState`.

  References:
    Baydin, Cornish, Martinez Rubio, Schmidt, Wood. Online Learning Rate
    Adaptation with Hypergradient Descent. ICLR 2018.
    https://arxiv.org/abs/1703.04782
  """
  for name, value in (
    ("initial_learning_rate", initial_learning_rate),
    ("hyper_learning_rate", hyper_learning_rate),
  ):
    if not np.isfinite(value) or value < 0.0:
      raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")

  def init_fn(params):
    return HypergradientState(
      count=jnp.zeros([], jnp.int32),
      learning_rate=jnp.asarray(initial_learning_rate, jnp.float32),
      previous_direction=jax.tree.map(jnp.zeros_like, params),
      direction_state=direction.init(params),
    )

  def update_fn(updates, state, params=None):
    hypergrad = sum(
      jnp.vdot(g, u).astype(jnp.float32)
      for g, u in zip(
        jax.tree.leaves(updates), jax.tree.leaves(state.previous_direction), strict=True
      )
    )
    learning_rate = state.learning_rate - hyper_learning_rate * hypergrad

    unit_updates, direction_state = direction.update(updates, state.direction_state, params)
    factor = 1.0 if schedule is None else jnp.asarray(schedule(state.count), jnp.float32)
    scaled_direction = jax.tree.map(lambda d: factor * d, unit_updates)
    new_updates = jax.tree.map(lambda u: learning_rate.astype(u.dtype) * u, scaled_direction)
    new_state = HypergradientState(
      count=optax.safe_increment(state.count),
      learning_rate=learning_rate,
      previous_direction=scaled_direction,
      direction_state=direction_state,
    )
    return new_updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)
