"""Per-instance dynamic learning rates as an optax transformation.

`ddlr` wraps any optax base optimizer and keeps one log learning-rate
multiplier per training instance (and optionally one per class) in its state.
The train step reads the multipliers of a batch with `instance_rates`, weights
the per-example gradients with them, computes how well each example's gradient
aligns with a reference gradient (see `ddlr.alignment`), and hands the
weighted gradient, the batch's instance ids and the alignment to
`tx.update(grads, opt_state, params, ids=..., labels=..., alignment=...)`.

Method limitation: the hypergradient is first order. It is exact for plain SGD
with the reference evaluated after the step; for momentum and Adam it ignores
how this step's gradient changes the optimizer's later steps, and Adam's
preconditioner is read from the state before the step. With Adam it also
leaves out the scalar (1 - b1) / (1 - b1^t) with which this step's gradient
enters the first moment, which `hypergradient_scale='rms'` divides out.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddlr import optim_checks

# With hypergradient_scale='rms', the centred hypergradient's root mean square
# is taken to be at least this share of the uncentred terms'. Float32 rounding
# of the centring leaves about 1e-7 to 1e-6 of them, which would otherwise
# become full steps. A real spread below the floor is damped in proportion.
RMS_RELATIVE_FLOOR = 1e-3


class DdlrState(NamedTuple):
  """State of the `ddlr` transformation."""

  count: jax.Array  # [] int32, number of updates taken
  log_lr: jax.Array | None  # [num_instances] float32, a_i; None when instance rates are off
  log_lr_momentum: jax.Array | None  # like log_lr; None without hyper momentum
  class_log_lr: jax.Array | None  # [num_classes] float32, b_c; None when class rates are off
  class_log_lr_momentum: jax.Array | None  # like class_log_lr; None without hyper momentum
  invalid_id: jax.Array  # [] int32, first out-of-range id seen under jit, -1 if none
  base_state: optax.OptState


def ddlr(
  base: optax.GradientTransformation,
  *,
  num_instances: int,
  learning_rate: optax.ScalarOrSchedule,
  hyper_learning_rate: float,
  hyper_momentum: float = 0.0,
  instance_rates: bool = True,
  num_classes: int | None = None,
  class_hyper_learning_rate: float | None = None,
  init_log_lr: float = 0.0,
  log_lr_decay: float = 0.0,
  log_lr_min: float = -5.0,
  log_lr_max: float = 5.0,
  normalize: bool = True,
  hypergradient_scale: str = "none",
  accumulation_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps `base` with learned per-instance (and per-class) learning rates.

  For a batch with instance ids :math:`I` (size :math:`B`) and labels
  :math:`y`, the multiplier of position :math:`i` is
  :math:`r_i = \exp(a_{I_i} + b_{y_i})`, divided by its batch mean when
  `normalize` is true. The caller weights the gradient with these rates,
  :math:`g = \frac{1}{B}\sum_i r_i \nabla\ell_i(\theta)`, and passes `g` as
  `updates`; `base` turns it into the parameter update unchanged. With the
  alignment :math:`s_i = \langle v, P\nabla\ell_i(\theta)\rangle` of each
  example with a reference gradient :math:`v` (:math:`P` the base optimizer's
  diagonal preconditioner), the hypergradient of the reference loss after the
  step with respect to the exponent :math:`e_i = a_{I_i} + b_{y_i}` is

  .. math::
    h_i = -\frac{\eta_t}{B} r_i (s_i - c), \qquad
    c = \tfrac{1}{B}\textstyle\sum_j r_j s_j \text{ if normalize else } 0,

  where the centring term :math:`c` is the derivative of the batch-mean
  normalisation. With `hypergradient_scale='rms'`, :math:`h` is divided by its
  batch root mean square, so that `hyper_learning_rate` is a step in log space
  per visit. That root mean square is taken to be at least
  `RMS_RELATIVE_FLOOR` times the root mean square of the uncentred terms
  :math:`\frac{\eta_t}{B} r_i s_i`. When every example aligns alike, the
  centred :math:`h` is float rounding, which the division would otherwise
  turn into full steps; a real spread below that share is damped in
  proportion. Then, per instance id :math:`k` in the batch,

  .. math::
    d_k = \textstyle\sum_{i: I_i = k} h_i + \lambda a_k, \quad
    m_k \leftarrow \mu m_k + d_k, \quad
    a_k \leftarrow \mathrm{clip}(a_k - \beta m_k,
                                 a_{\min}, a_{\max}),

  and the class table :math:`b` takes the same step with
  :math:`\sum_{i: y_i = c} h_i` for each class present in the batch.

  Numeric edge cases: instances (and classes) not in the batch keep their
  rate and their momentum exactly. Duplicate ids in a batch sum their
  hypergradients and take one step. Both tables are float32 whatever the
  parameters' dtype. Concrete ids outside `[0, num_instances)` raise
  `ValueError`; under `jit` the out-of-range positions are dropped and the
  first such id is stored in `DdlrState.invalid_id`, which
  `raise_if_invalid_ids` turns into the same error on the host. Concrete
  labels outside `[0, num_classes)` raise `ValueError`. Under `jit`,
  `instance_rates` gives a batch with such a label NaN rates, so the loss
  turns NaN instead of a wrong class's rate being used, and `update` leaves
  both rate tables unchanged for that batch. A concrete non-finite alignment
  raises `ValueError`. Under `jit` it makes the rates of every instance in
  the batch NaN, because the centring term mixes the batch's alignments.
  NOTE: under `jit` with x64 off, jax converts 64-bit ids to int32 before
  `update` sees them, so an id of 2**32 or more wraps around unchecked.

  Gradient accumulation: with `accumulation_steps` = K > 1, `base` is wrapped
  in `optax.MultiSteps`, so the parameters move once per K calls of `update`,
  by `base`'s update of the mean of the K micro-batch gradients. The rates of
  each micro-batch's instances are updated in its own call, with the
  hypergradient divided by K (each micro-batch is 1/K of the step) and
  :math:`\eta_t` taken at the base step `count // K`. Do not wrap `ddlr`
  itself in `optax.MultiSteps`: that keeps the inner state of every call but
  the K-th, so the rate updates of the other micro-batches would be lost.

  With `optax.inject_hyperparams`, list `num_instances`, `num_classes` and
  `accumulation_steps` (when given) in `static_args`, because they shape the
  state, and `hyper_momentum` too when `init` runs under `jit`, because it
  decides whether the momentum tables exist. An injected `hyper_momentum`
  that is 0 at `init` makes a state without them. Raising it later raises
  `ValueError` when its value is concrete. Under `jit` the raised value has no
  effect, because there is no table to apply it to. The other float arguments may
  then be injected or scheduled. inject_hyperparams evaluates a scheduled
  `learning_rate` at its own count, one per call of `update`; with
  `accumulation_steps`, list `learning_rate` in `static_args` as well, so
  that ddlr reads the schedule at the base step.

  Args:
    base: optax optimizer that turns the weighted gradient into the update.
    num_instances: number of training instances N; ids are in `[0, N)`.
    learning_rate: the base optimizer's learning rate or schedule
      :math:`\eta_t`, used only to scale the hypergradient.
    hyper_learning_rate: :math:`\beta`, step size of the log rates.
    hyper_momentum: :math:`\mu` in `[0, 1)`, momentum of the log rates.
    instance_rates: whether to learn the per-instance table :math:`a`.
    num_classes: number of classes; when given, the per-class table :math:`b`
      is learned too and `update` needs `labels`.
    class_hyper_learning_rate: :math:`\beta` for :math:`b`; defaults to
      `hyper_learning_rate`.
    init_log_lr: initial value of every :math:`a_k` (0 means multiplier 1).
    log_lr_decay: :math:`\lambda \ge 0`, pull of the log rates toward 0.
    log_lr_min: lower clipping bound of both tables.
    log_lr_max: upper clipping bound of both tables.
    normalize: divide the batch's multipliers by their batch mean, so the
      global step size stays :math:`\eta_t`.
    hypergradient_scale: `'none'` or `'rms'`, see above.
    accumulation_steps: K, the number of micro-batches whose gradients make
      one parameter update, see above; None is 1, no accumulation. (An int
      default would be an injected hyperparameter under
      `optax.inject_hyperparams` unless listed in `static_args`.)

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` takes the
    keyword-only arguments `ids` (int [B], B >= 1), `alignment` (float [B])
    and, with class rates, `labels` (int [B]). Without class rates `labels`
    is not read, so a train step may pass it either way.

  References:
    Saxena, Vyas, DeCoste, `Training With Data Dependent Dynamic Learning
    Rates <https://arxiv.org/abs/2105.13464>`_, 2021.

    Baydin et al., `Online Learning Rate Adaptation with Hypergradient Descent
    <https://arxiv.org/abs/1703.04782>`_, 2018.
  """
  optim_checks.check_hyperparameters(
      num_instances=num_instances, learning_rate=learning_rate,
      hyper_learning_rate=hyper_learning_rate, hyper_momentum=hyper_momentum,
      instance_rates=instance_rates, num_classes=num_classes,
      class_hyper_learning_rate=class_hyper_learning_rate, init_log_lr=init_log_lr,
      log_lr_decay=log_lr_decay, log_lr_min=log_lr_min, log_lr_max=log_lr_max,
      normalize=normalize, hypergradient_scale=hypergradient_scale,
      accumulation_steps=accumulation_steps,
  )  # fmt: skip
  # int() because optax.MultiSteps takes a NumPy integer for a schedule.
  accumulation_steps = 1 if accumulation_steps is None else int(accumulation_steps)
  if class_hyper_learning_rate is None:
    class_hyper_learning_rate = hyper_learning_rate

  base = optax.with_extra_args_support(base)
  if accumulation_steps > 1:
    base = optax.MultiSteps(base, every_k_schedule=accumulation_steps).gradient_transformation()
  learning_rate_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    if optim_checks.is_traced(hyper_momentum):
      raise ValueError(
        "hyper_momentum decides whether the state keeps momentum tables, so it must be known "
        "when init is traced; with optax.inject_hyperparams under jit, list it in static_args."
      )
    use_momentum = bool(hyper_momentum > 0.0)
    return DdlrState(
      count=jnp.zeros([], jnp.int32),
      log_lr=_table(instance_rates and num_instances, init_log_lr),
      log_lr_momentum=_table(instance_rates and use_momentum and num_instances, 0.0),
      class_log_lr=_table(num_classes, 0.0),
      class_log_lr_momentum=_table(use_momentum and num_classes, 0.0),
      invalid_id=jnp.full([], -1, jnp.int32),
      base_state=base.init(params),
    )

  def update_fn(updates, state, params=None, *, ids, alignment, labels=None, **extra_args):
    # Lists become NumPy arrays, so that the checks see their values.
    ids, alignment, labels = (
      value if value is None or hasattr(value, "shape") else np.asarray(value)
      for value in (ids, alignment, labels)
    )
    optim_checks.check_batch_args(ids, alignment, labels, num_instances, num_classes)
    optim_checks.check_state_tables(state, num_instances, num_classes)
    ids = jnp.asarray(ids)
    alignment = jnp.asarray(alignment, jnp.float32)
    # The state, not `hyper_momentum`, decides whether momentum tables exist: an
    # injected value is traced here.
    has_momentum = state.log_lr_momentum is not None or state.class_log_lr_momentum is not None
    if not has_momentum and not optim_checks.is_traced(hyper_momentum) and hyper_momentum > 0.0:
      raise ValueError(
        f"hyper_momentum is {hyper_momentum}, but the state has no momentum tables because "
        "hyper_momentum was 0 when init ran; init the state with a nonzero hyper_momentum."
      )
    mu = hyper_momentum if has_momentum else 0.0

    rates = _batch_rates(state, ids, labels, normalize)
    eta = jnp.asarray(learning_rate_fn(state.count // accumulation_steps), jnp.float32)
    centred = alignment - jnp.mean(rates * alignment) if normalize else alignment
    scale = eta / (ids.shape[0] * accumulation_steps)
    hypergrad = -scale * rates * centred
    if hypergradient_scale == "rms":
      floor = RMS_RELATIVE_FLOOR * _root_mean_square(scale * rates * alignment)
      hypergrad = hypergrad / (jnp.maximum(_root_mean_square(hypergrad), floor) + 1e-12)

    in_range = (ids >= 0) & (ids < num_instances)
    first_invalid = jnp.where(jnp.all(in_range), -1, ids[jnp.argmin(in_range)].astype(jnp.int32))
    invalid_id = jnp.where(state.invalid_id >= 0, state.invalid_id, first_invalid)

    # A label outside [0, num_classes), possible only under jit, gives the
    # batch NaN rates. Both tables then keep their values for this batch
    # rather than spread NaN. The instance table drops the batch's writes, so
    # it is still updated in place.
    labels_valid = jnp.array(True)
    if num_classes is not None:
      labels_valid = jnp.all((jnp.asarray(labels) >= 0) & (jnp.asarray(labels) < num_classes))

    log_lr, log_lr_momentum = state.log_lr, state.log_lr_momentum
    if instance_rates:
      log_lr, log_lr_momentum = _instance_step(
          log_lr, log_lr_momentum, ids, in_range & labels_valid, hypergrad,
          beta=hyper_learning_rate, mu=mu, decay=log_lr_decay,
          bounds=(log_lr_min, log_lr_max),
      )  # fmt: skip
    class_log_lr, class_log_lr_momentum = state.class_log_lr, state.class_log_lr_momentum
    if num_classes is not None:
      class_log_lr, class_log_lr_momentum = _class_step(
          class_log_lr, class_log_lr_momentum, labels, hypergrad,
          beta=class_hyper_learning_rate, mu=mu, decay=log_lr_decay,
          bounds=(log_lr_min, log_lr_max),
      )  # fmt: skip
      class_log_lr = jnp.where(labels_valid, class_log_lr, state.class_log_lr)
      if class_log_lr_momentum is not None:
        class_log_lr_momentum = jnp.where(
          labels_valid, class_log_lr_momentum, state.class_log_lr_momentum
        )

    updates, base_state = base.update(updates, state.base_state, params, **extra_args)
    new_state = DdlrState(
      count=optax.safe_increment(state.count),
      log_lr=log_lr,
      log_lr_momentum=log_lr_momentum,
      class_log_lr=class_log_lr,
      class_log_lr_momentum=class_log_lr_momentum,
      invalid_id=invalid_id,
      base_state=base_state,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _table(size, value: float) -> jax.Array | None:
  # Disabled tables are None rather than empty arrays, which checkpoints cannot store.
  return jnp.full([size], value, jnp.float32) if size else None


def _instance_step(log_lr, momentum, ids, in_range, hypergrad, *, beta, mu, decay, bounds):
  """Takes one hyper-optimizer step on the rows `ids` of the instance table."""
  # Summing over equal ids makes duplicates take one step with their summed
  # hypergradient; every duplicate then writes the same value, so the scatter
  # is deterministic. B x B is small next to the model for usual batch sizes.
  same_id = (ids[:, None] == ids[None, :]).astype(hypergrad.dtype)
  summed = same_id @ hypergrad
  safe_ids = jnp.where(in_range, ids, 0)
  current = log_lr[safe_ids]
  direction = summed + decay * current
  if momentum is not None:
    direction = mu * momentum[safe_ids] + direction
    momentum = momentum.at[jnp.where(in_range, ids, log_lr.shape[0])].set(direction, mode="drop")
  new_values = jnp.clip(current - beta * direction, *bounds)
  log_lr = log_lr.at[jnp.where(in_range, ids, log_lr.shape[0])].set(new_values, mode="drop")
  return log_lr, momentum


def _class_step(class_log_lr, momentum, labels, hypergrad, *, beta, mu, decay, bounds):
  """Takes one hyper-optimizer step on the classes present in the batch."""
  num_classes = class_log_lr.shape[0]
  # Out-of-range labels (possible only under jit) are dropped, not clamped.
  summed = jnp.zeros([num_classes], hypergrad.dtype).at[labels].add(hypergrad, mode="drop")
  present = jnp.zeros([num_classes], jnp.int32).at[labels].add(1, mode="drop") > 0
  direction = summed + decay * class_log_lr
  if momentum is not None:
    direction = mu * momentum + direction
    momentum = jnp.where(present, direction, momentum)
  stepped = jnp.clip(class_log_lr - beta * direction, *bounds)
  return jnp.where(present, stepped, class_log_lr), momentum


def _batch_rates(state: DdlrState, ids, labels, normalize: bool) -> jax.Array:
  exponent = jnp.zeros(ids.shape, jnp.float32)
  if state.log_lr is not None:
    exponent = exponent + state.log_lr[jnp.clip(ids, 0, state.log_lr.shape[0] - 1)]
  valid = jnp.ones(ids.shape, bool)
  if state.class_log_lr is not None:
    num_classes = state.class_log_lr.shape[0]
    valid = (labels >= 0) & (labels < num_classes)
    exponent = exponent + state.class_log_lr[jnp.clip(labels, 0, num_classes - 1)]
  # NaN for a label outside [0, num_classes) rather than the clamped class's
  # rate. It is set after exp: under jit on XLA:CPU (jax 0.10.2) an exp of a
  # select of NaN returned 1.
  rates = jnp.where(valid, jnp.exp(exponent), jnp.nan)
  if normalize:
    rates = rates / jnp.mean(rates)
  return rates


def find_ddlr_state(opt_state: optax.OptState) -> DdlrState:
  """Returns the single `DdlrState` inside `opt_state` (chains, injections).

  Raises:
    ValueError: if `opt_state` contains no `DdlrState` or more than one.
  """
  found = [
    node
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, DdlrState))
    if isinstance(node, DdlrState)
  ]
  if len(found) != 1:
    raise ValueError(f"expected exactly one DdlrState in the optimizer state, found {len(found)}.")
  return found[0]


def instance_rates(
  opt_state: optax.OptState, ids: jax.Array, labels: jax.Array | None = None, *, normalize: bool
) -> jax.Array:
  """Returns the learning-rate multipliers `r` [B] of a batch, float32.

  `normalize` must match the `ddlr` transformation's setting, so that the
  gradient is weighted with the same rates the hypergradient assumes. Ids are
  not validated here; `update` validates them. `labels` are read only when
  the state has class rates.
  """
  state = find_ddlr_state(opt_state)
  if state.class_log_lr is not None and labels is None:
    raise ValueError("class rates are enabled, so instance_rates needs labels.")
  return _batch_rates(state, jnp.asarray(ids), labels, normalize)


def raise_if_invalid_ids(opt_state: optax.OptState) -> None:
  """Raises `ValueError` if an update under `jit` saw an out-of-range id.

  Reading the flag synchronises with the device, so call it at the logging
  cadence rather than every step.
  """
  state = find_ddlr_state(opt_state)
  invalid_id = int(state.invalid_id)
  if invalid_id >= 0:
    bound = "num_instances" if state.log_lr is None else state.log_lr.shape[0]
    raise ValueError(
      f"instance id {invalid_id} is outside [0, {bound}); ids must index the training set."
    )


def _root_mean_square(values: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(values**2))
