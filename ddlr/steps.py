"""Train state and the jitted train and eval steps.

A train step with per-instance rates: read the batch's rates from the
optimizer state, linearise the per-example losses once, take the rate-weighted
gradient as a VJP, compute every example's alignment with the configured
reference gradient as a JVP (or from per-example gradients), and let the
`ddlr` transformation update both the parameters and the rates.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ddlr import alignment as alignment_lib
from ddlr import baselines, layerwise, optim, optimizer_state, references
from ddlr.baselines import data_parameters, hypergradient, learning_to_reweight
from ddlr.baselines import small_loss as small_loss_baseline
from ddlr.data import augment
from ddlr.losses import make_loss_fn

# BatchNorm statistics under the `split` reference. `batch` normalises the
# whole batch together, as the update without per-instance rates does. This
# couples the halves, so the step needs an extra VJP and a second tangent.
# `half` normalises each half on its own (ghost batches of B // 2 and
# B - B // 2 examples). Then each half's gradient is independent of the
# examples it scores, and the step costs about as much as with the
# `momentum` reference. Models without BatchNorm give the same step with
# either, and runs without per-instance rates always use `batch`.
SPLIT_BATCH_STATS = ("batch", "half")


class TrainState(struct.PyTreeNode):
  """Everything a training step reads and writes; `step` is the one step counter."""

  step: jax.Array  # [] int32
  params: Any
  batch_stats: Any  # BatchNorm running statistics, {} for models without BatchNorm
  opt_state: optax.OptState
  rng: jax.Array  # PRNG key for the reference batches
  # The last reference-split gradient, reused between refreshes when
  # StepSettings.reference_every_steps > 1 (`references.refresh_reference_direction`
  # sets it); None otherwise.
  reference_direction: Any = None
  # A baseline's per-instance tables (`ddlr.baselines`), None for ddlr and uniform.
  baseline_state: Any = None


class DeviceData(struct.PyTreeNode):
  """Training and reference arrays held on the device; a batch gathers rows by id.

  A streamed dataset keeps only its reference split here. Its training arrays
  are empty, and each batch comes from the host.
  """

  train_images: jax.Array  # [N, H, W, C] float32, N is 0 when the dataset streams
  train_labels: jax.Array  # [N] int32, observed (possibly corrupted) labels
  reference_images: jax.Array  # [R, H, W, C] float32, R may be 0
  reference_labels: jax.Array  # [R] int32


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static choices of the train step, taken from the config's `ddlr` section."""

  enabled: bool = True
  reference: str = "reference"
  reference_at: str = "lookahead"
  alignment: str = "auto"
  normalize: bool = True
  class_rates: bool = False
  reference_batch_size: int = 128
  # Recompute the reference-split gradient every this many steps and reuse it
  # in between; 1 recomputes it every step. With k > 1 the training loop
  # calls `references.refresh_reference_direction` after every k-th update, at the
  # parameters that update produced, and `reference_at` does not apply.
  reference_every_steps: int = 1
  split_batch_stats: str = "batch"
  # True: one jax.linearize gives the losses, the gradient (its transpose) and
  # the alignment (its JVP). False: jax.vjp for the gradient and a separate
  # jax.jvp, which repeats the forward pass; kept to test and benchmark.
  linearize: bool = True
  # Under the `split` reference without whole-batch BatchNorm, True runs the
  # first half's passes after the second half's backward pass, which lowers
  # peak memory. False lets XLA run the halves at once, which was faster on a
  # 2-core CPU (docs/performance.md). The results are the same.
  split_sequential: bool = False
  # Share of a batch that `small_loss` and `small_loss_split` keep as the
  # pseudo-clean reference, ranked by loss within each label when per_class.
  small_loss_fraction: float = 0.3
  small_loss_per_class: bool = False
  preconditioner: str = "identity"
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  baseline: baselines.BaselineSettings = baselines.BaselineSettings()
  # Augmentation of the training batch inside the step, one of
  # augment.ON_DEVICE_AUGMENTATIONS. Reference batches are never augmented.
  augmentation: str = "none"


