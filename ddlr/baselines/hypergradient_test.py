"""Tests of the hypergradient-descent transformation against hand-derived rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddlr.baselines import hypergradient

PARAMS = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}
# Three gradients with g2.g1 = 0.5 - 2 + 6 = 4.5, g3.g2 = 0.5 - 1 + 2 = 1.5
# and g3.g1 = 1 + 2 + 3 = 6.
GRADIENTS = [
  {"w": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])},
  {"w": jnp.array([0.5, -1.0]), "b": jnp.array([2.0])},
  {"w": jnp.array([1.0, 1.0]), "b": jnp.array([1.0])},
]


def _run_steps(tx):
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  rates, all_updates = [], []
  for grads in GRADIENTS:
    updates, state = update(grads, state, PARAMS)
    rates.append(float(state.learning_rate))
    all_updates.append(updates)
  return rates, all_updates


def test_sgd_rate_follows_gradient_products():
  tx = hypergradient.hypergradient_descent(
    optax.sgd(1.0), initial_learning_rate=0.1, hyper_learning_rate=0.01
  )
  rates, updates = _run_steps(tx)

  # alpha_t = alpha_{t-1} + beta g_t . g_{t-1}; the first step has no previous direction.
  np.testing.assert_allclose(rates, [0.1, 0.1 + 0.01 * 4.5, 0.145 + 0.01 * 1.5], rtol=1e-6)
  np.testing.assert_allclose(updates[2]["w"], -0.16 * np.array([1.0, 1.0]), rtol=1e-6)
  np.testing.assert_allclose(updates[2]["b"], [-0.16], rtol=1e-6)


def test_momentum_rate_uses_previous_update_direction():
  tx = hypergradient.hypergradient_descent(
    optax.sgd(1.0, momentum=0.5), initial_learning_rate=0.1, hyper_learning_rate=0.01
  )
  rates, updates = _run_steps(tx)

  # u_1 = -g1, u_2 = -(0.5 g1 + g2), so alpha_3 = 0.145 + 0.01 (0.5 * 6 + 1.5).
  np.testing.assert_allclose(rates, [0.1, 0.145, 0.19], rtol=1e-6)
  # u_3 = -(0.5 (0.5 g1 + g2) + g3), w component = -([0.25, 0.5] + [0.25, -0.5] + [1, 1]).
  np.testing.assert_allclose(updates[2]["w"], -0.19 * np.array([1.5, 1.0]), rtol=1e-6)


def test_schedule_factor_scales_direction_and_hypergradient():
  factors = jnp.array([1.0, 0.5, 0.25])
  tx = hypergradient.hypergradient_descent(
    optax.sgd(1.0),
    initial_learning_rate=0.1,
    hyper_learning_rate=0.01,
    schedule=lambda count: factors[count],
  )
  rates, updates = _run_steps(tx)

  # u_1 = -g1, u_2 = -0.5 g2, so alpha_3 = 0.145 + 0.01 * 0.5 * g3.g2.
  np.testing.assert_allclose(rates, [0.1, 0.145, 0.145 + 0.005 * 1.5], rtol=1e-6)
  np.testing.assert_allclose(updates[1]["b"], [-0.145 * 0.5 * 2.0], rtol=1e-6)


def test_zero_hyper_learning_rate_keeps_rate():
  tx = hypergradient.hypergradient_descent(
    optax.sgd(1.0), initial_learning_rate=0.1, hyper_learning_rate=0.0
  )
  rates, _ = _run_steps(tx)

  assert rates == pytest.approx([0.1, 0.1, 0.1])


@pytest.mark.parametrize(
  "field, value",
  [("initial_learning_rate", -0.1), ("hyper_learning_rate", float("nan"))],
)
def test_invalid_hyperparameter_is_rejected(field, value):
  kwargs = {"initial_learning_rate": 0.1, "hyper_learning_rate": 0.01, field: value}
  with pytest.raises(ValueError, match=field):
    hypergradient.hypergradient_descent(optax.sgd(1.0), **kwargs)
