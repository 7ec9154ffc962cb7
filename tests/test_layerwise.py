"""Tests of the layerwise alignment against per-example gradients and the jvp path."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddlr import alignment as alignment_lib
from ddlr import layerwise, losses, optim, steps
from ddlr.models import SmallCNN

BATCH_SIZE = 6


class TiedMLP(nn.Module):
  """One Dense layer applied twice, so a parameter path has two calls."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = nn.Dense(8)(x.reshape((x.shape[0], -1)))
    shared = nn.Dense(8)
    x = shared(nn.tanh(shared(nn.tanh(x))))
    return nn.Dense(4)(nn.tanh(x))


class NormedMLP(nn.Module):
  """A LayerNorm, whose scale and bias are parameters outside Dense and Conv."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = nn.LayerNorm()(nn.Dense(8)(x.reshape((x.shape[0], -1))))
    return nn.Dense(4)(x)


class ReluDense(nn.Dense):
  """A Dense subclass whose output is not linear in its parameters."""

  def __call__(self, inputs):
    return nn.relu(super().__call__(inputs))


class SubclassMLP(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    del train
    return nn.Dense(4)(ReluDense(8)(x.reshape((x.shape[0], -1))))


class ReadKernelMLP(nn.Module):
  """Reads a Dense kernel outside its layer's call, which the layer check cannot see."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    encoder = nn.Dense(8)
    hidden = nn.tanh(encoder(x.reshape((x.shape[0], -1))))
    return nn.Dense(4)(hidden @ encoder.variables["params"]["kernel"].T[:, :8])


class OffsetMLP(nn.Module):
  """A Dense applied to a constant without the batch axis, broadcast onto the batch."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    return nn.Dense(4)(x.reshape((x.shape[0], -1))) + nn.Dense(4)(jnp.ones((1, 1)))


class KeywordRematMLP(nn.Module):
  """A Dense called with a keyword and one under nn.remat."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = nn.Dense(8)(inputs=x.reshape((x.shape[0], -1)))
    return nn.remat(nn.Dense)(4)(nn.tanh(x))


def _problem(model):
  keys = jax.random.split(jax.random.key(0), 5)
  images = jax.random.normal(keys[0], (BATCH_SIZE, 12, 12, 1))
  labels = jax.random.randint(keys[1], (BATCH_SIZE,), 0, 4)
  variables = model.init(keys[2], images, train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  loss_fn = losses.make_loss_fn(model, batch_stats, images, labels)
  leaves, treedef = jax.tree.flatten(params)
  tangent_keys = jax.random.split(keys[3], 2 * len(leaves))
  tangents = alignment_lib.stack_tangents(
    *[
      jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(ks, leaves, strict=True)]
      )
      for ks in (tangent_keys[: len(leaves)], tangent_keys[len(leaves) :])
    ]
  )
  cotangent = jax.random.uniform(keys[4], (BATCH_SIZE,), minval=0.05, maxval=2.0)
  return params, batch_stats, loss_fn, tangents, cotangent


@pytest.mark.parametrize(
  "model", [SmallCNN(num_classes=4, width=4, hidden=16), TiedMLP()], ids=["small_cnn", "tied_mlp"]
)
def test_layerwise_matches_per_example_gradients(model):
  params, batch_stats, loss_fn, tangents, cotangent = _problem(model)

  @jax.jit
  def both_paths(params, tangents, cotangent):
    calls, reason = layerwise.find_layer_calls(loss_fn, params, batch_stats)
    assert reason is None
    lin = layerwise.linearize_layerwise(loss_fn, params, calls)
    grads, scored = alignment_lib.weighted_gradient(lin, cotangent)
    reference = alignment_lib.linearize_losses(loss_fn, params)
    return (
      grads,
      reference.vjp(cotangent),
      alignment_lib.compute_alignment(scored, tangents, method="layerwise"),
      alignment_lib.compute_alignment(reference, tangents, method="vmap"),
    )

  grads, expected_grads, with_layers, with_vmap = both_paths(params, tangents, cotangent)
  assert with_layers.shape == (2, BATCH_SIZE)
  assert float(jnp.max(jnp.abs(with_vmap))) > 1e-3
  np.testing.assert_allclose(with_layers, with_vmap, rtol=1e-4, atol=1e-5)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_layerwise_jvp_before_backward_is_plain_jvp():
  # Learning to reweight scores the batch before any backward pass.
  params, batch_stats, loss_fn, tangents, _ = _problem(TiedMLP())
  calls, _ = layerwise.find_layer_calls(loss_fn, params, batch_stats)
  lin = layerwise.linearize_layerwise(loss_fn, params, calls)
  reference = alignment_lib.linearize_losses(loss_fn, params)
  np.testing.assert_allclose(
    alignment_lib.compute_alignment(lin, tangents, method="layerwise"),
    alignment_lib.compute_alignment(reference, tangents, method="jvp"),
    rtol=1e-4,
    atol=1e-5,
  )


