"""Reference directions: the gradient each example's alignment is measured against.

`compute_batch_alignment` scores a batch against the direction that
`StepSettings.reference` names, preconditioned like the base optimizer's
update. The reference-split gradient can be cached in the train state and
refreshed every k steps (`caches_reference`, `refresh_reference_direction`).
"""

import jax
import jax.numpy as jnp
import optax

from ddlr import alignment as alignment_lib
from ddlr import losses, optimizer_state
from ddlr import small_loss as small_loss_lib

# Which gradient the alignment is measured against:
#   batch      the weighted gradient of the batch itself (biased: self term);
#   lookahead  the batch's mean loss gradient after the step;
#   split      each half of the batch against the other half's gradient;
#   momentum   the base optimizer's momentum buffer (past batches only);
#   reference  a batch of the held-out reference split;
#   small_loss the lowest-loss examples of a second, random training batch,
#              the current batch's instances excluded (no trusted data);
#   small_loss_split
#              each half of the batch against the lowest-loss examples of
#              the other half (no trusted data, no extra forward pass).
REFERENCES = (
  "batch",
  "lookahead",
  "split",
  "momentum",
  "reference",
  "small_loss",
  "small_loss_split",
)
# The references that score each half of the batch against the other half, so
# they need a batch of at least 2 examples.
SPLIT_REFERENCES = ("split", "small_loss_split")
# Parameters at which the `reference` (and `small_loss`) batch's gradient is taken: after the step
# (exact for SGD), or the current ones (a first-order shortcut, one forward less).
REFERENCE_POINTS = ("lookahead", "current")
PRECONDITIONERS = ("identity", "adam")


def compute_batch_alignment(
  state, data, lin, grads, ids, labels, rates, rng, *, model, tx, settings, images=None
) -> jax.Array:
  """Returns the alignment [B] of each example with the configured reference gradient.

  `images` are the batch's (augmented) inputs, which `lookahead` differentiates
  again; None gathers them from `data` by id.
  """
  precondition = preconditioner(state.opt_state, settings)
  batch_size = ids.shape[0]

  if settings.reference == "split":
    # The second half's gradient follows from the full one by linearity, so
    # the split costs one extra VJP, not two.
    first_half = jnp.arange(batch_size) < batch_size // 2
    num_first = batch_size // 2
    first_sum = lin.vjp(rates * first_half)
    second_sum = jax.tree.map(lambda g, f: batch_size * g - f, grads, first_sum)
    tangents = alignment_lib.stack_tangents(
      precondition(jax.tree.map(lambda s: s / (batch_size - num_first), second_sum)),
      precondition(jax.tree.map(lambda f: f / num_first, first_sum)),
    )
    both = alignment_lib.compute_alignment(lin, tangents, method=settings.alignment)
    return jnp.where(first_half, both[0], both[1])

  if settings.reference == "small_loss_split":
    return small_loss_lib.split_alignment(
      lin, labels, precondition, fraction=settings.small_loss_fraction,
      per_class=settings.small_loss_per_class, method=settings.alignment,
    )  # fmt: skip

  if settings.reference == "batch":
    direction = grads
  elif settings.reference == "momentum":
    direction = optimizer_state.momentum_buffer(state.opt_state)
  elif settings.reference == "lookahead":
    params_after = lookahead_params(state, grads, ids, labels, tx)
    if images is None:
      images = data.train_images[ids]
    direction = losses.mean_loss_gradient(model, state.batch_stats, params_after, images, labels)
  elif settings.reference == "small_loss":
    direction = small_loss_reference(state, data, grads, ids, labels, rng, model, tx, settings)
  elif caches_reference(settings):
    direction = state.reference_direction
  elif settings.reference == "reference":
    direction = reference_gradient(state, data, grads, ids, labels, rng, model, tx, settings)
  else:
    # A name in REFERENCES without a branch here would otherwise score nothing.
    raise ValueError(
      f"reference {settings.reference!r} has no branch in compute_batch_alignment; "
      f"expected one of {REFERENCES}."
    )
  tangents = alignment_lib.stack_tangents(precondition(direction))
  return alignment_lib.compute_alignment(lin, tangents, method=settings.alignment)[0]


