"""Per-example alignment from the layer cotangents of the weighted backward pass.

For a layer whose output is linear in its own parameters, y = f(x; W) (Dense
and Conv, bias included), the gradient of example i's loss with respect to W
is J_W(x_i)^T delta_i, with delta_i = d loss_i / d y_i. So the alignment of
example i with a tangent direction t is

  s_i = <grad loss_i, t> = sum over layers l of <delta_l,i, f_l(x_l,i; t_l)>,

one forward-like pass of each layer with its weights replaced by t, on inputs
that the forward pass already computed. The deltas come from the same
backward pass as the weighted gradient: with the cotangent c_i on loss_i, the
backward pass yields c_i delta_l,i, so s_i is that product divided by c_i.
This costs about one forward pass on top of the forward and backward, where
the `jvp` path costs about two, because its tangent also runs through every
activation (W dx next to dW x).

The identity needs each example's loss to depend on that example's input
alone, so it does not apply to models with BatchNorm in training mode, and
every parameter must belong to a Dense or Conv layer (`find_layer_calls`).

NOTE: layers inside Flax's lifted transforms (`nn.scan`, `nn.vmap`,
`nn.remat`) were never tried with this path; none of the models here use them.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddlr import alignment as alignment_lib
from ddlr.alignment import LinearizedLosses

# Layers whose output is linear in their parameters (kernel and bias).
PROBED_LAYERS = (nn.Dense, nn.Conv)
MIN_COTANGENT = 1e-30


@dataclasses.dataclass(frozen=True)
class _LayerCall:
  """One call of a probed layer during the forward pass."""

  layer: nn.Module  # unbound copy, applied to tangents in place of parameters
  path: tuple[str, ...]  # the layer's path in the parameter tree
  output: jax.ShapeDtypeStruct


def _probing_interceptor(calls: list[_LayerCall] | None, perturbations, inputs: list):
  """Returns an interceptor that records each probed layer call and adds its perturbation.

  With `calls` a list, it appends one `_LayerCall` per probed call (shape
  discovery). Otherwise it adds `perturbations[k]` to the output of the k-th
  probed call and appends that call's input to `inputs`.
  """

  def interceptor(next_fun, args, kwargs, context):
    # The exact types only: a subclass may override __call__ with something
    # that is not linear in its parameters.
    if context.method_name != "__call__" or type(context.module) not in PROBED_LAYERS:
      return next_fun(*args, **kwargs)
    output = next_fun(*args, **kwargs)
    layer_input = args[0] if args else kwargs["inputs"]
    if calls is not None:
      layer = context.module.clone(parent=None)
      shape = jax.ShapeDtypeStruct(output.shape, output.dtype)
      calls.append(_LayerCall(layer, context.module.path, shape))
      return output
    inputs.append(layer_input)
    return output + perturbations[len(inputs) - 1]

  return interceptor


def find_layer_calls(loss_fn: Callable[[Any], tuple[jax.Array, Any]], params, batch_stats):
  """Traces `loss_fn` once, for shapes only, and lists its Dense and Conv calls.

  Returns:
    `(calls, None)` with the layer calls in call order when the layerwise
    alignment applies to this model. Otherwise `(None, reason)`, where the
    reason is a sentence naming the BatchNorm or the uncovered parameters.
  """
  if batch_stats:
    return None, (
      "the layerwise alignment needs each example's loss to depend on its own input "
      "alone, but this model has BatchNorm, which couples the batch in training mode"
    )
  calls: list[_LayerCall] = []
  with nn.intercept_methods(_probing_interceptor(calls, None, [])):
    # A fresh function each time: eval_shape caches traces by function, and a
    # cached trace would not run the interceptor.
    losses, _ = jax.eval_shape(lambda p: loss_fn(p), params)
  batch_size = losses.shape[0]
  off_batch = sorted(
    {"/".join(call.path) for call in calls if call.output.shape[:1] != (batch_size,)}
  )
  if off_batch:
    return None, (
      "the layerwise alignment needs every Dense and Conv output to have the batch as "
      f"its leading axis, but the output of {', '.join(off_batch[:5])} does not"
    )
  probed_paths = {call.path for call in calls}
  uncovered = sorted(
    "/".join(path)
    for path in traverse_util.flatten_dict(params)
    if not any(path[: len(prefix)] == prefix for prefix in probed_paths)
  )
  if uncovered:
    return None, (
      "the layerwise alignment needs every parameter inside a Dense or Conv layer, "
      f"but {', '.join(uncovered[:5])} {'is' if len(uncovered) == 1 else 'are'} not"
    )
  return calls, None


def linearize_layerwise(
  loss_fn: Callable[[Any], tuple[jax.Array, Any]], params, calls: list[_LayerCall]
) -> LinearizedLosses:
  """Differentiates `loss_fn(params) -> (losses [B], aux)` for the layerwise alignment.

  `loss_fn` must apply a Flax model inside, and `calls` are its layer calls
  from `find_layer_calls`. The returned linearisation's `backward(cotangent)`
  gives the VJP of the losses with `cotangent` [B] and a linearisation whose
  `jvp` scores examples from that backward pass's layer cotangents, at the
  cost of one forward-like pass per tangent. The scores are divided by the
  cotangent, so an example whose cotangent is below `MIN_COTANGENT` gets
  alignment 0. Before `backward`, `jvp` is a plain `jax.jvp`, which repeats the forward
  pass.
  """

  def probed(params, perturbations):
    inputs: list[jax.Array] = []
    with nn.intercept_methods(_probing_interceptor(None, perturbations, inputs)):
      losses, aux = loss_fn(params)
    return losses, (aux, inputs)

  zeros = [jnp.zeros(call.output.shape, call.output.dtype) for call in calls]
  losses, vjp_fn, (aux, inputs) = jax.vjp(probed, params, zeros, has_aux=True)

  def plain_jvp(tangent):
    return jax.jvp(lambda p: loss_fn(p)[0], (params,), (tangent,))[1]

  def vjp(cotangent):
    return vjp_fn(alignment_lib.as_loss_dtype(cotangent, losses))[0]

  def backward(cotangent):
    cotangent = alignment_lib.as_loss_dtype(cotangent, losses)
    grads, deltas = vjp_fn(cotangent)

    def layerwise_jvp(tangent):
      flat_tangent = traverse_util.flatten_dict(tangent)
      weighted = jnp.zeros(cotangent.shape, jnp.float32)
      for call, layer_input, delta in zip(calls, inputs, deltas, strict=True):
        layer_tangent = {
          path[len(call.path) :]: leaf
          for path, leaf in flat_tangent.items()
          if path[: len(call.path)] == call.path
        }
        variables = {"params": traverse_util.unflatten_dict(layer_tangent)}
        direction = call.layer.apply(variables, layer_input)
        products = (delta * direction).astype(jnp.float32)
        weighted = weighted + jnp.sum(products.reshape(products.shape[0], -1), axis=1)
      # Below this cotangent the scaled layer cotangents lose float32 precision
      # and, at zero, give NaN. Such an example's rate is then below 1e-30 of
      # its batch's mean, so its alignment no longer moves any rate; it gets 0.
      cotangent32 = cotangent.astype(jnp.float32)
      usable = jnp.abs(cotangent32) >= MIN_COTANGENT
      return jnp.where(usable, weighted / jnp.where(usable, cotangent32, 1.0), 0.0)

    return grads, LinearizedLosses(losses, aux, layerwise_jvp, vjp)

  return LinearizedLosses(losses, aux, plain_jvp, vjp, backward)


def check_agreement(loss_fn, params, calls: list[_LayerCall], rtol: float = 1e-3) -> str | None:
  """Compares the layerwise and the jvp alignment on one random tangent.

  The layer check of `find_layer_calls` cannot see a parameter used outside
  its layer's call, such as a tied kernel read from the variables or
  `nn.map_variables`. Such a use makes the layerwise alignment wrong, and this
  comparison catches it.

  Returns:
    None when they agree within `rtol` of the largest alignment, else the reason.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  tangent = jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(key, leaf.shape, leaf.dtype) for key, leaf in zip(keys, leaves, strict=True)
    ],
  )

  @jax.jit
  def both_paths(params, tangent):
    lin = linearize_layerwise(loss_fn, params, calls)
    cotangent = jnp.linspace(0.5, 1.5, lin.losses.shape[0])
    _, scored = alignment_lib.weighted_gradient(lin, cotangent)
    reference = alignment_lib.linearize_losses(loss_fn, params)
    return scored.jvp(tangent), reference.jvp(tangent)

  layerwise_scores, jvp_scores = jax.device_get(both_paths(params, tangent))
  scale = float(np.max(np.abs(jvp_scores)))
  error = float(np.max(np.abs(layerwise_scores - jvp_scores)))
  if error <= rtol * scale + 1e-6:
    return None
  return (
    f"the layerwise alignment differs from the jvp alignment by {error:.3g} (largest "
    f"alignment {scale:.3g}) on this model, so a parameter is probably used outside "
    "its Dense or Conv layer's call"
  )


