"""Evaluation over every example of a test split, in fixed-shape batches."""

import jax
import numpy as np

from ddlr import data as data_lib


def evaluate(eval_fn, state, images, labels, batch_size) -> dict[str, float]:
  """Returns accuracy and mean loss over every example of (images, labels)."""
  batches = (
    (images[start : start + batch_size], labels[start : start + batch_size])
    for start in range(0, len(labels), batch_size)
  )
  return evaluate_batches(eval_fn, state, batches, batch_size)


def evaluate_batches(eval_fn, state, batches, batch_size) -> dict[str, float]:
  """Returns accuracy, mean loss and count over every example of the `(images, labels)` batches.

  Batches smaller than `batch_size` are padded so that one compiled shape serves all.
  """
  batch_sums = []
  for batch_images, batch_labels in batches:
    size = len(batch_labels)
    # Padding the last batch keeps one compiled shape; the mask drops the padding.
    padding = batch_size - size
    mask = np.concatenate([np.ones(size, np.float32), np.zeros(padding, np.float32)])
    batch_images = np.concatenate(
      [batch_images, np.zeros((padding, *batch_images.shape[1:]), batch_images.dtype)]
    )
    batch_labels = np.concatenate([batch_labels, np.zeros(padding, batch_labels.dtype)])
    batch_sums.append(eval_fn(state.params, state.batch_stats, batch_images, batch_labels, mask))
  # One copy to the host at the end, so the loop does not wait for each batch
  # before preparing the next.
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for sums in jax.device_get(batch_sums):
    for key, value in sums.items():
      totals[key] += float(value)
  if not totals["count"]:
    raise data_lib.DataError(
      "the evaluation split is empty, so no accuracy can be computed. Check the "
      "dataset's test split and config.data.num_test."
    )
  return {
    "accuracy": totals["correct"] / totals["count"],
    "loss": totals["loss"] / totals["count"],
    "count": int(totals["count"]),
  }
