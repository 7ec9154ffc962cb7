"""Top eigenvalues of the Hessian of a model's mean loss over a set of examples.

The loss is the mean softmax cross-entropy of the examples, without weight
decay (which would add its coefficient to every eigenvalue). Hessian-vector
products are forward-over-reverse, `jax.jvp` of `jax.grad` on the parameter
pytree. BatchNorm runs in evaluation mode with the stored running statistics,
so the loss is a fixed function of the parameters. Each example's loss then
does not depend on the other examples, and the Hessian of a set is the same
however it is cut into chunks. In training mode the batch statistics would
couple the examples, and the Hessian would depend on the chunking.

The top eigenvalues come from Lanczos iteration with full reorthogonalisation,
started from a normal random vector drawn from a fixed key. With as many
iterations as parameters the result is the exact spectrum up to rounding.
With fewer iterations the Ritz values approach the largest eigenvalues from
below, and `LanczosResult.residual_norms` bounds each one's error: some
eigenvalue of the Hessian lies within that distance of it.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

# A Lanczos step whose new direction keeps less than this fraction of the norm
# of H v has found an invariant subspace. The iteration then restarts from a
# fresh random vector orthogonal to the basis, so that the basis keeps growing.
_BREAKDOWN_TOLERANCE = 1e-5


class LanczosResult(NamedTuple):
  """Top eigenvalues of a symmetric operator found by `lanczos_top_eigenvalues`."""

  eigenvalues: np.ndarray  # [k] float64, largest first
  # [k] float64: |beta_m * y_m|, the norm of H x - theta x for each Ritz pair (theta, x).
  residual_norms: np.ndarray
  num_iterations: int


def _weighted_loss_sum(params, batch_stats, images, labels, weights, *, model: nn.Module):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  logits = model.apply(variables, images, train=False).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(weights * losses)


def _chunk_hvp(params, batch_stats, images, labels, weights, flat_tangent, total, *, model):
  """Adds one chunk's weighted Hessian-vector product to `total` (flat vectors)."""
  # Flattening inside the jitted function keeps the per-leaf slicing out of
  # eager mode, where every leaf shape would compile on its own.
  _, unravel = ravel_pytree(params)

  def grad_fn(p):
    return jax.grad(_weighted_loss_sum)(p, batch_stats, images, labels, weights, model=model)

  product = jax.jvp(grad_fn, (params,), (unravel(flat_tangent),))[1]
  return total + ravel_pytree(product)[0]


class HessianVectorProduct:
  """Hessian-vector products of a model's mean loss, computed chunk by chunk.

  The chunk function is jitted once per model and chunk shape: every example
  set is padded to a whole number of chunks with zero-weight examples, so sets
  of any size reuse the same compiled function. Memory is that of one chunk's
  forward-over-reverse pass, whatever the number of examples.
  """

  def __init__(self, model: nn.Module, *, chunk_size: int):
    """Prepares the jitted chunk product of `model` for chunks of `chunk_size` examples.

    Raises:
      ValueError: if `chunk_size` is not a positive integer.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"chunk_size={chunk_size!r} is invalid; expected a positive integer.")
    self.chunk_size = chunk_size
    self.chunk_hvp = jax.jit(functools.partial(_chunk_hvp, model=model))

  def linear_operator(
    self, params, batch_stats, images, labels
  ) -> tuple[Callable[[jax.Array], jax.Array], int]:
    """Builds `v -> H v` on flat vectors for the mean loss over (images, labels).

    Args:
      params: the model's parameter pytree, at which the Hessian is taken.
      batch_stats: BatchNorm running statistics, `{}` for models without BatchNorm.
      images: [n, ...] inputs, n >= 1.
      labels: [n] integer labels.

    Returns:
      The product on float32 vectors in `ravel_pytree(params)`'s layout, and
      their length.

    Raises:
      ValueError: if there are no examples or images and labels differ in length.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    num_examples = len(labels)
    if num_examples == 0:
      raise ValueError("the example set is empty; the mean loss needs at least one example.")
    if len(images) != num_examples:
      raise ValueError(f"got {len(images)} images but {num_examples} labels; expected equal.")
    dim = sum(leaf.size for leaf in jax.tree.leaves(params))
    chunks = self._chunks(images, labels)

    def matvec(vector: jax.Array) -> jax.Array:
      total = jnp.zeros(dim, jnp.float32)
      for chunk_images, chunk_labels, chunk_weights in chunks:
        total = self.chunk_hvp(
          params, batch_stats, chunk_images, chunk_labels, chunk_weights, vector, total
        )
      return total

    return matvec, int(dim)

  def _chunks(self, images: np.ndarray, labels: np.ndarray) -> list[tuple[Any, Any, Any]]:
    """Pads the examples to whole chunks and returns them on the device."""
    num_examples = len(labels)
    num_chunks = -(-num_examples // self.chunk_size)
    padding = num_chunks * self.chunk_size - num_examples
    images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(padding, labels.dtype)])
    # Each example weighs 1/n, so the chunks' products sum to the mean's. Padding weighs 0.
    weights = np.concatenate(
      [np.full(num_examples, 1.0 / num_examples, np.float32), np.zeros(padding, np.float32)]
    )
    chunks = []
    for start in range(0, len(labels), self.chunk_size):
      stop = start + self.chunk_size
      chunks.append(
        (jnp.asarray(images[start:stop]), jnp.asarray(labels[start:stop]), weights[start:stop])
      )
    return chunks


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(basis: jax.Array, index: jax.Array, vector: jax.Array) -> jax.Array:
  return basis.at[index].set(vector)


