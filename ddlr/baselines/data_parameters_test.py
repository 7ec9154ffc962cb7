"""Tests of Data Parameters: temperature gradients by hand and the sparse update."""

import jax.numpy as jnp
import numpy as np
import pytest

from ddlr.baselines import data_parameters

LOGITS = np.array([[2.0, -1.0, 0.5], [0.3, 0.8, -0.4]], np.float32)
LABELS = np.array([0, 2])
IDS = np.array([3, 1])
NUM_INSTANCES = 5


def _state():
  return data_parameters.DataParametersState(
    log_class_temperature=jnp.log(jnp.array([1.0, 2.0, 0.5])),
    log_instance_temperature=jnp.log(jnp.array([1.0, 0.7, 1.0, 1.5, 1.0])),
    class_momentum=jnp.array([0.1, 0.2, 0.3]),
    instance_momentum=jnp.array([0.5, -0.5, 0.25, 0.0, 1.0]),
  )


def _hand_gradients(state, use_class=True, use_instance=True):
  """d mean_i CE(z_i / s_i, y_i) / d log sigma, from dl/ds = (z_y - E_p[z]) / s^2."""
  class_temperature = np.exp(np.asarray(state.log_class_temperature, np.float64))
  instance_temperature = np.exp(np.asarray(state.log_instance_temperature, np.float64))
  class_grad = np.zeros(3)
  instance_grad = np.zeros(NUM_INSTANCES)
  for z, y, i in zip(LOGITS.astype(np.float64), LABELS, IDS, strict=True):
    s = use_class * class_temperature[y] + use_instance * instance_temperature[i]
    p = np.exp(z / s) / np.exp(z / s).sum()
    dl_ds = (z[y] - p @ z) / s**2 / len(LABELS)
    class_grad[y] += use_class * class_temperature[y] * dl_ds
    instance_grad[i] += use_instance * instance_temperature[i] * dl_ds
  return class_grad, instance_grad


def test_temperature_gradient_matches_hand_derivation():
  settings = data_parameters.DataParametersSettings()
  class_grad, instance_grad = data_parameters.temperature_gradients(
    _state(), LOGITS, IDS, LABELS, settings
  )

  expected_class, expected_instance = _hand_gradients(_state())
  np.testing.assert_allclose(class_grad, expected_class, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(instance_grad, expected_instance, rtol=1e-5, atol=1e-7)
  assert np.count_nonzero(np.asarray(instance_grad)) == 2


def test_disabled_class_table_drops_out_of_temperature():
  settings = data_parameters.DataParametersSettings(use_class=False)
  temperatures = data_parameters.batch_temperatures(_state(), IDS, LABELS, settings)
  class_grad, instance_grad = data_parameters.temperature_gradients(
    _state(), LOGITS, IDS, LABELS, settings
  )

  np.testing.assert_allclose(temperatures, [1.5, 0.7], rtol=1e-6)
  _, expected_instance = _hand_gradients(_state(), use_class=False)
  np.testing.assert_allclose(instance_grad, expected_instance, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(class_grad, np.zeros(3))


def test_sparse_update_steps_only_the_batch_rows():
  settings = data_parameters.DataParametersSettings(
    class_learning_rate=0.2,
    instance_learning_rate=0.3,
    momentum=0.9,
    class_weight_decay=0.01,
    instance_weight_decay=0.02,
  )
  state = _state()
  new = data_parameters.update(state, LOGITS, IDS, LABELS, settings)

  class_grad, instance_grad = _hand_gradients(state)
  for old, old_m, value, velocity, grad, rows, lr, wd in [
    (state.log_class_temperature, state.class_momentum, new.log_class_temperature,
     new.class_momentum, class_grad, [0, 2], 0.2, 0.01),
    (state.log_instance_temperature, state.instance_momentum, new.log_instance_temperature,
     new.instance_momentum, instance_grad, [3, 1], 0.3, 0.02),
  ]:  # fmt: skip
    old, old_m = np.asarray(old, np.float64), np.asarray(old_m, np.float64)
    expected_m = old_m.copy()
    expected_m[rows] = 0.9 * old_m[rows] + grad[rows] + wd * old[rows]
    expected = old.copy()
    expected[rows] = old[rows] - lr * expected_m[rows]
    np.testing.assert_allclose(velocity, expected_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
  unseen = np.array([0, 2, 4])
  np.testing.assert_array_equal(
    new.log_instance_temperature[unseen], state.log_instance_temperature[unseen]
  )
  np.testing.assert_array_equal(new.instance_momentum[unseen], state.instance_momentum[unseen])
  assert new.log_class_temperature[1] == state.log_class_temperature[1]
  assert new.class_momentum[1] == state.class_momentum[1]


def test_update_clips_to_the_temperature_bounds():
  settings = data_parameters.DataParametersSettings(
    instance_learning_rate=1e4, class_learning_rate=1e4, momentum=0.0,
    log_temperature_min=-0.1, log_temperature_max=0.1,
  )  # fmt: skip
  new = data_parameters.update(_state(), LOGITS, IDS, LABELS, settings)

  batch_rows = np.asarray(new.log_instance_temperature)[IDS]
  np.testing.assert_allclose(np.abs(batch_rows), [0.1, 0.1], rtol=1e-6)
  assert new.log_instance_temperature[0] == pytest.approx(0.0)


def test_instance_scores_are_negative_log_temperature():
  scores = data_parameters.instance_scores(_state())

  np.testing.assert_allclose(scores, -np.log([1.0, 0.7, 1.0, 1.5, 1.0]), rtol=1e-6)
