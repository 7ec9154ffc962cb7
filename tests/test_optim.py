"""Tests of the ddlr optax transformation against autodiff and a NumPy reference."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddlr import alignment as alignment_lib
from ddlr import optim, optimizer_state, reporting

NUM_INSTANCES = 10
NUM_FEATURES = 5
NUM_CLASSES = 3


def _problem(seed=0, batch_size=4):
  """A small softmax regression: params, training data and a reference batch."""
  keys = jax.random.split(jax.random.key(seed), 6)
  params = {
    "w": 0.5 * jax.random.normal(keys[0], (NUM_FEATURES, NUM_CLASSES)),
    "b": 0.1 * jax.random.normal(keys[1], (NUM_CLASSES,)),
  }
  inputs = jax.random.normal(keys[2], (NUM_INSTANCES, NUM_FEATURES))
  labels = jax.random.randint(keys[3], (NUM_INSTANCES,), 0, NUM_CLASSES)
  reference_inputs = jax.random.normal(keys[4], (8, NUM_FEATURES))
  reference_labels = jax.random.randint(keys[5], (8,), 0, NUM_CLASSES)
  ids = jnp.array([7, 2, 9, 4][:batch_size])
  return params, inputs, labels, reference_inputs, reference_labels, ids


def _losses(params, inputs, labels):
  logits = inputs @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _exact_hypergradient(log_lr, ids, params, inputs, labels, reference, eta, normalize):
  """jax.grad of a -> L_ref(theta'(a)) through one SGD step with rates exp(a[ids])."""
  reference_inputs, reference_labels = reference

  def reference_loss_after_step(table):
    rates = jnp.exp(table[ids])
    if normalize:
      rates = rates / jnp.mean(rates)
    grads = jax.grad(lambda p: jnp.mean(rates * _losses(p, inputs[ids], labels[ids])))(params)
    params_after = jax.tree.map(lambda p, g: p - eta * g, params, grads)
    return jnp.mean(_losses(params_after, reference_inputs, reference_labels))

  return jax.grad(reference_loss_after_step)(log_lr)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("target", ["reference", "lookahead"])
def test_hypergradient_matches_autodiff_through_sgd_step(normalize, target):
  params, inputs, labels, reference_inputs, reference_labels, ids = _problem()
  eta = 0.3
  tx = optim.ddlr(
      optax.sgd(eta), num_instances=NUM_INSTANCES, learning_rate=eta, hyper_learning_rate=1.0,
      log_lr_min=-100.0, log_lr_max=100.0, normalize=normalize,
  )  # fmt: skip
  state = tx.init(params)
  log_lr = 0.4 * jax.random.normal(jax.random.key(3), (NUM_INSTANCES,))
  state = state._replace(log_lr=log_lr)
  if target == "lookahead":
    reference = (inputs[ids], labels[ids])
  else:
    reference = (reference_inputs, reference_labels)

  rates = optim.instance_rates(state, ids, normalize=normalize)
  lin = alignment_lib.linearize_losses(
    lambda p: (_losses(p, inputs[ids], labels[ids]), None), params
  )
  grads = lin.vjp(rates / len(ids))
  params_after = jax.tree.map(lambda p, g: p - eta * g, params, grads)
  reference_grad = jax.grad(lambda p: jnp.mean(_losses(p, *reference)))(params_after)
  tangent = alignment_lib.stack_tangents(reference_grad)
  alignment = alignment_lib.compute_alignment(lin, tangent, method="jvp")[0]
  _, new_state = tx.update(grads, state, params, ids=ids, alignment=alignment)

  computed = log_lr - new_state.log_lr  # beta = 1: the step is the hypergradient
  expected = _exact_hypergradient(log_lr, ids, params, inputs, labels, reference, eta, normalize)
  relative_error = jnp.linalg.norm(computed - expected) / jnp.linalg.norm(expected)
  assert float(jnp.linalg.norm(expected)) > 1e-4
  assert float(relative_error) < 1e-4


def test_ids_outside_batch_keep_rate_and_momentum():
  tx = optim.ddlr(
      optax.sgd(0.1), num_instances=6, learning_rate=0.1, hyper_learning_rate=0.5,
      hyper_momentum=0.9,
  )  # fmt: skip
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  state = state._replace(
    log_lr=jnp.arange(6, dtype=jnp.float32) * 0.1,
    log_lr_momentum=jnp.arange(6, dtype=jnp.float32) * -0.01,
  )
  ids = jnp.array([1, 4])
  _, new_state = tx.update(
    {"w": jnp.ones(2)}, state, params, ids=ids, alignment=jnp.array([1.0, -2.0])
  )
  untouched = np.array([0, 2, 3, 5])
  np.testing.assert_array_equal(new_state.log_lr[untouched], state.log_lr[untouched])
  np.testing.assert_array_equal(
    new_state.log_lr_momentum[untouched], state.log_lr_momentum[untouched]
  )
  assert not np.any(new_state.log_lr[ids] == state.log_lr[ids])


def test_duplicate_ids_accumulate():
  tx = optim.ddlr(
      optax.sgd(1.0), num_instances=4, learning_rate=1.0, hyper_learning_rate=1.0,
      normalize=False,
  )  # fmt: skip
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  ids = jnp.array([2, 2, 0])
  alignment = jnp.array([0.3, 0.6, -0.9])
  _, new_state = tx.update({"w": jnp.zeros(1)}, state, params, ids=ids, alignment=alignment)
  # Rates are 1 and eta / B = 1/3, so h_i = -s_i / 3; id 2 sums two of them.
  np.testing.assert_allclose(new_state.log_lr, [-0.3, 0.0, 0.3, 0.0], rtol=1e-6)


def test_out_of_range_id_raises_naming_it():
  tx = optim.ddlr(optax.sgd(0.1), num_instances=5, learning_rate=0.1, hyper_learning_rate=1.0)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"instance id 5 is outside \[0, 5\)"):
    tx.update({"w": jnp.zeros(1)}, state, params, ids=jnp.array([1, 5]), alignment=jnp.ones(2))
  with pytest.raises(ValueError, match=r"instance id -1 is outside"):
    tx.update({"w": jnp.zeros(1)}, state, params, ids=jnp.array([-1, 2]), alignment=jnp.ones(2))


