"""Tests of Hessian-vector products and Lanczos eigenvalues against a dense Hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from ddlr import hessian
from ddlr.models import SmallCNN

NUM_CLASSES = 3
# Parameters of the tiny CNN below, counted in its docstring.
NUM_PARAMETERS = 217


def _tiny_cnn_problem(num_examples=20):
  """A SmallCNN with BatchNorm on 8x8 images, with non-trivial running statistics.

  Parameters: conv 5x5x1x2 and 3x3x2x4 without biases, BatchNorms 2 + 2 and 4 + 4,
  dense (2*2*4)x4 + 4, dense 4x3 + 3: 50 + 4 + 72 + 8 + 68 + 15 = 217.
  """
  model = SmallCNN(num_classes=NUM_CLASSES, width=2, hidden=4, batch_norm=True)
  keys = jax.random.split(jax.random.key(0), 4)
  images = jax.random.normal(keys[0], (num_examples, 8, 8, 1))
  labels = jax.random.randint(keys[1], (num_examples,), 0, NUM_CLASSES)
  variables = model.init(keys[2], images[:1], train=False)
  # Running statistics far from the initial (0, 1), so that a loss in training
  # mode, which ignores them, would give a different Hessian.
  leaves, treedef = jax.tree.flatten(variables["batch_stats"])
  stat_keys = jax.random.split(keys[3], len(leaves))
  leaves = [
    0.5 + jax.random.uniform(stat_key, leaf.shape)
    for stat_key, leaf in zip(stat_keys, leaves, strict=True)
  ]
  batch_stats = jax.tree.unflatten(treedef, leaves)
  return model, variables["params"], batch_stats, np.asarray(images), np.asarray(labels)


def _dense_hessian(model, params, batch_stats, images, labels) -> np.ndarray:
  """The Hessian of the eval-mode mean loss, from jax.hessian on the flat parameters."""
  flat_params, unravel = ravel_pytree(params)

  def mean_loss(flat):
    variables = {"params": unravel(flat), "batch_stats": batch_stats}
    logits = model.apply(variables, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  matrix = np.asarray(jax.jit(jax.hessian(mean_loss))(flat_params), np.float64)
  return (matrix + matrix.T) / 2


@pytest.fixture(scope="module")
def problem():
  model, params, batch_stats, images, labels = _tiny_cnn_problem()
  dense = _dense_hessian(model, params, batch_stats, images, labels)
  return model, params, batch_stats, images, labels, dense


@pytest.fixture(scope="module")
def hvp(problem):
  return hessian.HessianVectorProduct(problem[0], chunk_size=64)


def test_tiny_cnn_parameter_count(problem):
  _, _, _, _, _, dense = problem
  assert dense.shape == (NUM_PARAMETERS, NUM_PARAMETERS)


def test_hvp_matches_dense_hessian(problem, hvp):
  _, params, batch_stats, images, labels, dense = problem
  matvec, dim = hvp.linear_operator(params, batch_stats, images, labels)
  assert dim == NUM_PARAMETERS
  vector = np.asarray(jax.random.normal(jax.random.key(1), (dim,)))
  expected = dense @ vector
  product = np.asarray(matvec(jnp.asarray(vector)))
  scale = np.abs(expected).max()
  np.testing.assert_allclose(product, expected, atol=1e-4 * scale)


def test_chunked_hvp_equals_unchunked(problem):
  model, params, batch_stats, images, labels, _ = problem
  vector = jax.random.normal(jax.random.key(2), (NUM_PARAMETERS,))
  whole, _ = hessian.HessianVectorProduct(model, chunk_size=20).linear_operator(
    params, batch_stats, images, labels
  )
  # 20 examples in chunks of 6: 6 + 6 + 6 + 2 and 4 zero-weight padding rows.
  chunked, _ = hessian.HessianVectorProduct(model, chunk_size=6).linear_operator(
    params, batch_stats, images, labels
  )
  expected = np.asarray(whole(vector))
  np.testing.assert_allclose(
    np.asarray(chunked(vector)), expected, atol=1e-5 * np.abs(expected).max()
  )


def test_hvp_compiles_once_per_chunk_shape(problem):
  model, params, batch_stats, images, labels, _ = problem
  hvp = hessian.HessianVectorProduct(model, chunk_size=8)
  vector = jnp.ones(NUM_PARAMETERS)
  for count in (20, 13, 5):
    matvec, _ = hvp.linear_operator(params, batch_stats, images[:count], labels[:count])
    matvec(vector)
  assert hvp.chunk_hvp._cache_size() == 1


def test_lanczos_full_basis_gives_top_eigenvalues(problem, hvp):
  _, params, batch_stats, images, labels, dense = problem
  result = hessian.top_hessian_eigenvalues(
    hvp,
    params,
    batch_stats,
    images,
    labels,
    k=10,
    num_iterations=NUM_PARAMETERS,
    key=jax.random.key(0),
  )
  expected = np.linalg.eigvalsh(dense)[::-1][:10]
  # float32 products: agreement to 1e-4 of the largest eigenvalue.
  np.testing.assert_allclose(result.eigenvalues, expected, atol=1e-4 * expected[0])
  assert np.all(np.diff(result.eigenvalues) <= 0)
  assert result.num_iterations == NUM_PARAMETERS


def test_lanczos_few_iterations_bounds_top_eigenvalues(problem, hvp):
  _, params, batch_stats, images, labels, dense = problem
  result = hessian.top_hessian_eigenvalues(
    hvp, params, batch_stats, images, labels, k=3, num_iterations=40, key=jax.random.key(0)
  )
  spectrum = np.linalg.eigvalsh(dense)
  # Ritz values never exceed the largest eigenvalue, and each lies within its
  # residual norm of some eigenvalue (both up to float32 rounding).
  tolerance = 1e-4 * spectrum[-1]
  assert result.eigenvalues[0] <= spectrum[-1] + tolerance
  for value, residual in zip(result.eigenvalues, result.residual_norms, strict=True):
    assert np.abs(spectrum - value).min() <= residual + tolerance


def test_lanczos_matches_eigvalsh_on_diagonal_operator():
  # Eigenvalues 1..50 with a repeated top pair and negative values: the top 5
  # of diag(-3, ..., 46, 48, 48) are 48, 48, 46, 45, 44.
  diagonal = np.concatenate([np.arange(-3.0, 47.0), [48.0, 48.0]])
  result = hessian.lanczos_top_eigenvalues(
    lambda v: jnp.asarray(diagonal, jnp.float32) * v,
    diagonal.size,
    5,
    num_iterations=diagonal.size,
    key=jax.random.key(3),
  )
  np.testing.assert_allclose(result.eigenvalues, [48.0, 48.0, 46.0, 45.0, 44.0], atol=1e-3)


def test_lanczos_start_key_fixes_result(problem, hvp):
  _, params, batch_stats, images, labels, _ = problem
  runs = [
    hessian.top_hessian_eigenvalues(
      hvp, params, batch_stats, images, labels, k=2, num_iterations=10, key=jax.random.key(7)
    ).eigenvalues
    for _ in range(2)
  ]
  np.testing.assert_array_equal(runs[0], runs[1])


def test_k_above_parameter_count_raises(problem, hvp):
  _, params, batch_stats, images, labels, _ = problem
  invalid_k = NUM_PARAMETERS + 1
  with pytest.raises(
    ValueError, match=rf"k={invalid_k} is invalid; expected 1 <= k <= {NUM_PARAMETERS}"
  ):
    hessian.top_hessian_eigenvalues(
      hvp, params, batch_stats, images, labels, k=invalid_k, num_iterations=invalid_k,
      key=jax.random.key(0),
    )  # fmt: skip


def test_iterations_below_k_raise(problem, hvp):
  _, params, batch_stats, images, labels, _ = problem
  with pytest.raises(ValueError, match=r"num_iterations=4 is invalid; expected k=5"):
    hessian.top_hessian_eigenvalues(
      hvp, params, batch_stats, images, labels, k=5, num_iterations=4, key=jax.random.key(0)
    )


def test_empty_example_set_raises(problem, hvp):
  _, params, batch_stats, images, labels, _ = problem
  with pytest.raises(ValueError, match="the example set is empty"):
    hvp.linear_operator(params, batch_stats, images[:0], labels[:0])


def test_invalid_chunk_size_raises(problem):
  model = problem[0]
  with pytest.raises(ValueError, match="chunk_size=0 is invalid"):
    hessian.HessianVectorProduct(model, chunk_size=0)


def test_sample_class_examples_is_fixed_per_class():
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
  both = hessian.sample_class_examples(labels, [0, 2], 2, seed=5)
  alone = hessian.sample_class_examples(labels, [2], 2, seed=5)
  np.testing.assert_array_equal(both[2], alone[2])
  assert set(both[0]) <= {0, 3, 6, 9}
  assert len(set(both[0])) == 2
  assert set(both[2]) <= {2, 5, 8}


def test_class_without_examples_raises():
  labels = np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match="class 2 has no examples"):
    hessian.sample_class_examples(labels, [0, 2], 1, seed=0)


def test_class_with_too_few_examples_raises():
  labels = np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match="class 1 has 2 examples, fewer than the 3 requested"):
    hessian.sample_class_examples(labels, [1], 3, seed=0)