def train_step(
  state: TrainState, data: DeviceData, ids: jax.Array, batch=None, *, model, tx, settings
):
  """Takes one training step on the instances `ids` [B].

  Args:
    state: the train state.
    data: the arrays held on the device.
    ids: instance ids of the batch, [B] int32.
    batch: None to gather the batch from `data` by id, or the batch's
      `(images [B, H, W, C], labels [B])` when the dataset streams from the host.
    model: the Flax model.
    tx: the optimizer.
    settings: the `StepSettings`.

  Returns:
    The new `TrainState` and a dict of scalar metrics for this step.

  Raises:
    ValueError: at trace time, if a split reference gets a batch of fewer
      than 2 examples.
  """
  _check_split_batch_size(ids.shape[0], settings)

  if batch is None:
    images = data.train_images[ids]
    labels = data.train_labels[ids]
  else:
    images, labels = batch

  rng, reference_rng = jax.random.split(state.rng)
  if settings.augmentation != "none":
    # Split off the carried key, so a resumed run draws the same crops.
    rng, augment_rng = jax.random.split(rng)
    images = augment.augment_batch(settings.augmentation, augment_rng, images)

  batch_size = ids.shape[0]
  if settings.enabled:
    labels_for_rates = labels if settings.class_rates else None
    rates = optim.instance_rates(
      state.opt_state, ids, labels_for_rates, normalize=settings.normalize
    )
  else:
    rates = jnp.ones([batch_size], jnp.float32)

  temperatures = None
  if settings.baseline.name == "data_parameters":
    temperatures = data_parameters.batch_temperatures(
      state.baseline_state, ids, labels, settings.baseline.data_parameters
    )

  reference_direction = state.reference_direction
  baseline_state = state.baseline_state
  orders_update = False
  if (
    settings.enabled
    and settings.reference == "split"
    and (not state.batch_stats or settings.split_batch_stats == "half")
  ):
    losses, logits, grads, alignment, batch_stats = _split_by_halves(
      state, images, labels, rates, model=model, settings=settings
    )
  else:
    loss_fn = make_loss_fn(model, state.batch_stats, images, labels, temperatures)
    lin = _differentiate(loss_fn, state, settings)
    losses, (logits, batch_stats) = lin.losses, lin.aux
    # The JVP along the momentum reads the buffer that the update overwrites.
    # The layerwise and vmap paths needed more memory with the ordering.
    orders_update = (
      settings.reference == "momentum" and lin.backward is None and settings.alignment != "vmap"
    )
    if settings.baseline.name != "none":
      rates, baseline_state = apply_baseline(
        state, data, lin, ids, labels, rates, reference_rng, model=model, tx=tx, settings=settings
      )
    grads, lin = alignment_lib.weighted_gradient(lin, rates / batch_size)
    if lin.alignment is not None:
      alignment = lin.alignment
    elif settings.enabled:
      alignment = references.compute_batch_alignment(
          state, data, lin, grads, ids, labels, rates, reference_rng, model=model, tx=tx,
          settings=settings, images=images,
      )  # fmt: skip

  if settings.enabled:
    if orders_update:
      grads = _after_alignment(grads, alignment)
    updates, opt_state = tx.update(
      grads, state.opt_state, state.params, ids=ids, labels=labels, alignment=alignment
    )
  else:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)

  params = optax.apply_updates(state.params, updates)

  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    rng=rng,
    reference_direction=reference_direction,
    baseline_state=baseline_state,
  )

  metrics = {
    "train/loss": jnp.mean(losses),
    "train/weighted_loss": jnp.mean(rates * losses),
    "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
    "train/grad_norm": optax.global_norm(grads),
    "train/update_norm": optax.global_norm(updates),
  }
  if settings.enabled:
    metrics["ddlr/alignment_mean"] = jnp.mean(alignment)
    metrics["ddlr/batch_rate_max"] = jnp.max(rates)
    metrics["ddlr/rates_finite"] = _batch_rates_finite(opt_state, ids, labels)
  if settings.baseline.name == "hypergradient":
    metrics["baseline/learning_rate"] = optimizer_state.find_state_field(
      opt_state, hypergradient.HypergradientState, "learning_rate"
    )
  return new_state, metrics


def _check_split_batch_size(batch_size: int, settings: StepSettings) -> None:
  # With one example one half is empty, so the step would raise a bare
  # ZeroDivisionError or return NaN rates, depending on the model.
  if settings.enabled and settings.reference in references.SPLIT_REFERENCES and batch_size < 2:
    raise ValueError(
      f"settings.reference={settings.reference!r} scores each half of the batch against the other "
      f"half, so each half needs at least one example, but the batch size is {batch_size}. "
      "Use a batch of at least 2 examples or another reference."
    )