def _orthogonalize(basis: jax.Array, vector: jax.Array) -> jax.Array:
  # Rows not yet filled are zero and remove nothing. A second pass of classical
  # Gram-Schmidt removes what rounding left after the first.
  vector = vector - basis.T @ (basis @ vector)
  return vector - basis.T @ (basis @ vector)


@jax.jit
def _lanczos_step(basis, vector, previous, product, previous_beta):
  """Returns alpha, the next unnormalised direction, its norm and the norm of the product."""
  alpha = jnp.dot(product, vector)
  direction = _orthogonalize(basis, product - alpha * vector - previous_beta * previous)
  return alpha, direction, jnp.linalg.norm(direction), jnp.linalg.norm(product)


@functools.partial(jax.jit, static_argnums=1)
def _random_unit_vector(key: jax.Array, dim: int, basis: jax.Array) -> jax.Array:
  vector = _orthogonalize(basis, jax.random.normal(key, (dim,), jnp.float32))
  return vector / jnp.linalg.norm(vector)


def lanczos_top_eigenvalues(
  matvec: Callable[[jax.Array], jax.Array],
  dim: int,
  k: int,
  *,
  num_iterations: int,
  key: jax.Array,
) -> LanczosResult:
  """Finds the k largest eigenvalues of a symmetric operator by Lanczos iteration.

  Each iteration applies `matvec` once and reorthogonalises the new direction
  against every earlier one, so the basis stays orthonormal in float32 and no
  spurious copies of converged eigenvalues appear. The basis is stored as a
  [num_iterations, dim] float32 array on the device.

  Args:
    matvec: the operator on [dim] float32 vectors; it must be symmetric.
    dim: length of the vectors (the parameter count for a Hessian).
    k: how many of the largest (algebraic) eigenvalues to return.
    num_iterations: Lanczos steps, in [k, dim]; each costs one `matvec`.
    key: PRNG key of the start vector (and of restarts), so results repeat.

  Returns:
    The k largest Ritz values, largest first, with their residual norms.

  Raises:
    ValueError: if k or num_iterations is outside its range.
  """
  if not 1 <= k <= dim:
    raise ValueError(f"k={k} is invalid; expected 1 <= k <= {dim}, the operator's dimension.")
  if not k <= num_iterations <= dim:
    raise ValueError(
      f"num_iterations={num_iterations} is invalid; expected k={k} <= num_iterations <= {dim}, "
      "the operator's dimension."
    )
  basis = jnp.zeros((num_iterations, dim), jnp.float32)
  alphas = np.zeros(num_iterations)
  betas = np.zeros(num_iterations)
  vector = _random_unit_vector(key, dim, basis)
  previous = jnp.zeros(dim, jnp.float32)
  for j in range(num_iterations):
    basis = _set_row(basis, j, vector)
    product = matvec(vector).astype(jnp.float32)
    alpha, direction, beta, product_norm = _lanczos_step(
      basis, vector, previous, product, float(betas[j - 1]) if j else 0.0
    )
    alphas[j], betas[j] = float(alpha), float(beta)
    if j == num_iterations - 1:
      break
    previous = vector
    if betas[j] <= _BREAKDOWN_TOLERANCE * float(product_norm):
      # An invariant subspace: T splits into blocks, and the next block starts afresh.
      betas[j] = 0.0
      vector = _random_unit_vector(jax.random.fold_in(key, j + 1), dim, basis)
    else:
      vector = direction / betas[j]

  tridiagonal = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
  ritz_values, ritz_vectors = np.linalg.eigh(tridiagonal)
  top = np.argsort(ritz_values)[::-1][:k]
  residual_norms = np.abs(betas[-1] * ritz_vectors[-1, top])
  return LanczosResult(ritz_values[top], residual_norms, num_iterations)


def top_hessian_eigenvalues(
  hvp: HessianVectorProduct,
  params,
  batch_stats,
  images,
  labels,
  *,
  k: int,
  num_iterations: int,
  key: jax.Array,
) -> LanczosResult:
  """Finds the k largest Hessian eigenvalues of the mean loss over (images, labels).

  Raises:
    ValueError: for an empty example set, or k or num_iterations outside
      [1, parameter count] (see `lanczos_top_eigenvalues`).
  """
  matvec, dim = hvp.linear_operator(params, batch_stats, images, labels)
  return lanczos_top_eigenvalues(matvec, dim, k, num_iterations=num_iterations, key=key)


def sample_class_examples(
  labels: np.ndarray, classes: list[int], num_examples: int, seed: int
) -> dict[int, np.ndarray]:
  """Draws a fixed sample of `num_examples` example ids of each class, without replacement.

  The sample of a class depends only on (seed, class), not on which other
  classes are requested, so it is the same at every point of training.

  Returns:
    Sorted ids (rows of `labels`) per class.

  Raises:
    ValueError: if a class has no examples or fewer than `num_examples`.
  """
  labels = np.asarray(labels)
  samples = {}
  for label in classes:
    members = np.flatnonzero(labels == label)
    if members.size == 0:
      raise ValueError(f"class {label} has no examples; choose classes that occur in the labels.")
    if members.size < num_examples:
      raise ValueError(
        f"class {label} has {members.size} examples, fewer than the {num_examples} requested; "
        "request at most that many."
      )
    rng = np.random.default_rng([seed, label])
    samples[label] = np.sort(rng.choice(members, num_examples, replace=False))
  return samples
