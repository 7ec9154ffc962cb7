"""Tests of the jitted train step: its hypergradient, references and recompilation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from ddlr import losses, optim, references, steps
from ddlr.models import SmallCNN

NUM_INSTANCES, NUM_REFERENCE, BATCH_SIZE, ETA = 16, 8, 6, 0.2
# Batches of the split tests: an even one of BATCH_SIZE and an odd one.
SPLIT_IDS = jnp.array([3, 11, 0, 7, 14, 5])
ODD_IDS = jnp.array([3, 11, 0, 7, 14, 5, 9])


@functools.cache
def _setup():
  model = SmallCNN(num_classes=3, width=2, hidden=8)
  keys = jax.random.split(jax.random.key(0), 5)
  data = steps.DeviceData(
    train_images=jax.random.normal(keys[0], (NUM_INSTANCES, 8, 8, 1)),
    train_labels=jax.random.randint(keys[1], (NUM_INSTANCES,), 0, 3),
    reference_images=jax.random.normal(keys[2], (NUM_REFERENCE, 8, 8, 1)),
    reference_labels=jax.random.randint(keys[3], (NUM_REFERENCE,), 0, 3),
  )
  params = jax.jit(lambda k: model.init(k, data.train_images[:1], train=False))(keys[4])["params"]
  return model, data, params


def _state(model, params, reference, normalize=True):
  tx = optim.ddlr(
      optax.sgd(ETA), num_instances=NUM_INSTANCES, learning_rate=ETA, hyper_learning_rate=1.0,
      log_lr_min=-50.0, log_lr_max=50.0, normalize=normalize,
  )  # fmt: skip
  opt_state = tx.init(params)
  opt_state = opt_state._replace(
    log_lr=0.3 * jax.random.normal(jax.random.key(7), (NUM_INSTANCES,))
  )
  state = steps.TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats={}, opt_state=opt_state,
      rng=jax.random.key(1),
  )  # fmt: skip
  settings = steps.StepSettings(
    reference=reference, reference_batch_size=NUM_REFERENCE, normalize=normalize
  )
  return tx, state, settings


def _mean_loss(model, params, images, labels):
  logits = model.apply({"params": params}, images, train=True)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@pytest.mark.parametrize("reference", ["lookahead", "reference"])
def test_train_step_hypergradient_matches_autodiff(reference):
  model, data, params = _setup()
  tx, state, settings = _state(model, params, reference)
  ids = jnp.array([3, 11, 0, 7, 14, 5])
  log_lr = state.opt_state.log_lr
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
  new_state, _ = step(state, data, ids)

  if reference == "lookahead":
    target = (data.train_images[ids], data.train_labels[ids])
  else:
    # The reference batch is the whole split, drawn without replacement, and
    # the mean loss does not depend on its order.
    target = (data.reference_images, data.reference_labels)

  def reference_loss_after_step(table):
    rates = jnp.exp(table[ids])
    rates = rates / jnp.mean(rates)

    def weighted_loss(p):
      logits = model.apply({"params": p}, data.train_images[ids], train=True)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, data.train_labels[ids])
      return jnp.mean(rates * losses)

    grads = jax.grad(weighted_loss)(params)
    after = jax.tree.map(lambda p, g: p - ETA * g, params, grads)
    return _mean_loss(model, after, *target)

  expected = jax.jit(jax.grad(reference_loss_after_step))(log_lr)
  computed = log_lr - new_state.opt_state.log_lr
  relative_error = float(jnp.linalg.norm(computed - expected) / jnp.linalg.norm(expected))
  assert float(jnp.linalg.norm(expected)) > 1e-5
  assert relative_error < 1e-4


def test_split_reference_scores_against_other_half():
  model, data, params = _setup()
  tx, state, settings = _state(model, params, "split", normalize=False)
  ids = jnp.array([3, 11, 0, 7, 14, 5])
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
  new_state, _ = step(state, data, ids)

  rates = jnp.exp(state.opt_state.log_lr[ids])
  per_example = jax.jit(
    jax.jacrev(
      lambda p: jax.vmap(lambda x, y: _mean_loss(model, p, x[None], y[None]))(
        data.train_images[ids], data.train_labels[ids]
      )
    )
  )(params)
  flat = jnp.concatenate([g.reshape(BATCH_SIZE, -1) for g in jax.tree.leaves(per_example)], 1)
  weighted = rates[:, None] * flat
  first, second = weighted[:3].mean(0), weighted[3:].mean(0)
  alignment = jnp.concatenate([flat[:3] @ second, flat[3:] @ first])
  expected_step = (ETA / BATCH_SIZE) * rates * alignment  # -h with normalize off
  computed_step = new_state.opt_state.log_lr[ids] - state.opt_state.log_lr[ids]
  np.testing.assert_allclose(computed_step, expected_step, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
  "reference", ["batch", "split", "momentum", "reference", "small_loss", "small_loss_split"]
)
def test_train_step_compiles_once_and_stays_finite(reference):
  model, data, params = _setup()
  params = jax.tree.map(jnp.copy, params)  # the step donates its state
  tx = optim.ddlr(
      optax.sgd(ETA, momentum=0.9), num_instances=NUM_INSTANCES, learning_rate=ETA,
      hyper_learning_rate=0.5, hypergradient_scale="rms",
  )  # fmt: skip
  state = steps.TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
      opt_state=tx.init(params), rng=jax.random.key(1),
  )  # fmt: skip
  settings = steps.StepSettings(reference=reference, reference_batch_size=4)
  traces = []

  def counted_step(state, data, ids):
    traces.append(1)
    return steps.train_step(state, data, ids, model=model, tx=tx, settings=settings)

  step = jax.jit(counted_step, donate_argnums=0)
  for index in range(3):
    state, metrics = step(state, data, jnp.arange(BATCH_SIZE) + index)
  assert len(traces) == 1
  assert int(state.step) == 3
  assert all(bool(jnp.isfinite(value)) for value in metrics.values())
  table = state.opt_state.log_lr
  assert bool(jnp.all(jnp.isfinite(table)))
  if reference != "momentum":  # the momentum buffer is zero at the first step
    assert float(jnp.max(jnp.abs(table[: BATCH_SIZE + 2]))) > 0.0
  np.testing.assert_array_equal(table[BATCH_SIZE + 2 :], 0.0)


def _momentum_state(params):
  """Returns a ddlr optimizer over SGD with momentum and a fresh train state for `params`."""
  tx = optim.ddlr(
    optax.sgd(ETA, momentum=0.9), num_instances=NUM_INSTANCES, learning_rate=ETA,
    hyper_learning_rate=0.5,
  )  # fmt: skip
  state = steps.TrainState(
    step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
    opt_state=tx.init(params), rng=jax.random.key(1),
  )  # fmt: skip
  return tx, state


FAST_AND_DIRECT_PATHS = {
  "linearized jvp": dict(alignment="jvp", linearize=True),
  "direct jvp": dict(alignment="jvp", linearize=False),
  "layerwise": dict(alignment="layerwise"),
}


@pytest.mark.parametrize("reference", ["momentum", "split", "reference"])
def test_fast_and_direct_paths_agree(reference):
  model, data, params = _setup()
  tx, state = _momentum_state(params)
  outcomes = {}
  for name, path in FAST_AND_DIRECT_PATHS.items():
    settings = steps.StepSettings(reference=reference, reference_batch_size=4, **path)
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
    current = state
    for index in range(2):  # the second step has a non-zero momentum buffer
      current, metrics = step(current, data, jnp.arange(BATCH_SIZE) + index)
    outcomes[name] = (current, metrics)
  direct, direct_metrics = outcomes["direct jvp"]
  assert float(jnp.max(jnp.abs(direct.opt_state.log_lr))) > 0.0
  for name in ("linearized jvp", "layerwise"):
    fast, fast_metrics = outcomes[name]
    np.testing.assert_allclose(
      fast_metrics["ddlr/alignment_mean"], direct_metrics["ddlr/alignment_mean"], rtol=1e-5
    )
    np.testing.assert_allclose(fast.opt_state.log_lr, direct.opt_state.log_lr, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(direct.params), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_update_ordered_after_alignment_keeps_bits():
  # Signed zeros and a NaN, next to ordinary values.
  large = jnp.arange(60.0).reshape(6, 10).at[0, :3].set(jnp.array([-0.0, 0.0, jnp.nan]))
  grads = {"large": large, "small": jnp.ones([2])}
  alignments = [jnp.array([0.5, -2.0]), jnp.array([2.0, 1.0]), jnp.array([jnp.nan, 1.0])]
  for alignment in alignments:
    ordered = jax.jit(steps._after_alignment)(grads, alignment)
    # A NaN alignment must not reach the gradient through the added zero.
    np.testing.assert_array_equal(
      np.asarray(ordered["large"]).view(np.int32), np.asarray(large).view(np.int32)
    )
    # Leaves under the share are passed through, with no dependency added.
    np.testing.assert_array_equal(ordered["small"], grads["small"])
  jaxpr = jax.make_jaxpr(steps._after_alignment)(grads, jnp.ones([2])).jaxpr
  large_in, small_in, _ = jaxpr.invars
  large_out, small_out = jaxpr.outvars
  assert small_out is small_in
  assert large_out is not large_in


def test_cached_reference_paths_agree():
  # The `jvp` path scores the batch against a cached direction in its forward
  # pass (alignment.linearize_with_alignment); the others score it afterwards.
  model, data, params = _setup()
  tx, state = _momentum_state(params)
  outcomes = {}
  for name, path in FAST_AND_DIRECT_PATHS.items():
    settings = steps.StepSettings(
      reference="reference", reference_batch_size=4, reference_every_steps=2, **path
    )
    current = references.refresh_reference_direction(
      state.replace(reference_direction=None), data, model=model, settings=settings
    )
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
    for index in range(2):
      current, _ = step(current, data, jnp.arange(BATCH_SIZE) + index)
    outcomes[name] = current
  direct = outcomes["direct jvp"]
  assert float(jnp.max(jnp.abs(direct.opt_state.log_lr))) > 0.0
  for name in ("linearized jvp", "layerwise"):
    fast = outcomes[name]
    np.testing.assert_allclose(fast.opt_state.log_lr, direct.opt_state.log_lr, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(direct.params), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alignment", ["jvp", "layerwise"])
def test_sequential_split_keeps_bits(alignment):
  model, data, params = _setup()
  tx, state = _momentum_state(params)
  outcomes = []
  for sequential in (False, True):
    settings = steps.StepSettings(
      reference="split", alignment=alignment, split_sequential=sequential
    )
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
    current = state
    for index in range(2):
      current, _ = step(current, data, jnp.arange(BATCH_SIZE) + index)
    outcomes.append(current)
  concurrent, sequential = outcomes
  assert float(jnp.max(jnp.abs(sequential.opt_state.log_lr))) > 0.0
  np.testing.assert_array_equal(sequential.opt_state.log_lr, concurrent.opt_state.log_lr)
  for a, b in zip(
    jax.tree.leaves(sequential.params), jax.tree.leaves(concurrent.params), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_negative_zero_of_tree():
  trees = [
    {"kernel": jnp.ones([3, 2]), "bias": jnp.array([-5.0, 2.0])},
    {"kernel": jnp.array([jnp.nan, 1.0]), "bias": jnp.array([jnp.inf])},
    {"kernel": jnp.array([3e38, 3e38], jnp.float32)},  # the sum overflows to inf
    {"kernel": jnp.array([1.5, -2.0], jnp.bfloat16)},
  ]
  for tree in trees:
    zero = jax.jit(steps._negative_zero)(tree)
    assert zero.dtype == jnp.float32
    assert np.asarray(zero).view(np.int32) == np.asarray(-0.0, np.float32).view(np.int32)


@pytest.mark.parametrize(
  ("alignment", "reference", "ordered"),
  [
    ("jvp", "momentum", True),
    ("auto", "momentum", False),  # layerwise on the small CNN
    ("layerwise", "momentum", False),
    ("vmap", "momentum", False),
    ("jvp", "reference", False),
  ],
)
def test_update_ordered_only_for_jvp_momentum(monkeypatch, alignment, reference, ordered):
  model, data, params = _setup()
  tx, state = _momentum_state(params)
  calls = []

  def record(grads, alignment):
    calls.append(alignment.shape)
    return grads

  monkeypatch.setattr(steps, "_after_alignment", record)
  settings = steps.StepSettings(reference=reference, reference_batch_size=4, alignment=alignment)
  step = functools.partial(steps.train_step, model=model, tx=tx, settings=settings)
  jax.eval_shape(step, state, data, jnp.arange(BATCH_SIZE))
  assert calls == ([(BATCH_SIZE,)] if ordered else [])


def test_reused_reference_gradient_is_cached():
  model, data, params = _setup()
  tx = optim.ddlr(
    optax.sgd(ETA), num_instances=NUM_INSTANCES, learning_rate=ETA, hyper_learning_rate=0.5
  )
  settings = steps.StepSettings(
    reference="reference", reference_batch_size=4, reference_every_steps=3
  )
  state = steps.TrainState(
    step=jnp.zeros([], jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
    rng=jax.random.key(1), reference_direction=None,
  )  # fmt: skip
  rng_before = state.rng
  state = references.refresh_reference_direction(state, data, model=model, settings=settings)

  # The refresh is the reference-split gradient at the current parameters.
  expected = references.reference_split_gradient(
    model, {}, params, data, jax.random.split(rng_before)[1], 4
  )
  for got, want in zip(
    jax.tree.leaves(state.reference_direction), jax.tree.leaves(expected), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(jax.tree.leaves(expected)[0]))) > 0.0

  # Steps reuse the cached direction and leave it unchanged.
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
  cached = jax.tree.leaves(state.reference_direction)[0]
  after, _ = step(state, data, jnp.arange(BATCH_SIZE))
  np.testing.assert_array_equal(jax.tree.leaves(after.reference_direction)[0], cached)

  # The alignment used is the one against the cached direction: a step with a
  # zero direction leaves every rate unchanged.
  zeros = state.replace(reference_direction=jax.tree.map(jnp.zeros_like, expected))
  unchanged, _ = step(zeros, data, jnp.arange(BATCH_SIZE))
  np.testing.assert_array_equal(unchanged.opt_state.log_lr, zeros.opt_state.log_lr)
  assert float(jnp.max(jnp.abs(after.opt_state.log_lr))) > 0.0


@functools.cache
def _batch_norm_setup():
  """Returns a small CNN with BatchNorm, the test data, its parameters and running statistics."""
  model = SmallCNN(num_classes=3, width=2, hidden=8, batch_norm=True)
  _, data, _ = _setup()
  variables = jax.jit(lambda k: model.init(k, data.train_images[:2], train=False))(
    jax.random.key(4)
  )
  return model, data, variables["params"], variables["batch_stats"]


def _batch_norm_state(
  params, batch_stats, *, adam=False, class_rates=False, normalize=True, random_rates=True
):
  """Returns a ddlr optimizer and a train state with `batch_stats`, rates random or all 1."""
  base = optax.adam(1e-2) if adam else optax.sgd(ETA)
  tx = optim.ddlr(
    base, num_instances=NUM_INSTANCES, learning_rate=ETA, hyper_learning_rate=1.0,
    log_lr_min=-50.0, log_lr_max=50.0, num_classes=3 if class_rates else None,
    class_hyper_learning_rate=0.5 if class_rates else None, normalize=normalize,
  )  # fmt: skip
  opt_state = tx.init(params)
  if random_rates:
    opt_state = opt_state._replace(
      log_lr=0.3 * jax.random.normal(jax.random.key(7), (NUM_INSTANCES,))
    )
  state = steps.TrainState(
    step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats,
    opt_state=opt_state, rng=jax.random.key(1),
  )  # fmt: skip
  return tx, state


@functools.cache
def _batch_norm_step(split_batch_stats):
  """Returns a BatchNorm model, its data, a split-reference state and that state after one step."""
  model, data, params, batch_stats = _batch_norm_setup()
  tx, state = _batch_norm_state(params, batch_stats, normalize=False, random_rates=False)
  settings = steps.StepSettings(
    reference="split", normalize=False, split_batch_stats=split_batch_stats
  )
  new_state, _ = jax.jit(
    functools.partial(steps.train_step, model=model, tx=tx, settings=settings)
  )(state, data, SPLIT_IDS)
  return model, data, state, new_state


def _flat_jacobian(model, batch_stats, params, images, labels):
  loss_fn = losses.make_loss_fn(model, batch_stats, images, labels)
  jacobian = jax.jit(jax.jacrev(lambda p: loss_fn(p)[0]))(params)
  return jnp.concatenate([g.reshape(labels.shape[0], -1) for g in jax.tree.leaves(jacobian)], 1)


def test_split_with_batch_norm_uses_coupled_gradients():
  model, data, state, new_state = _batch_norm_step("batch")
  # Per-example gradients of the batch-coupled losses, as BatchNorm computes them.
  flat = _flat_jacobian(
    model, state.batch_stats, state.params, data.train_images[SPLIT_IDS],
    data.train_labels[SPLIT_IDS],
  )  # fmt: skip
  first, second = flat[:3].mean(0), flat[3:].mean(0)  # rates are 1 at the start
  alignment = jnp.concatenate([flat[:3] @ second, flat[3:] @ first])
  expected_step = (ETA / BATCH_SIZE) * alignment
  computed_step = new_state.opt_state.log_lr[SPLIT_IDS] - state.opt_state.log_lr[SPLIT_IDS]
  np.testing.assert_allclose(computed_step, expected_step, rtol=1e-4, atol=1e-7)


def test_split_per_half_batch_norm():
  model, data, state, new_state = _batch_norm_step("half")
  halves = (SPLIT_IDS[:3], SPLIT_IDS[3:])
  # Each half normalised with its own statistics, as its own batch.
  flats = [
    _flat_jacobian(
      model, state.batch_stats, state.params, data.train_images[h], data.train_labels[h]
    )
    for h in halves
  ]
  first, second = flats[0].mean(0), flats[1].mean(0)  # rates are 1 at the start
  alignment = jnp.concatenate([flats[0] @ second, flats[1] @ first])
  # The coupled alignment differs, so this test separates the two settings.
  coupled = _batch_norm_step("batch")[3].opt_state.log_lr[SPLIT_IDS]
  assert float(jnp.max(jnp.abs(coupled - new_state.opt_state.log_lr[SPLIT_IDS]))) > 1e-4
  computed_step = new_state.opt_state.log_lr[SPLIT_IDS] - state.opt_state.log_lr[SPLIT_IDS]
  np.testing.assert_allclose(computed_step, (ETA / BATCH_SIZE) * alignment, rtol=1e-4, atol=1e-7)

  # The update is the mean of the two halves' gradients, and with halves of
  # equal size the running statistics move by the mean of their own updates.
  _, unravel = ravel_pytree(state.params)
  expected_params = jax.tree.map(
    lambda p, g: p - ETA * g, state.params, unravel((first + second) / 2)
  )
  for got, want in zip(
    jax.tree.leaves(new_state.params), jax.tree.leaves(expected_params), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  half_stats = []
  for h in halves:
    images, labels = data.train_images[h], data.train_labels[h]
    _, (_, stats) = losses.make_loss_fn(model, state.batch_stats, images, labels)(state.params)
    half_stats.append(stats)
  expected_stats = jax.tree.map(lambda a, b: (a + b) / 2, *half_stats)
  for got, want in zip(
    jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(expected_stats), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _HalvesModel(nn.Module):
  """Applies `inner` to each half of a training batch separately, as BatchNorm ghost batches."""

  inner: nn.Module

  @nn.compact
  def __call__(self, x, *, train):
    if not train:
      return self.inner(x, train=False)
    half = x.shape[0] // 2
    return jnp.concatenate([self.inner(x[:half], train=True), self.inner(x[half:], train=True)])


SPLIT_HALF_CASES = {
  "odd batch": dict(ids=ODD_IDS),
  "adam": dict(adam=True),
  "class rates": dict(class_rates=True),
  "streamed odd batch": dict(ids=ODD_IDS, stream=True),
}


@pytest.mark.parametrize("case", list(SPLIT_HALF_CASES))
def test_split_half_matches_halves_model(case):
  options = {"ids": SPLIT_IDS, "adam": False, "class_rates": False, "stream": False}
  options.update(SPLIT_HALF_CASES[case])
  model, data, params, batch_stats = _batch_norm_setup()
  ids = options["ids"]
  batch = None
  if options["stream"]:
    batch = (data.train_images[ids], data.train_labels[ids])
    data = data.replace(train_images=data.train_images[:0], train_labels=data.train_labels[:0])

  def run(step_model, step_params, step_stats, split_batch_stats):
    tx, state = _batch_norm_state(
      step_params, step_stats, adam=options["adam"], class_rates=options["class_rates"]
    )
    settings = steps.StepSettings(
      reference="split", split_batch_stats=split_batch_stats, class_rates=options["class_rates"],
      preconditioner="adam" if options["adam"] else "identity",
    )  # fmt: skip
    step = jax.jit(functools.partial(steps.train_step, model=step_model, tx=tx, settings=settings))
    for _ in range(2):  # the second step has non-zero optimizer statistics
      state, _ = step(state, data, ids, batch)
    return state

  # The coupled split path on a model that normalises each half on its own
  # computes what 'half' must compute, by a different route.
  half = run(model, params, batch_stats, "half")
  expected = run(_HalvesModel(model), {"inner": params}, {"inner": batch_stats}, "batch")

  # Adam's preconditioner divides by the square roots of second moments, which
  # for the gradient's smallest components magnifies the rounding differences
  # of the two routes (with eps=1e-2 the rates agree to 1e-4).
  rtol = 2e-3 if options["adam"] else 1e-4
  assert float(jnp.max(jnp.abs(half.opt_state.log_lr[ids]))) > 0.0
  np.testing.assert_allclose(half.opt_state.log_lr, expected.opt_state.log_lr, rtol=rtol, atol=1e-6)
  if options["class_rates"]:
    np.testing.assert_allclose(
      half.opt_state.class_log_lr, expected.opt_state.class_log_lr, rtol=1e-4, atol=1e-6
    )
  for got, want in zip(
    jax.tree.leaves(half.params), jax.tree.leaves(expected.params["inner"]), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_split_half_odd_batch_running_mean():
  model, data, params, batch_stats = _batch_norm_setup()
  after = {}
  for split_batch_stats in ("batch", "half"):
    tx, state = _batch_norm_state(params, batch_stats)
    settings = steps.StepSettings(reference="split", split_batch_stats=split_batch_stats)
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
    after[split_batch_stats], _ = step(state, data, ODD_IDS)

  # The first BatchNorm's input does not depend on any normalisation, so its
  # running mean must match the whole batch's, even with halves of 3 and 4.
  np.testing.assert_allclose(
    after["half"].batch_stats["BatchNorm_0"]["mean"],
    after["batch"].batch_stats["BatchNorm_0"]["mean"],
    rtol=1e-5, atol=1e-7,
  )  # fmt: skip


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("reference", ["split", "small_loss_split"])
def test_split_rejects_batch_of_one(reference, batch_norm):
  if batch_norm:
    model, data, params, batch_stats = _batch_norm_setup()
    tx, state = _batch_norm_state(params, batch_stats)
    settings = steps.StepSettings(reference=reference)
  else:
    model, data, params = _setup()
    tx, state, settings = _state(model, params, reference)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))

  expected = (
    f"settings.reference='{reference}' scores each half of the batch against the other half, "
    "so each half needs at least one example, but the batch size is 1. Use a batch of at "
    "least 2 examples or another reference."
  )
  with pytest.raises(ValueError) as raised:
    step(state, data, jnp.array([3]))
  assert str(raised.value) == expected


def test_reference_without_branch_raises():
  model, data, params = _setup()
  tx, state, settings = _state(model, params, "negative_momentum")
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, settings=settings))
  with pytest.raises(ValueError, match=r"reference 'negative_momentum' has no branch"):
    step(state, data, SPLIT_IDS)
