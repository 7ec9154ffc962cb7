"""Per-example alignment of loss gradients with reference directions.

The alignment of example i with a tangent direction t is
s_i = <grad_theta loss_i(theta), t>. Both paths start from one linearisation of
the per-example loss vector, so the forward pass is shared by the weighted
gradient (a VJP) and the alignment:

* `jvp`: all s_i at once as one forward-mode product of the linearised loss
  vector with t; memory O(P). With BatchNorm in training mode it
  differentiates the same batch-coupled losses that the update uses. For a
  direction fixed before the step, `linearize_with_alignment` carries the
  tangent through the forward pass itself, which needed less memory in the
  small CNN's step.
* `vmap`: the per-example gradients as a [B, ...] pytree, one VJP per one-hot
  cotangent, then s = J t; memory O(B P). It is the reference path for tests
  and gives per-example gradient norms.
* `layerwise` (`ddlr.layerwise`): each s_i from the layer cotangents of the
  weighted gradient's backward pass and one forward-like pass of the tangent
  per layer. It costs about one forward pass less than `jvp` and applies to
  models without BatchNorm whose parameters all sit in Dense and Conv layers.

Per-example gradients are never taken by vmapping the model over single
examples: through BatchNorm that computes a different quantity.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# `auto` is `layerwise` where it applies (ddlr on a model without BatchNorm
# whose parameters all sit in Dense and Conv layers) and `jvp` elsewhere.
ALIGNMENT_METHODS = ("auto", "jvp", "vmap", "layerwise")


class LinearizedLosses(NamedTuple):
  """A per-example loss vector linearised at the current parameters."""

  losses: jax.Array  # [B] per-example losses at the linearisation point
  aux: Any  # auxiliary output of the loss function, e.g. BatchNorm statistics
  jvp: Callable[[Any], jax.Array]  # params-shaped tangent -> [B]
  vjp: Callable[[jax.Array], Any]  # [B] cotangent -> params-shaped gradient
  # [B] cotangent -> (gradient, a linearisation whose `jvp` reuses this
  # backward pass); only the layerwise path sets it, see `weighted_gradient`.
  backward: Callable[[jax.Array], tuple[Any, "LinearizedLosses"]] | None = None
  # [B] float32 alignment with the direction given to
  # `linearize_with_alignment`, computed in the forward pass; None otherwise.
  alignment: jax.Array | None = None


def linearize_losses(loss_fn: Callable[[Any], tuple[jax.Array, Any]], params) -> LinearizedLosses:
  """Linearises `loss_fn(params) -> (losses [B], aux)` at `params`.

  Returns:
    The losses, the auxiliary output, and the JVP and VJP of the loss vector,
    both evaluated from the one stored forward pass.
  """
  losses, jvp_fn, aux = jax.linearize(loss_fn, params, has_aux=True)
  transpose = jax.linear_transpose(jvp_fn, params)

  def vjp(cotangent):
    return transpose(as_loss_dtype(cotangent, losses))[0]

  return LinearizedLosses(losses, aux, jvp_fn, vjp)


def linearize_with_alignment(
  loss_fn: Callable[[Any], tuple[jax.Array, Any]], params, tangent
) -> LinearizedLosses:
  """Like `linearize_losses`, and scores the batch against `tangent` in the same forward pass.

  For a direction known before the step, such as a cached reference
  gradient. The forward pass carries each activation's tangent beside its
  value (a `jax.jvp` inside the `jax.vjp`). It costs the FLOPs of
  `linearize_losses` followed by `compute_alignment`, but XLA:CPU gave the
  small CNN's train step 15.84 MiB of temporary memory with it against
  17.37 MiB with those two (jax 0.10.2). The loss function compiled alone
  needs the same memory either way, so the saving comes from how XLA
  schedules the whole step.

  Returns:
    The linearisation, with `alignment` [B] set to <grad loss_i, tangent>.
    Its `jvp` for other directions repeats the forward pass.
  """

  def losses_and_alignment(point):
    losses, alignment, aux = jax.jvp(loss_fn, (point,), (tangent,), has_aux=True)
    return losses, (aux, alignment)

  losses, vjp_fn, (aux, alignment) = jax.vjp(losses_and_alignment, params, has_aux=True)

  def jvp(other):
    return jax.jvp(lambda point: loss_fn(point)[0], (params,), (other,))[1]

  def vjp(cotangent):
    return vjp_fn(as_loss_dtype(cotangent, losses))[0]

  return LinearizedLosses(losses, aux, jvp, vjp, alignment=alignment.astype(jnp.float32))


def differentiate_losses(
  loss_fn: Callable[[Any], tuple[jax.Array, Any]], params
) -> LinearizedLosses:
  """Like `linearize_losses`, but from `jax.vjp` and a separate `jax.jvp`.

  Each JVP runs the forward pass again, so this path costs one forward pass
  more than `linearize_losses`; it is the straightforward reference that
  tests and benchmarks compare the linearised path with.
  """
  losses, vjp_fn, aux = jax.vjp(loss_fn, params, has_aux=True)

  def jvp(tangent):
    return jax.jvp(lambda p: loss_fn(p)[0], (params,), (tangent,))[1]

  return LinearizedLosses(
    losses, aux, jvp, lambda cotangent: vjp_fn(as_loss_dtype(cotangent, losses))[0]
  )


def as_loss_dtype(cotangent: jax.Array, losses: jax.Array) -> jax.Array:
  """Returns `cotangent` [B] in the dtype of `losses`, which a VJP of the losses requires.

  Rates are float32, so a model whose losses are bfloat16 or float16 gets
  its cotangent rounded to that dtype; with float32 losses it is unchanged.
  """
  return jnp.asarray(cotangent).astype(losses.dtype)


def weighted_gradient(lin: LinearizedLosses, cotangent: jax.Array):
  """Takes the VJP of the losses with `cotangent` [B].

  Returns:
    The params-shaped gradient, and the linearisation to score examples with
    afterwards: `lin` itself, or for the layerwise path one whose `jvp` reads
    the layer cotangents of this backward pass.
  """
  if lin.backward is None:
    return lin.vjp(cotangent), lin
  return lin.backward(cotangent)


def per_example_gradients(lin: LinearizedLosses):
  """Returns the gradient of every loss in the batch, a pytree with leading [B]."""
  batch_size = lin.losses.shape[0]
  return jax.vmap(lin.vjp)(jnp.eye(batch_size, dtype=lin.losses.dtype))


def compute_alignment(lin: LinearizedLosses, tangents, *, method: str) -> jax.Array:
  """Computes the alignment of each example with each of T tangent directions.

  Args:
    lin: the linearised per-example losses.
    tangents: a params-shaped pytree whose leaves have a leading axis T.
    method: `'jvp'` (forward mode, O(P) memory), `'layerwise'` or `'auto'`
      (the same contract, `lin.jvp` from `weighted_gradient`) or `'vmap'`
      (per-example gradients, O(B P) memory).

  Returns:
    float32 array [T, B]; entry (t, i) is <grad loss_i, tangents[t]>.
  """
  if method in ("jvp", "layerwise", "auto"):
    return jax.vmap(lin.jvp)(tangents).astype(jnp.float32)
  if method == "vmap":
    grads = per_example_gradients(lin)
    products = jax.tree.map(
      lambda g, t: jnp.einsum("b...,t...->tb", g, t, precision="highest"), grads, tangents
    )
    return sum(jax.tree.leaves(products)).astype(jnp.float32)
  raise ValueError(f"alignment method must be one of {ALIGNMENT_METHODS}, got {method!r}.")


def stack_tangents(*trees):
  """Stacks params-shaped pytrees along a new leading axis for `compute_alignment`."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
