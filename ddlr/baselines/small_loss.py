r"""Small-loss selection, the single-network form of Co-teaching.

Each step keeps the K lowest-loss examples of the batch, K the nearest
integer to :math:`(1 - f(t))B`, and averages the gradient over them, with
the forget rate

.. math::
  f(t) = \tau \min(t / T_k, 1),

where :math:`t` counts completed epochs (0 during the first epoch, so the
first epoch trains on every example) and :math:`T_k` is the ramp length in
epochs. Large-loss examples are the likely corrupted ones, because a network
fits clean labels before it memorises noisy ones. The single network selects
for itself, so there is no cross-update between two networks as in
Co-teaching.

References:
  Han, Yao, Yu, Niu, Xu, Hu, Tsang, Sugiyama. Co-teaching: Robust Training of
  Deep Neural Networks with Extremely Noisy Labels. NeurIPS 2018.
  https://arxiv.org/abs/1804.06872
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class SmallLossState(NamedTuple):
  """Per-instance record used to score the instances against the corruption mask."""

  last_loss: jax.Array  # [num_instances] float32, loss at the last visit; 0 before the first


@dataclasses.dataclass(frozen=True)
class SmallLossSettings:
  """Forget-rate schedule; `steps_per_epoch` converts the train step into epochs."""

  forget_rate: float = 0.4  # tau, the final fraction of each batch left out
  ramp_epochs: float = 10.0  # T_k
  steps_per_epoch: int = 1


def init_state(num_instances: int) -> SmallLossState:
  """Returns a zero last-loss table."""
  return SmallLossState(last_loss=jnp.zeros([num_instances], jnp.float32))


def forget_rate(step, settings: SmallLossSettings) -> jax.Array:
  """Returns f(t) for the train step `step` (0-based), as float32."""
  epochs_done = (jnp.asarray(step) // settings.steps_per_epoch).astype(jnp.float32)
  if settings.ramp_epochs == 0:
    return jnp.asarray(settings.forget_rate, jnp.float32)
  return settings.forget_rate * jnp.minimum(epochs_done / settings.ramp_epochs, 1.0)


def select_small_loss(losses, step, settings: SmallLossSettings) -> jax.Array:
  """Returns example weights [B]: 1/K on the K lowest losses of the batch, 0 elsewhere.

  K is the nearest integer to (1 - f(t)) B, at least 1 (`forget_rate` < 1 is
  validated in the config). Equal losses are ranked by batch position.
  """
  batch_size = losses.shape[0]
  num_kept = jnp.round((1.0 - forget_rate(step, settings)) * batch_size).astype(jnp.int32)
  num_kept = jnp.maximum(num_kept, 1)
  ranks = jnp.argsort(jnp.argsort(losses, stable=True), stable=True)
  kept = ranks < num_kept
  return kept.astype(jnp.float32) / num_kept.astype(jnp.float32)


def update(state: SmallLossState, losses, ids) -> SmallLossState:
  """Records each batch example's loss under its instance id."""
  return SmallLossState(last_loss=state.last_loss.at[ids].set(losses.astype(jnp.float32)))


def instance_scores(state: SmallLossState):
  """Returns the per-instance score, higher for instances more likely clean: -last loss."""
  return -state.last_loss
