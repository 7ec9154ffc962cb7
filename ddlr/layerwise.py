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

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ddlr.alignment import LinearizedLosses

# Layers whose output is linear in their parameters (kernel and bias).
PROBED_LAYERS = (nn.Dense, nn.Conv)


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
    if calls is not None:
      layer = context.module.clone(parent=None)
      shape = jax.ShapeDtypeStruct(output.shape, output.dtype)
      calls.append(_LayerCall(layer, context.module.path, shape))
      return output
    inputs.append(args[0])
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
    jax.eval_shape(loss_fn, params)
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
  cost of one forward-like pass per tangent. Every cotangent entry must be
  nonzero, because the scores are divided by it; a zero entry gives NaN.
  Before `backward`, `jvp` is a plain `jax.jvp`, which repeats the forward
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
    return vjp_fn(cotangent)[0]

  def backward(cotangent):
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
      return weighted / cotangent.astype(jnp.float32)

    return grads, LinearizedLosses(losses, aux, layerwise_jvp, vjp)

  return LinearizedLosses(losses, aux, plain_jvp, vjp, backward)