def test_out_of_range_id_under_jit():
  tx = optim.ddlr(optax.sgd(0.1), num_instances=5, learning_rate=0.1, hyper_learning_rate=1.0)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  alignment = jnp.array([1.0, -1.0])
  update = jax.jit(
    lambda s, ids: tx.update({"w": jnp.zeros(1)}, s, params, ids=ids, alignment=alignment)
  )
  _, new_state = update(state, jnp.array([1, 7]))
  np.testing.assert_array_equal(new_state.log_lr[jnp.array([0, 2, 3, 4])], 0.0)
  assert float(new_state.log_lr[1]) != 0.0
  with pytest.raises(ValueError, match=r"instance id 7 is outside \[0, 5\)"):
    optim.raise_if_invalid_ids(new_state)


def test_jit_keeps_shapes_and_dtypes_without_recompiling():
  params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)}
  tx = optim.ddlr(
      optax.sgd(0.1, momentum=0.9), num_instances=8, learning_rate=0.1,
      hyper_learning_rate=0.2, hyper_momentum=0.5, num_classes=2,
  )  # fmt: skip
  traces = []

  def update(grads, state, ids, labels, alignment):
    traces.append(1)
    return tx.update(grads, state, params, ids=ids, labels=labels, alignment=alignment)

  update = jax.jit(update)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for step in range(3):
    ids = jnp.array([step, step + 1, 5])
    updates, state = update(grads, state, ids, jnp.array([0, 1, 1]), jnp.array([0.1, -0.2, 0.3]))
  assert len(traces) == 1
  for key in params:
    assert updates[key].shape == params[key].shape
    assert updates[key].dtype == params[key].dtype
  assert state.log_lr.dtype == jnp.float32
  assert state.log_lr.shape == (8,)
  assert state.class_log_lr.dtype == jnp.float32
  assert state.class_log_lr.shape == (2,)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def _numpy_reference(steps, num_instances, *, beta, mu, decay, bounds, etas, normalize):
  """A NumPy loop over the update rule, one instance at a time, with duplicates summed."""
  log_lr = np.zeros(num_instances)
  momentum = np.zeros(num_instances)
  for (ids, alignment), eta in zip(steps, etas, strict=True):
    rates = np.exp(log_lr[ids])
    if normalize:
      rates = rates / rates.mean()
    centre = np.mean(rates * alignment) if normalize else 0.0
    hypergrad = -(eta / len(ids)) * rates * (alignment - centre)
    for k in np.unique(ids):
      direction = hypergrad[ids == k].sum() + decay * log_lr[k]
      if mu > 0:
        direction = mu * momentum[k] + direction
        momentum[k] = direction
      log_lr[k] = np.clip(log_lr[k] - beta * direction, *bounds)
  return log_lr, momentum


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_numpy_reference_over_ten_steps(normalize):
  num_instances, eta0 = 12, 0.5
  schedule = optax.linear_schedule(eta0, 0.1, 10)
  settings = dict(beta=3.0, mu=0.8, decay=0.05, bounds=(-0.4, 0.3))
  tx = optim.ddlr(
      optax.sgd(schedule), num_instances=num_instances, learning_rate=schedule,
      hyper_learning_rate=settings["beta"], hyper_momentum=settings["mu"],
      log_lr_decay=settings["decay"], log_lr_min=-0.4, log_lr_max=0.3, normalize=normalize,
  )  # fmt: skip
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  rng = np.random.default_rng(0)
  steps = [
    (rng.integers(0, num_instances, size=6), rng.normal(size=6).astype(np.float32))
    for _ in range(10)
  ]
  update = jax.jit(
    lambda s, ids, a: tx.update({"w": jnp.zeros(2)}, s, params, ids=ids, alignment=a)
  )
  for ids, alignment in steps:
    _, state = update(state, jnp.asarray(ids), jnp.asarray(alignment))
  etas = [float(schedule(i)) for i in range(10)]
  expected_log_lr, expected_momentum = _numpy_reference(
    steps, num_instances, etas=etas, normalize=normalize, **settings
  )
  assert np.any(expected_log_lr == 0.3) or np.any(expected_log_lr == -0.4)  # clipping exercised
  np.testing.assert_allclose(state.log_lr, expected_log_lr, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.log_lr_momentum, expected_momentum, rtol=1e-5, atol=1e-6)


