"""Buffers of the base optimizer inside a ddlr optimizer state.

The momentum reference reads the base optimizer's first moment, and the Adam
preconditioner its second moment. These helpers find them in any chain or
injection of optax states, without knowing how the optimizer was built.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax


def find_state_field(opt_state: optax.OptState, state_type: type, field: str) -> Any:
  """Returns `field` of the single `state_type` node inside `opt_state`.

  Used to read the base optimizer's momentum buffer or Adam moments without
  knowing how the optimizer was chained.

  Raises:
    ValueError: if there is no such node, or more than one.
  """
  found = [
    node
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type))
    if isinstance(node, state_type)
  ]
  if len(found) != 1:
    raise ValueError(
      f"expected exactly one {state_type.__name__} in the optimizer state, "
      f"found {len(found)}; this reference or preconditioner needs an "
      "optimizer that keeps one."
    )
  return getattr(found[0], field)


def momentum_buffer(opt_state: optax.OptState) -> optax.Params:
  """Returns the base optimizer's first-moment buffer (SGD trace or Adam mu)."""
  try:
    return find_state_field(opt_state, optax.TraceState, "trace")
  except ValueError:
    return find_state_field(opt_state, optax.ScaleByAdamState, "mu")


def adam_preconditioner(opt_state: optax.OptState, *, b2: float, eps: float) -> optax.Params:
  r"""Returns Adam's diagonal preconditioner :math:`1/(\sqrt{\hat v}+\epsilon)`.

  Before the first step the second moment is zero, so the preconditioner is
  1 everywhere rather than the 1/eps the formula would give.
  """
  count = find_state_field(opt_state, optax.ScaleByAdamState, "count")
  nu = find_state_field(opt_state, optax.ScaleByAdamState, "nu")
  correction = 1.0 - jnp.asarray(b2, jnp.float32) ** jnp.maximum(count, 1)

  def invert(second_moment):
    preconditioner = 1.0 / (jnp.sqrt(second_moment / correction) + eps)
    return jnp.where(count > 0, preconditioner, jnp.ones_like(preconditioner))

  return jax.tree.map(invert, nu)
