r"""Learning to reweight: per-example weights from the reference gradient, every step.

With a trusted reference loss :math:`L_{ref}`, Ren et al. weight example
:math:`i` of the batch by how much a small step on it would lower the
reference loss. Perturbing the batch loss to :math:`\sum_i \epsilon_i
\ell_i(\theta)` and taking one SGD step of size :math:`\eta`,

.. math::
  -\frac{\partial L_{ref}(\theta - \eta\sum_j \epsilon_j\nabla\ell_j)}
        {\partial\epsilon_i}\Big|_{\epsilon=0}
  = \eta\,\langle\nabla L_{ref}(\theta), \nabla\ell_i(\theta)\rangle = \eta s_i,

so :math:`\tilde w_i = \max(s_i, 0)` and :math:`w_i = \tilde w_i / \sum_j
\tilde w_j`. When every :math:`\tilde w_i` is 0 the weights are all 0 and the
step leaves the parameters to weight decay and momentum alone, as in the
paper. The gradient is :math:`\sum_i w_i \nabla\ell_i(\theta)`. The method
keeps no state across steps; the table here only records each instance's
last weight for scoring.

References:
  Ren, Zeng, Yang, Urtasun. Learning to Reweight Examples for Robust Deep
  Learning. ICML 2018. https://arxiv.org/abs/1803.09050
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ReweightState(NamedTuple):
  """Per-instance record used to score the instances against the corruption mask."""

  # [num_instances] float32, B times the last weight, so 1 is the uniform
  # weight; 1 before the first visit.
  last_weight: jax.Array


def init_state(num_instances: int) -> ReweightState:
  """Returns a table with every instance at the uniform weight 1."""
  return ReweightState(last_weight=jnp.ones([num_instances], jnp.float32))


def weights_from_alignment(alignment) -> jax.Array:
  """Returns w [B] = max(s, 0) / sum(max(s, 0)), or zeros when no alignment is positive."""
  positive = jnp.maximum(alignment, 0.0)
  total = jnp.sum(positive)
  return jnp.where(total > 0.0, positive / jnp.where(total > 0.0, total, 1.0), 0.0)


def update(state: ReweightState, weights, ids) -> ReweightState:
  """Records B times each batch example's weight under its instance id."""
  relative = weights.astype(jnp.float32) * weights.shape[0]
  return ReweightState(last_weight=state.last_weight.at[ids].set(relative))


def instance_scores(state: ReweightState):
  """Returns the per-instance score, higher for instances more likely clean: the last weight."""
  return state.last_weight