def choose_alignment(requested: str, enabled: bool, loss_fn, params, batch_stats):
  """Decides between the layerwise and the jvp path for alignment 'auto' or 'layerwise'.

  `loss_fn` is the model's per-example loss on a small batch. The layerwise
  path is chosen when the model's layers allow it (`find_layer_calls`) and it
  agrees with the jvp path (`check_agreement`). 'auto' keeps jvp for the
  baselines (`enabled` false), which score a batch before its backward pass.

  Returns:
    `(path, reason)`: 'layerwise' and None, or 'jvp' and why layerwise was not
    taken. For `requested='layerwise'` on a model where it does not apply, the
    path is None.
  """
  if requested == "auto" and not enabled:
    return "jvp", "the baselines score a batch before its backward pass"
  try:
    calls, reason = find_layer_calls(loss_fn, params, batch_stats)
    if calls is not None:
      reason = check_agreement(loss_fn, params, calls)
  except (
    ValueError,
    TypeError,
    IndexError,
    jax.errors.JAXTypeError,
    flax.errors.FlaxError,
  ) as error:
    # Lifted transforms (nn.remat, nn.scan) fail while being probed.
    reason = f"the layerwise path failed on this model ({type(error).__name__}: {error})"
  if reason is None:
    return "layerwise", None
  return (None if requested == "layerwise" else "jvp"), reason