def apply_baseline(state, data, lin, ids, labels, rates, rng, *, model, tx, settings):
  """Returns a baseline's rates [B] (weights times B) and its updated per-instance tables.

  Learning to reweight scores the batch against a reference-split batch at
  the current parameters, which is the alignment path's `reference` setting
  with `reference_at='current'`. Small loss keeps the batch's lowest losses.
  Data Parameters keeps uniform rates and takes a step on its temperatures.
  Other methods return `rates` and the state's tables unchanged.
  """
  batch_size = ids.shape[0]
  name = settings.baseline.name
  if name == "learning_to_reweight":
    alignment = references.compute_batch_alignment(
      state, data, lin, None, ids, labels, rates, rng, model=model, tx=tx, settings=settings
    )
    weights = learning_to_reweight.weights_from_alignment(alignment)
    return weights * batch_size, learning_to_reweight.update(state.baseline_state, weights, ids)
  if name == "small_loss":
    weights = small_loss_baseline.select_small_loss(
      lin.losses, state.step, settings.baseline.small_loss
    )
    return weights * batch_size, small_loss_baseline.update(state.baseline_state, lin.losses, ids)
  if name == "data_parameters":
    logits = lin.aux[0]
    new_tables = data_parameters.update(
      state.baseline_state, logits, ids, labels, settings.baseline.data_parameters
    )
    return rates, new_tables
  return rates, state.baseline_state


def _differentiate(loss_fn, state, settings) -> alignment_lib.LinearizedLosses:
  if settings.alignment in ("layerwise", "auto"):
    calls, reason = layerwise.find_layer_calls(loss_fn, state.params, state.batch_stats)
    # `auto` keeps jvp for baselines: they score examples before the backward
    # pass, where the layerwise path would repeat the forward pass.
    if calls is not None and (settings.alignment == "layerwise" or settings.enabled):
      return layerwise.linearize_layerwise(loss_fn, state.params, calls)
    if settings.alignment == "layerwise":
      raise ValueError(f"{reason}; use alignment='jvp' or 'auto'.")
  if settings.linearize:
    direction = None
    if settings.alignment != "vmap":
      direction = references.cached_direction(state, settings)
    if direction is not None:
      return alignment_lib.linearize_with_alignment(loss_fn, state.params, direction)
    return alignment_lib.linearize_losses(loss_fn, state.params)
  return alignment_lib.differentiate_losses(loss_fn, state.params)


def _split_by_halves(state, images, labels, rates, *, model, settings):
  """Computes the `split` reference with one pass per half instead of an extra VJP.

  When each half's losses depend on that half's inputs only (no BatchNorm, or
  `split_batch_stats='half'`), the two halves can be linearised separately:
  each half's VJP gives its gradient sum and each half's JVP scores it
  against the other half, which costs the same as one full-batch forward,
  backward and JVP. With BatchNorm over the whole batch,
  `references.compute_batch_alignment` handles the split on the full batch instead.

  Returns:
    The per-example losses, logits, the weighted mean gradient, the alignment
    and the new BatchNorm running statistics: with BatchNorm, the two halves'
    updates averaged with weights proportional to their sizes, which is one
    update with the size-weighted mean of their batch statistics.
  """
  batch_size, half = labels.shape[0], labels.shape[0] // 2
  parts = (slice(0, half), slice(half, batch_size))
  second = _differentiate(
    make_loss_fn(model, state.batch_stats, images[parts[1]], labels[parts[1]]), state, settings
  )
  second_sum, second = alignment_lib.weighted_gradient(second, rates[parts[1]])
  first_images = images[parts[0]]
  if settings.split_sequential:
    # The first half's inputs wait for the second half's gradient. Otherwise
    # XLA:CPU kept both halves' activations alive during the second half's
    # backward pass: peak memory 1.51x the uniform step's against 1.15x
    # (small CNN, `jvp`, scripts/benchmark.py on a 2-core CPU).
    first_images = first_images + _negative_zero(second_sum).astype(images.dtype)
  first = _differentiate(
    make_loss_fn(model, state.batch_stats, first_images, labels[parts[0]]), state, settings
  )
  first_sum, first = alignment_lib.weighted_gradient(first, rates[parts[0]])
  sums = [first_sum, second_sum]
  lins = [first, second]
  grads = jax.tree.map(lambda a, b: (a + b) / batch_size, *sums)
  precondition = references.preconditioner(state.opt_state, settings)
  # Each half is scored against the other half's weighted mean gradient.
  others = (
    jax.tree.map(lambda g: g / (batch_size - half), sums[1]),
    jax.tree.map(lambda g: g / half, sums[0]),
  )
  alignment = jnp.concatenate(
    [
      alignment_lib.compute_alignment(
        lin, alignment_lib.stack_tangents(precondition(other)), method=settings.alignment
      )[0]
      for lin, other in zip(lins, others, strict=True)
    ]
  )
  losses = jnp.concatenate([lin.losses for lin in lins])
  logits = jnp.concatenate([lin.aux[0] for lin in lins])
  # Weighted by size, so with an odd batch each example counts once, as
  # with statistics of the whole batch.
  batch_stats = jax.tree.map(
    lambda a, b: (half * a + (batch_size - half) * b) / batch_size, lins[0].aux[1], lins[1].aux[1]
  )
  return losses, logits, grads, alignment, batch_stats


