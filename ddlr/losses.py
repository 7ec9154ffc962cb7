"""Per-example losses of a Flax classifier in training mode, and their mean gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def make_loss_fn(model: nn.Module, batch_stats, images, labels, temperatures=None):
  """Returns `params -> (per-example losses [B], (logits, new batch_stats))`, training mode.

  With `temperatures` [B], example i's loss is taken on logits / temperatures[i]
  (Data Parameters); the returned logits are the model's, unscaled.
  """

  def loss_fn(params):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
      logits, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
      new_stats = mutated["batch_stats"]
    else:
      logits = model.apply(variables, images, train=True)
      new_stats = batch_stats
    logits = logits.astype(jnp.float32)
    scaled = logits if temperatures is None else logits / temperatures[:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(scaled, labels)
    return losses, (logits, new_stats)

  return loss_fn


def mean_loss_gradient(model, batch_stats, params, images, labels):
  """Returns the gradient of the unweighted mean loss of a batch, training mode."""
  loss_fn = make_loss_fn(model, batch_stats, images, labels)
  return jax.grad(lambda p: jnp.mean(loss_fn(p)[0]))(params)