@pytest.mark.parametrize(
  "model, message",
  [
    (SmallCNN(num_classes=4, width=4, batch_norm=True), "BatchNorm"),
    (NormedMLP(), "LayerNorm_0/bias, LayerNorm_0/scale are not"),
    (SubclassMLP(), "ReluDense_0/bias, ReluDense_0/kernel are not"),
    (OffsetMLP(), "the output of Dense_1 does not"),
  ],
  ids=["batch_norm", "layer_norm", "dense_subclass", "no_batch_axis"],
)
def test_unsupported_model_is_named(model, message):
  params, batch_stats, loss_fn, _, _ = _problem(model)
  calls, reason = layerwise.find_layer_calls(loss_fn, params, batch_stats)
  assert calls is None
  assert message in reason


def _step_outcome(model, alignment, reference="momentum"):
  keys = jax.random.split(jax.random.key(0), 5)
  data = steps.DeviceData(
    train_images=jax.random.normal(keys[0], (16, 8, 8, 1)),
    train_labels=jax.random.randint(keys[1], (16,), 0, 3),
    reference_images=jax.random.normal(keys[2], (8, 8, 8, 1)),
    reference_labels=jax.random.randint(keys[3], (8,), 0, 3),
  )
  variables = model.init(keys[4], data.train_images[:1], train=False)
  tx = optim.ddlr(
    optax.sgd(0.2, momentum=0.9), num_instances=16, learning_rate=0.2, hyper_learning_rate=0.5
  )
  state = steps.TrainState(
      step=jnp.zeros([], jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
      rng=jax.random.key(1),
  )  # fmt: skip
  settings = steps.StepSettings(reference=reference, reference_batch_size=4, alignment=alignment)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
  for index in range(2):  # the second step has a non-zero momentum buffer
    state, _ = step(state, data, jnp.arange(6) + index)
  return state


def test_layerwise_path_on_batch_norm_raises():
  model = SmallCNN(num_classes=3, width=2, hidden=8, batch_norm=True)
  with pytest.raises(ValueError, match="BatchNorm, which couples the batch"):
    _step_outcome(model, "layerwise")


def test_auto_batch_norm_uses_jvp():
  model = SmallCNN(num_classes=3, width=2, hidden=8, batch_norm=True)
  auto, jvp = _step_outcome(model, "auto"), _step_outcome(model, "jvp")
  assert float(jnp.max(jnp.abs(jvp.opt_state.log_lr))) > 0.0
  np.testing.assert_array_equal(auto.opt_state.log_lr, jvp.opt_state.log_lr)


def test_kernel_read_outside_call_is_caught():
  params, batch_stats, loss_fn, _, _ = _problem(ReadKernelMLP())
  calls, reason = layerwise.find_layer_calls(loss_fn, params, batch_stats)
  assert reason is None  # the layer check passes, so the numerical check must catch it
  assert "differs from the jvp alignment" in layerwise.check_agreement(loss_fn, params, calls)
  assert layerwise.choose_alignment("auto", True, loss_fn, params, batch_stats)[0] == "jvp"
  assert layerwise.choose_alignment("layerwise", True, loss_fn, params, batch_stats)[0] is None


def test_lifted_layer_falls_back_to_jvp():
  params, batch_stats, loss_fn, _, _ = _problem(KeywordRematMLP())
  path, reason = layerwise.choose_alignment("auto", True, loss_fn, params, batch_stats)
  assert path == "jvp"
  assert "failed on this model" in reason


def test_supported_model_chooses_layerwise_twice():
  # eval_shape caches traces by function; a second check must still see the layers.
  params, batch_stats, loss_fn, _, _ = _problem(TiedMLP())
  for _ in range(2):
    assert layerwise.choose_alignment("auto", True, loss_fn, params, batch_stats) == (
      "layerwise",
      None,
    )
  assert layerwise.choose_alignment("auto", False, loss_fn, params, batch_stats)[0] == "jvp"


def test_zero_cotangent_gives_zero_alignment():
  params, batch_stats, loss_fn, tangents, cotangent = _problem(TiedMLP())
  cotangent = cotangent.at[0].set(0.0).at[1].set(1e-35)
  calls, _ = layerwise.find_layer_calls(loss_fn, params, batch_stats)
  lin = layerwise.linearize_layerwise(loss_fn, params, calls)
  _, scored = alignment_lib.weighted_gradient(lin, cotangent)
  got = alignment_lib.compute_alignment(scored, tangents, method="layerwise")
  expected = alignment_lib.compute_alignment(
    alignment_lib.linearize_losses(loss_fn, params), tangents, method="vmap"
  )
  np.testing.assert_array_equal(got[:, :2], 0.0)
  np.testing.assert_allclose(got[:, 2:], expected[:, 2:], rtol=1e-4, atol=1e-5)