def cached_direction(state, settings):
  """Returns the preconditioned cached reference gradient for the `jvp` path, else None.

  The cached gradient is fixed before the step, so the `jvp` path scores the
  batch against it in its forward pass (`alignment.linearize_with_alignment`).
  That lowered the small CNN's peak memory from 1.27x a uniform step's to
  1.18x at the same speed within noise. The momentum buffer is fixed too,
  but that step ran slower (1.51x against 1.35x a uniform step) and fits in
  1.18x without it (scripts/benchmark.py, 2-core CPU). Baselines score the
  batch on their own, so they get None.
  """
  if settings.baseline.name != "none" or not caches_reference(settings):
    return None
  return preconditioner(state.opt_state, settings)(state.reference_direction)


def caches_reference(settings) -> bool:
  """Returns whether the train state keeps a reference gradient between refreshes."""
  return (
    settings.enabled and settings.reference == "reference" and settings.reference_every_steps > 1
  )


def refresh_reference_direction(state, data, *, model, settings):
  """Returns the `steps.TrainState` with a new reference-split gradient at its parameters.

  With `reference_every_steps` = k > 1 the training loop calls this before the
  first step and after every k-th step, as its own jitted call. Outside the
  step no activations of the batch are alive, and on XLA:CPU a `lax.cond`
  inside the step made each refreshing step about 10 times slower (small CNN,
  batch 128).
  """
  rng, reference_rng = jax.random.split(state.rng)
  direction = reference_split_gradient(
    model, state.batch_stats, state.params, data, reference_rng, settings.reference_batch_size
  )
  return state.replace(rng=rng, reference_direction=direction)


def reference_gradient(state, data, grads, ids, labels, rng, model, tx, settings):
  """Returns the reference-split gradient at the point `settings.reference_at` names."""
  if settings.reference_at == "lookahead":
    params = lookahead_params(state, grads, ids, labels, tx)
  else:
    params = state.params
  return reference_split_gradient(
    model, state.batch_stats, params, data, rng, settings.reference_batch_size
  )


def reference_split_gradient(model, batch_stats, params, data, rng, batch_size):
  """Returns the mean loss gradient at `params` of a random batch of the reference split."""
  num_reference = data.reference_labels.shape[0]
  # config_checks.check_reference_batches keeps batch_size within the split.
  picked = jax.random.choice(rng, num_reference, (batch_size,), replace=False)
  return losses.mean_loss_gradient(
    model, batch_stats, params, data.reference_images[picked], data.reference_labels[picked]
  )


def small_loss_reference(state, data, grads, ids, labels, rng, model, tx, settings):
  """Returns the mean loss gradient of the small-loss part of a random training batch.

  The batch has `reference_batch_size` training instances, drawn without
  replacement; those also in the current batch `ids` are never selected.
  Losses and gradient are taken at `reference_at`.
  """
  num_train = data.train_labels.shape[0]
  size = settings.reference_batch_size
  other_ids = jax.random.choice(rng, num_train, (size,), replace=False)
  if settings.reference_at == "lookahead":
    params = lookahead_params(state, grads, ids, labels, tx)
  else:
    params = state.params
  other_labels = data.train_labels[other_ids]
  loss_fn = losses.make_loss_fn(
    model, state.batch_stats, data.train_images[other_ids], other_labels
  )
  return small_loss_lib.small_loss_gradient(
    loss_fn,
    params,
    other_labels,
    fraction=settings.small_loss_fraction,
    per_class=settings.small_loss_per_class,
    eligible=~jnp.isin(other_ids, ids),
  )


def lookahead_params(state, grads, ids, labels, tx):
  """Returns the parameters after this step's base update.

  The update does not depend on the alignment, so a call with zero alignment
  gives the step's parameters. Under jit the rate update of this call is
  unused, and its base update is the same computation as the real one.
  """
  zeros = jnp.zeros(ids.shape, jnp.float32)
  updates, _ = tx.update(
    grads, state.opt_state, state.params, ids=ids, labels=labels, alignment=zeros
  )
  return optax.apply_updates(state.params, updates)


def preconditioner(opt_state, settings):
  """Returns the function that preconditions a params-shaped direction: identity or Adam's."""
  if settings.preconditioner == "identity":
    return lambda tree: tree
  scale = optimizer_state.adam_preconditioner(opt_state, b2=settings.adam_b2, eps=settings.adam_eps)
  return lambda tree: jax.tree.map(jnp.multiply, scale, tree)