def test_class_rates_sum_their_instances():
  tx = optim.ddlr(
      optax.sgd(1.0), num_instances=4, learning_rate=1.0, hyper_learning_rate=1.0,
      instance_rates=False, num_classes=3, normalize=False,
  )  # fmt: skip
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  labels = jnp.array([0, 2, 0, 2])
  alignment = jnp.array([0.4, -0.8, 0.4, 0.2])
  _, new_state = tx.update(
    {"w": jnp.zeros(1)}, state, params, ids=jnp.arange(4), labels=labels, alignment=alignment
  )
  # h_i = -s_i / 4; class 1 is absent and keeps its rate.
  np.testing.assert_allclose(new_state.class_log_lr, [0.2, 0.0, -0.15], rtol=1e-6)
  assert new_state.log_lr is None


def test_adam_preconditioner_matches_formula():
  params = {"w": jnp.array([1.0, -2.0])}
  base = optax.adam(0.1, b2=0.99, eps=1e-3)
  tx = optim.ddlr(base, num_instances=2, learning_rate=0.1, hyper_learning_rate=0.1)
  state = tx.init(params)
  np.testing.assert_array_equal(
    optimizer_state.adam_preconditioner(state, b2=0.99, eps=1e-3)["w"], 1.0
  )
  grads = {"w": jnp.array([0.5, 3.0])}
  _, state = tx.update(grads, state, params, ids=jnp.array([0]), alignment=jnp.ones(1))
  expected = 1.0 / (np.abs([0.5, 3.0]) + 1e-3)  # nu_hat = g^2 after one step
  np.testing.assert_allclose(
    optimizer_state.adam_preconditioner(state, b2=0.99, eps=1e-3)["w"], expected, rtol=1e-5
  )


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"num_instances": 0}, "num_instances must be a positive integer, got 0"),
    ({"hyper_learning_rate": -1.0}, "hyper_learning_rate must be a finite number >= 0.0, got -1.0"),
    ({"hyper_momentum": 1.0}, r"hyper_momentum must be in \[0, 1\), got 1.0"),
    ({"log_lr_min": 1.0, "log_lr_max": 0.0}, "log_lr_min must be below log_lr_max"),
    ({"hypergradient_scale": "l2"}, "hypergradient_scale must be one of"),
    ({"instance_rates": False}, "ddlr needs instance_rates=True or num_classes"),
    ({"learning_rate": -0.1}, "learning_rate must be a finite number >= 0.0, got -0.1"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number >= 0.0, got nan"),
    ({"learning_rate": "0.1"}, "learning_rate must be a finite number >= 0.0, got '0.1'"),
    ({"log_lr_max": float("inf")}, "log_lr_max must be a finite number, got inf"),
    ({"normalize": "yes"}, "normalize must be True or False, got 'yes'"),
    ({"class_hyper_learning_rate": 0.01}, "class_hyper_learning_rate=0.01 is set but num_classes"),
    ({"num_instances": 2**31}, "num_instances=2147483648 exceeds the int32 maximum"),
  ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
  arguments = {"num_instances": 3, "learning_rate": 0.1, "hyper_learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=message):
    optim.ddlr(optax.sgd(0.1), **arguments)


def test_composes_with_chain_and_inject_hyperparams():
  params = {"w": jnp.ones(3)}
  inner = optim.ddlr(optax.sgd(0.1), num_instances=4, learning_rate=0.1, hyper_learning_rate=0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
  state = tx.init(params)
  rates = optim.instance_rates(state, jnp.array([0, 1]), normalize=True)
  np.testing.assert_allclose(rates, [1.0, 1.0])
  updates, state = tx.update(
    {"w": jnp.ones(3)}, state, params, ids=jnp.array([0, 1]), alignment=jnp.array([1.0, -1.0])
  )
  assert optim.find_ddlr_state(state).log_lr[0] > 0 > optim.find_ddlr_state(state).log_lr[1]

  injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
  tx = optim.ddlr(injected, num_instances=4, learning_rate=0.1, hyper_learning_rate=0.1)
  state = tx.init(params)
  assert optimizer_state.momentum_buffer(state)["w"].shape == (3,)


def test_accumulation_updates_every_micro_batch():
  params = {"w": jnp.zeros(2)}
  tx = optim.ddlr(
      optax.sgd(0.5), num_instances=6, learning_rate=lambda count: 0.1 * (count + 1),
      hyper_learning_rate=1.0, accumulation_steps=2,
  )  # fmt: skip
  state = tx.init(params)
  alignment = jnp.array([1.0, -1.0])
  first = {"w": jnp.array([1.0, 0.0])}
  second = {"w": jnp.array([0.0, 3.0])}
  updates, state = tx.update(first, state, params, ids=jnp.array([0, 1]), alignment=alignment)
  np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
  updates, state = tx.update(second, state, params, ids=jnp.array([2, 3]), alignment=alignment)
  # One SGD step on the mean of the two micro-batch gradients.
  np.testing.assert_allclose(updates["w"], [-0.25, -0.75], rtol=1e-6)
  # h = -(eta / (B K)) (s - mean(s)) with eta at base step 0: 0.1 / 4 = 0.025.
  np.testing.assert_allclose(
    optim.find_ddlr_state(state).log_lr, [0.025, -0.025, 0.025, -0.025, 0.0, 0.0], rtol=1e-6
  )
  _, state = tx.update(first, state, params, ids=jnp.array([4, 5]), alignment=alignment)
  # The third call is in base step 1, where eta is 0.2.
  np.testing.assert_allclose(optim.find_ddlr_state(state).log_lr[4:], [0.05, -0.05], rtol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_accumulated_hypergradient_matches_autodiff(normalize):
  params, inputs, labels, reference_inputs, reference_labels, _ = _problem()
  eta = 0.3
  micro_batches = [jnp.array([7, 2, 9]), jnp.array([4, 0, 5])]
  tx = optim.ddlr(
      optax.sgd(eta), num_instances=NUM_INSTANCES, learning_rate=eta, hyper_learning_rate=1.0,
      log_lr_min=-100.0, log_lr_max=100.0, normalize=normalize, accumulation_steps=2,
  )  # fmt: skip

  def weighted_gradient(p, table, ids):
    rates = jnp.exp(table[ids])
    if normalize:
      rates = rates / jnp.mean(rates)
    return jax.grad(lambda q: jnp.mean(rates * _losses(q, inputs[ids], labels[ids])))(p)

  def reference_loss_after_step(table):
    grads = [weighted_gradient(params, table, ids) for ids in micro_batches]
    params_after = jax.tree.map(lambda p, a, b: p - eta * (a + b) / 2, params, *grads)
    return jnp.mean(_losses(params_after, reference_inputs, reference_labels))

  table = jnp.zeros(NUM_INSTANCES)
  exact = jax.grad(reference_loss_after_step)(table)
  grads = [weighted_gradient(params, table, ids) for ids in micro_batches]
  params_after = jax.tree.map(lambda p, a, b: p - eta * (a + b) / 2, params, *grads)
  direction = jax.grad(lambda p: jnp.mean(_losses(p, reference_inputs, reference_labels)))(
    params_after
  )
  state = tx.init(params)
  for ids, grad in zip(micro_batches, grads, strict=True):
    lin = alignment_lib.linearize_losses(
      lambda p, ids=ids: (_losses(p, inputs[ids], labels[ids]), None), params
    )
    alignment = lin.jvp(direction)
    _, state = tx.update(grad, state, params, ids=ids, alignment=alignment)
  # With hyper learning rate 1 the log rates moved by minus the hypergradient.
  np.testing.assert_allclose(optim.find_ddlr_state(state).log_lr, -exact, rtol=1e-4, atol=1e-7)


def test_inject_hyperparams_schedules_ddlr_arguments():
  params = {"w": jnp.ones(3)}
  arguments = {
    "base": optax.sgd(0.1),
    "num_instances": 4,
    "learning_rate": 0.1,
    "hyper_learning_rate": 1.0,
    "hyper_momentum": 0.5,
  }
  static_args = ("num_instances", "hyper_momentum")
  injected = optax.inject_hyperparams(optim.ddlr, static_args=static_args)(**arguments)
  plain = optim.ddlr(**arguments)
  batch = {"ids": jnp.array([0, 1]), "alignment": jnp.array([1.0, -1.0])}
  grads = {"w": jnp.ones(3)}

  @jax.jit
  def update(state):
    return injected.update(grads, state, params, **batch)[1]

  # Two steps, so that the second one moves along the hyper momentum too.
  state = update(update(jax.jit(injected.init)(params)))
  expected = plain.init(params)
  for _ in range(2):
    _, expected = plain.update(grads, expected, params, **batch)
  np.testing.assert_allclose(optim.find_ddlr_state(state).log_lr, expected.log_lr, rtol=1e-6)
  # Each step without momentum adds 0.05 to a_0; the momentum makes the second step 0.075.
  np.testing.assert_allclose(expected.log_lr[0], 0.125, rtol=1e-3)
  state.hyperparams["hyper_learning_rate"] = jnp.zeros([])
  frozen = update(state)
  np.testing.assert_array_equal(
    optim.find_ddlr_state(frozen).log_lr, optim.find_ddlr_state(state).log_lr
  )


def test_jitted_inject_init_needs_static_momentum():
  factory = optax.inject_hyperparams(optim.ddlr, static_args=("num_instances",))
  tx = factory(base=optax.sgd(0.1), num_instances=4, learning_rate=0.1, hyper_learning_rate=0.1)
  with pytest.raises(ValueError, match=r"hyper_momentum .* list it in static_args"):
    jax.jit(tx.init)({"w": jnp.ones(3)})


def test_inject_hyperparams_needs_static_sizes():
  factory = optax.inject_hyperparams(optim.ddlr)
  tx = factory(base=optax.sgd(0.1), num_instances=4, learning_rate=0.1, hyper_learning_rate=0.1)
  with pytest.raises(ValueError, match=r"num_instances must be a positive integer, got Array"):
    tx.init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"list it in static_args"):
    tx.init({"w": jnp.ones(3)})


def test_out_of_range_label_raises_or_gives_nan():
  tx = optim.ddlr(
    optax.sgd(0.1), num_instances=4, learning_rate=0.1, hyper_learning_rate=1.0, num_classes=3
  )
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  grads = {"w": jnp.ones(2)}
  ids, alignment = jnp.array([0, 1]), jnp.array([1.0, -1.0])
  for labels, bad in (([0, 3], 3), ([0, -1], -1)):
    with pytest.raises(ValueError, match=rf"label {bad} is outside \[0, 3\)"):
      tx.update(grads, state, params, ids=ids, alignment=alignment, labels=jnp.array(labels))

  rates = jax.jit(lambda labels: optim.instance_rates(state, ids, labels, normalize=False))(
    jnp.array([0, 3])
  )
  assert np.isfinite(rates[0])
  assert np.isnan(rates[1])
  for normalize in (False, True):
    tx = optim.ddlr(
        optax.sgd(0.1), num_instances=4, learning_rate=0.1, hyper_learning_rate=1.0,
        num_classes=3, normalize=normalize,
    )  # fmt: skip
    new_state = jax.jit(
      lambda labels, tx=tx: tx.update(
        grads, state, params, ids=ids, alignment=alignment, labels=labels
      )[1]
    )(jnp.array([0, 3]))
    # Neither table takes a step, so no NaN and no clamped class's update gets in.
    np.testing.assert_array_equal(new_state.log_lr, state.log_lr)
    np.testing.assert_array_equal(new_state.class_log_lr, state.class_log_lr)


def test_64_bit_id_is_not_wrapped():
  tx = optim.ddlr(optax.sgd(0.1), num_instances=4, learning_rate=0.1, hyper_learning_rate=1.0)
  params = {"w": jnp.ones(2)}
  ids = np.array([2**32 + 1], np.int64)
  with pytest.raises(ValueError, match=r"instance id 4294967297 is outside \[0, 4\)"):
    tx.update({"w": jnp.ones(2)}, tx.init(params), params, ids=ids, alignment=np.ones(1))


@pytest.mark.parametrize("batch_size", [3, 5, 6, 7])
@pytest.mark.parametrize("init_log_lr", [0.0, 0.37, 1.1])
def test_rms_scale_takes_no_step_on_equal_alignments(batch_size, init_log_lr):
  tx = optim.ddlr(
      optax.sgd(0.1), num_instances=8, learning_rate=0.1, hyper_learning_rate=0.3,
      init_log_lr=init_log_lr, hypergradient_scale="rms",
  )  # fmt: skip
  params = {"w": jnp.ones(2)}
  ids = jnp.arange(batch_size)
  # The exact centred hypergradient is zero; float32 rounding leaves about 1e-8.
  alignment = jnp.full([batch_size], 0.731)
  _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params, ids=ids, alignment=alignment)
  np.testing.assert_allclose(state.log_lr[:batch_size], init_log_lr, atol=1e-3 * 0.3)


def test_rms_scale_steps_beta_per_visit():
  tx = optim.ddlr(
      optax.sgd(0.1), num_instances=4, learning_rate=0.1, hyper_learning_rate=0.3,
      hypergradient_scale="rms", normalize=False,
  )  # fmt: skip
  params = {"w": jnp.ones(2)}
  alignment = jnp.array([1.0, -2.0, 3.0, 0.5])
  _, state = tx.update(
    {"w": jnp.ones(2)}, tx.init(params), params, ids=jnp.arange(4), alignment=alignment
  )
  expected = 0.3 * alignment / np.sqrt(np.mean(np.square(alignment)))
  np.testing.assert_allclose(state.log_lr, expected, rtol=1e-6)


@pytest.mark.parametrize("instance_rates", [True, False])
def test_logged_rate_quantiles_include_class_rates(instance_rates):
  tx = optim.ddlr(
      optax.sgd(0.1), num_instances=5, learning_rate=0.1, hyper_learning_rate=1.0,
      instance_rates=instance_rates, num_classes=2, init_log_lr=0.5,
  )  # fmt: skip
  state = tx.init({"w": jnp.ones(2)})
  state = state._replace(class_log_lr=jnp.array([-1.0, 1.0]))
  labels = np.array([0, 0, 1, 1, 1])
  exponent = np.array([-1.0, -1.0, 1.0, 1.0, 1.0]) + (0.5 if instance_rates else 0.0)
  stats = reporting.table_rate_stats(state, labels)
  np.testing.assert_allclose(stats["ddlr/rate_min"], np.exp(exponent.min()), rtol=1e-6)
  np.testing.assert_allclose(stats["ddlr/rate_median"], np.exp(np.median(exponent)), rtol=1e-6)
  np.testing.assert_allclose(stats["ddlr/rate_max"], np.exp(exponent.max()), rtol=1e-6)


def _small_transformation(**kwargs):
  arguments = {"num_instances": 4, "learning_rate": 0.1, "hyper_learning_rate": 1.0, **kwargs}
  return optim.ddlr(optax.sgd(0.1), **arguments)


def test_non_finite_alignment_raises_or_gives_nan():
  tx = _small_transformation()
  params, grads = {"w": jnp.ones(2)}, {"w": jnp.ones(2)}
  state = tx.init(params)
  ids = jnp.array([0, 1, 2])
  for bad in (np.nan, np.inf):
    with pytest.raises(ValueError, match=rf"alignment\[1\] is {bad}; every alignment must"):
      tx.update(grads, state, params, ids=ids, alignment=jnp.array([1.0, bad, 2.0]))

  new_state = jax.jit(
    lambda alignment: tx.update(grads, state, params, ids=ids, alignment=alignment)
  )(jnp.array([1.0, np.nan, 2.0]))[1]
  # The centring term mixes the batch, so every rate of the batch is NaN; others are kept.
  assert np.all(np.isnan(new_state.log_lr[:3]))
  assert new_state.log_lr[3] == state.log_lr[3]


def test_empty_batch_raises():
  tx = _small_transformation()
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="ids is empty; a batch needs at least one example"):
    tx.update(
      {"w": jnp.ones(2)}, tx.init(params), params, ids=jnp.zeros([0], jnp.int32),
      alignment=jnp.zeros([0]),
    )  # fmt: skip


def test_state_of_other_size_raises():
  params = {"w": jnp.ones(2)}
  state = _small_transformation(num_instances=8).init(params)
  tx = _small_transformation(num_instances=16)
  with pytest.raises(ValueError, match=r"instance table has 8 rates, .* num_instances=16"):
    tx.update({"w": jnp.ones(2)}, state, params, ids=jnp.array([0, 10]), alignment=jnp.ones(2))

  state = _small_transformation(num_classes=3).init(params)
  tx = _small_transformation(num_classes=5)
  with pytest.raises(ValueError, match=r"class table has 3 rates, .* num_classes=5"):
    tx.update(
      {"w": jnp.ones(2)}, state, params, ids=jnp.array([0, 1]), alignment=jnp.ones(2),
      labels=jnp.array([0, 4]),
    )  # fmt: skip


def test_raised_injected_momentum_raises():
  factory = optax.inject_hyperparams(optim.ddlr, static_args=("num_instances",))
  tx = factory(
    base=optax.sgd(0.1), num_instances=4, learning_rate=0.1, hyper_learning_rate=1.0,
    hyper_momentum=0.0,
  )  # fmt: skip
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  state.hyperparams["hyper_momentum"] = jnp.asarray(0.9)
  with pytest.raises(ValueError, match=r"hyper_momentum was 0 when init ran"):
    tx.update({"w": jnp.ones(2)}, state, params, ids=jnp.array([0, 1]), alignment=jnp.ones(2))


@pytest.mark.parametrize("labels", [[0.0, 1.0], [True, False], [[0], [1]]])
def test_labels_must_be_integer_batch(labels):
  tx = _small_transformation(num_classes=3)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"labels must be an integer array of the shape of ids"):
    tx.update(
      {"w": jnp.ones(2)}, tx.init(params), params, ids=jnp.array([0, 1]), alignment=jnp.ones(2),
      labels=jnp.array(labels),
    )  # fmt: skip


def test_list_arguments_match_arrays():
  tx = _small_transformation(num_classes=3)
  params, grads = {"w": jnp.ones(2)}, {"w": jnp.ones(2)}
  state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    from_lists = tx.update(grads, state, params, ids=[0, 1], alignment=[1.0, -1.0], labels=[0, 2])
  from_arrays = tx.update(
    grads, state, params, ids=jnp.array([0, 1]), alignment=jnp.array([1.0, -1.0]),
    labels=jnp.array([0, 2]),
  )  # fmt: skip
  for a, b in zip(jax.tree.leaves(from_lists), jax.tree.leaves(from_arrays), strict=True):
    np.testing.assert_array_equal(a, b)


def test_numpy_integer_accumulation_steps():
  tx = _small_transformation(accumulation_steps=np.int64(2))
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(
      {"w": jnp.ones(2)}, state, params, ids=jnp.array([0, 1]), alignment=jnp.ones(2)
    )
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1])
