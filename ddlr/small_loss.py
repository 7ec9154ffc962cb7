"""Pseudo-clean reference gradients from the small-loss examples of the training data.

Without a trusted clean split, the training examples with the lowest loss
stand in for one. Under label noise a network tends to fit the clean examples
before it memorises the corrupted ones, so the low-loss part of a batch is
mostly clean early in training. Two references use this selection:

* `small_loss`: the mean loss gradient of the lowest-loss examples of a second
  training batch drawn at random. Instances of the current batch are excluded
  from the selection, so no example is scored against its own gradient.
* `small_loss_split`: each half of the current batch against the mean gradient
  of the lowest-loss examples of the other half (no self term, no extra
  forward pass).

Known bias: a corrupted example that the network has already memorised has a
low loss too and enters the reference, so the selection helps least late in
training. With `per_class`, the fraction is taken within each observed label,
so classes that are easy to fit do not fill the whole reference.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ddlr import alignment as alignment_lib


def small_loss_mask(
  losses: jax.Array, groups: jax.Array, *, fraction: float, eligible: jax.Array | None = None
) -> jax.Array:
  """Selects the lowest-loss `fraction` of the eligible examples of every group.

  Within each group, the eligible examples are ranked by loss (ties broken by
  position) and the first `max(1, round(fraction * n))` of them are kept, `n`
  being the group's number of eligible examples (`round` rounds half to even).
  A group with no eligible example keeps none.

  Args:
    losses: float [B], the per-example losses (not differentiated through).
    groups: int [B], the group of every example, e.g. its label, or zeros for
      one ranking over the whole batch.
    fraction: share of each group to keep, in (0, 1].
    eligible: bool [B], the examples that may be selected; all when None.

  Returns:
    float32 [B], 1 for a selected example and 0 otherwise.
  """
  losses = jax.lax.stop_gradient(losses)
  size = losses.shape[0]
  if eligible is None:
    eligible = jnp.ones([size], bool)
  position = jnp.arange(size)
  same_group = (groups[:, None] == groups[None, :]) & eligible[None, :]
  # Entry (i, j) is true when example j ranks before example i in i's group.
  before = (losses[None, :] < losses[:, None]) | (
    (losses[None, :] == losses[:, None]) & (position[None, :] < position[:, None])
  )
  rank = jnp.sum(same_group & before, axis=1)
  group_size = jnp.sum(same_group, axis=1)
  keep = jnp.maximum(1, jnp.round(fraction * group_size.astype(jnp.float32)))
  return (eligible & (rank < keep)).astype(jnp.float32)


def selection_groups(labels: jax.Array, *, per_class: bool) -> jax.Array:
  """Returns the groups for `small_loss_mask`: the labels, or one group for all."""
  return labels if per_class else jnp.zeros_like(labels)


def small_loss_gradient(
  loss_fn: Callable[[Any], tuple[jax.Array, Any]],
  params,
  labels: jax.Array,
  *,
  fraction: float,
  per_class: bool,
  eligible: jax.Array | None = None,
):
  """Computes the mean loss gradient of the small-loss examples of one batch.

  The examples are selected by their losses at `params`, from the same
  forward pass that the gradient is taken from. The selection is held fixed,
  so the result is the gradient of the selected examples' mean loss.

  Args:
    loss_fn: `params -> (per-example losses [R], aux)` for the batch.
    params: where the losses and the gradient are taken.
    labels: int [R], the batch's observed labels.
    fraction: share of the eligible examples to keep (per label with `per_class`).
    per_class: rank within each observed label instead of over the whole batch.
    eligible: bool [R], the examples that may be selected; all when None.

  Returns:
    A params-shaped pytree, the mean gradient of the selected examples.
  """
  losses, vjp_fn, _ = jax.vjp(loss_fn, params, has_aux=True)
  groups = selection_groups(labels, per_class=per_class)
  mask = small_loss_mask(losses, groups, fraction=fraction, eligible=eligible)
  # The mask keeps at least one example whenever one is eligible.
  return vjp_fn(mask / jnp.maximum(jnp.sum(mask), 1.0))[0]


def split_small_loss_directions(lin, labels: jax.Array, *, fraction: float, per_class: bool):
  """Computes the two references of `small_loss_split` from the current batch.

  The batch's first half is `[0, B // 2)`; each half ranks its own examples.

  Args:
    lin: the current batch's `alignment.LinearizedLosses`.
    labels: int [B], the batch's observed labels.
    fraction: share of each half to keep (per label with `per_class`).
    per_class: rank within each observed label of a half.

  Returns:
    The mean gradient of the second half's selected examples (the reference
    of the first half) and that of the first half's selected examples (the
    reference of the second half), and the selection mask float32 [B].
  """
  batch_size = labels.shape[0]
  first_half = jnp.arange(batch_size) < batch_size // 2
  groups = 2 * selection_groups(labels, per_class=per_class) + first_half.astype(labels.dtype)
  mask = small_loss_mask(lin.losses, groups, fraction=fraction)
  first_mask = mask * first_half
  second_mask = mask * ~first_half
  for_first = lin.vjp(second_mask / jnp.sum(second_mask))
  for_second = lin.vjp(first_mask / jnp.sum(first_mask))
  return for_first, for_second, mask


def split_alignment(lin, labels, precondition, *, fraction, per_class, method) -> jax.Array:
  """Scores each half of the batch against the other half's small-loss gradient.

  Returns:
    float32 [B], the alignment of every example, after `precondition` is
    applied to both references.
  """
  for_first, for_second, _ = split_small_loss_directions(
    lin, labels, fraction=fraction, per_class=per_class
  )
  tangents = alignment_lib.stack_tangents(precondition(for_first), precondition(for_second))
  both = alignment_lib.compute_alignment(lin, tangents, method=method)
  first_half = jnp.arange(labels.shape[0]) < labels.shape[0] // 2
  return jnp.where(first_half, both[0], both[1])
