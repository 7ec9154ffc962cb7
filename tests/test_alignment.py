"""Tests that the jvp and vmap alignment paths agree, with and without BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlr import alignment as alignment_lib
from ddlr import losses
from ddlr.models import SmallCNN

BATCH_SIZE = 6


def _setup(batch_norm: bool):
  model = SmallCNN(num_classes=4, width=4, hidden=16, batch_norm=batch_norm)
  keys = jax.random.split(jax.random.key(0), 4)
  images = jax.random.normal(keys[0], (BATCH_SIZE, 12, 12, 1))
  labels = jax.random.randint(keys[1], (BATCH_SIZE,), 0, 4)
  variables = model.init(keys[2], images, train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  loss_fn = losses.make_loss_fn(model, batch_stats, images, labels)
  leaves, treedef = jax.tree.flatten(params)
  tangent_keys = jax.random.split(keys[3], 2 * len(leaves))
  tangents = [
    jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape) for k, x in zip(ks, leaves, strict=True)]
    )
    for ks in (tangent_keys[: len(leaves)], tangent_keys[len(leaves) :])
  ]
  return model, params, loss_fn, alignment_lib.stack_tangents(*tangents)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_jvp_and_vmap_alignments_agree(batch_norm):
  _, params, loss_fn, tangents = _setup(batch_norm)

  @jax.jit
  def both_paths(params, tangents):
    lin = alignment_lib.linearize_losses(loss_fn, params)
    return tuple(
      alignment_lib.compute_alignment(lin, tangents, method=method) for method in ("jvp", "vmap")
    )

  with_jvp, with_vmap = both_paths(params, tangents)
  assert with_jvp.shape == (2, BATCH_SIZE)
  assert float(jnp.max(jnp.abs(with_jvp))) > 1e-3
  np.testing.assert_allclose(with_jvp, with_vmap, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_alignment_in_forward_pass_matches_linearized(batch_norm):
  _, params, loss_fn, tangents = _setup(batch_norm)
  first, second = (jax.tree.map(lambda t, i=i: t[i], tangents) for i in range(2))
  weights = jnp.linspace(0.2, 1.8, BATCH_SIZE)

  @jax.jit
  def both_paths(params):
    fused = alignment_lib.linearize_with_alignment(loss_fn, params, first)
    lin = alignment_lib.linearize_losses(loss_fn, params)
    return (
      (fused.losses, fused.alignment, fused.vjp(weights), fused.jvp(second), fused.aux),
      (
        lin.losses,
        alignment_lib.compute_alignment(lin, tangents, method="jvp"),
        lin.vjp(weights),
        lin.aux,
      ),
    )

  (losses_, alignment, gradient, other, aux), (want_losses, want, want_gradient, want_aux) = (
    both_paths(params)
  )
  assert alignment.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(alignment))) > 1e-3
  np.testing.assert_allclose(losses_, want_losses, rtol=1e-6)
  np.testing.assert_allclose(alignment, want[0], rtol=1e-4, atol=1e-5)
  # Its jvp for another direction runs the forward pass again.
  np.testing.assert_allclose(other, want[1], rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(gradient), jax.tree.leaves(want_gradient), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The logits and, with BatchNorm, the new running statistics.
  for a, b in zip(jax.tree.leaves(aux), jax.tree.leaves(want_aux), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_per_example_gradients_match_jacobian(batch_norm):
  _, params, loss_fn, _ = _setup(batch_norm)
  lin = alignment_lib.linearize_losses(loss_fn, params)
  jacobian = jax.jacrev(lambda p: loss_fn(p)[0])(params)
  per_example = alignment_lib.per_example_gradients(lin)
  for got, expected in zip(jax.tree.leaves(per_example), jax.tree.leaves(jacobian), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_single_example_vmap_differs_through_batch_norm():
  # Vmapping the model over single examples would normalise each example by
  # its own statistics; the coupled per-example gradients must not do that.
  model, params, loss_fn, _ = _setup(batch_norm=True)
  lin = alignment_lib.linearize_losses(loss_fn, params)
  coupled = alignment_lib.per_example_gradients(lin)
  images = jax.random.normal(jax.random.key(0), (BATCH_SIZE, 12, 12, 1))
  labels = jax.random.randint(jax.random.split(jax.random.key(0), 4)[1], (BATCH_SIZE,), 0, 4)
  stats = model.init(jax.random.key(1), images, train=False)["batch_stats"]

  def single_loss(p, image, label):
    return losses.make_loss_fn(model, stats, image[None], label[None])(p)[0][0]

  single = jax.jit(jax.vmap(jax.grad(single_loss), in_axes=(None, 0, 0)))(params, images, labels)
  difference = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(coupled), jax.tree.leaves(single), strict=True)
  )
  assert difference > 1e-3


@pytest.mark.parametrize("batch_norm", [False, True])
def test_weighted_gradient_matches_grad_of_weighted_loss(batch_norm):
  _, params, loss_fn, _ = _setup(batch_norm)
  weights = jnp.linspace(0.2, 1.8, BATCH_SIZE)
  lin = alignment_lib.linearize_losses(loss_fn, params)
  got = lin.vjp(weights / BATCH_SIZE)
  expected = jax.grad(lambda p: jnp.mean(weights * loss_fn(p)[0]))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_alignment_method_raises():
  _, params, loss_fn, tangents = _setup(batch_norm=False)
  lin = alignment_lib.linearize_losses(loss_fn, params)
  with pytest.raises(ValueError, match="alignment method must be one of"):
    alignment_lib.compute_alignment(lin, tangents, method="exact")


@pytest.mark.parametrize(
  "differentiate",
  [
    alignment_lib.linearize_losses,
    alignment_lib.differentiate_losses,
    lambda loss_fn, weights: alignment_lib.linearize_with_alignment(
      loss_fn, weights, jnp.ones_like(weights)
    ),
  ],
  ids=["linearize", "differentiate", "with alignment"],
)
def test_bfloat16_losses_take_float32_cotangent(differentiate):
  weights = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.bfloat16).reshape(3, 2)
  inputs = jnp.arange(12, dtype=jnp.bfloat16).reshape(4, 3) / 10

  def loss_fn(w):
    return jnp.sum((inputs @ w) ** 2, axis=-1), None

  lin = differentiate(loss_fn, weights)
  cotangent = jnp.array([0.25, 0.5, 0.75, 1.0], jnp.float32)  # rates are float32
  grads = lin.vjp(cotangent)

  assert grads.dtype == jnp.bfloat16
  expected = jax.grad(lambda w: jnp.sum(cotangent * loss_fn(w.astype(jnp.float32))[0]))(
    weights.astype(jnp.float32)
  )
  np.testing.assert_allclose(np.asarray(grads, np.float32), expected, rtol=2e-2, atol=1e-2)