# `_after_alignment` orders the updates of leaves holding at least this share
# of the parameters after the alignment.
_ORDERED_LEAF_SHARE = 0.1


def _after_alignment(grads, alignment: jax.Array):
  """Returns `grads` with the largest leaves made to depend on `alignment` [B].

  Used for the `jvp` alignment along the momentum buffer. The JVP reads the
  momentum, which the update then overwrites in place (the train state is
  donated). Nothing in the data flow orders that read before the write, so
  XLA copies the buffer at the start of the step: 1.5 MiB, the dense
  kernel's momentum, in the small CNN's 22 MiB step. Adding a zero computed
  from the alignment's sum to a leaf's gradient makes its update wait for
  the alignment, and the copy goes away. Only leaves that hold at least
  `_ORDERED_LEAF_SHARE` of the parameters wait: ordering every update after
  the alignment left XLA:CPU fewer operations to run at once and made the
  step slower (docs/performance.md).

  Returns:
    A tree bitwise equal to `grads`: the added value is -0.0, which leaves
    every float unchanged (+0.0 and -0.0 included), and it comes from a
    finite sum only, so a NaN alignment does not reach the parameters
    through it. XLA may still fuse the ordered updates differently: with
    Adam the parameters then differed from the unordered step's by about
    one unit in the last place.
  """
  zero = _negative_zero(alignment)
  parameter_count = sum(leaf.size for leaf in jax.tree.leaves(grads))

  def order(leaf):
    if leaf.size >= _ORDERED_LEAF_SHARE * parameter_count:
      return leaf + zero.astype(leaf.dtype)
    return leaf

  return jax.tree.map(order, grads)


def _negative_zero(tree) -> jax.Array:
  """Returns -0.0 computed from the sum of `tree`'s leaves, a float32 scalar.

  Adding it to an array makes that array's users wait for `tree` and changes
  no float, +0.0 and -0.0 included. A NaN or inf sum is replaced by 0 first,
  so it does not reach the array.
  """
  total = sum(jnp.sum(leaf, dtype=jnp.float32) for leaf in jax.tree.leaves(tree))
  # -|0 * t| is -0.0 for every finite t.
  return -jnp.abs(0.0 * jnp.where(jnp.isfinite(total), total, 0.0))


def _batch_rates_finite(opt_state, ids, labels) -> jax.Array:
  """Returns whether the batch's updated log rates are all finite (a bool scalar)."""
  state = optim.find_ddlr_state(opt_state)
  finite = jnp.array(True)
  if state.log_lr is not None:
    finite &= jnp.all(jnp.isfinite(state.log_lr[ids]))
  if state.class_log_lr is not None:
    finite &= jnp.all(jnp.isfinite(state.class_log_lr[labels]))
  return finite


def eval_step(params, batch_stats, images, labels, mask, *, model):
  """Returns summed correct predictions, summed loss and count over the masked batch."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  logits = model.apply(variables, images, train=False).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, -1) == labels
  return {
    "correct": jnp.sum(correct * mask),
    "loss": jnp.sum(losses * mask),
    "count": jnp.sum(mask),
  }
