"""Personalisation toward a target distribution: target and rest evaluation, fine-tuning.

With `config.data.target` set, every evaluation also scores the target test
set and the rest of the test set (`evaluate_target_and_rest`). Fine-tuning
(`config.finetune.epochs > 0`) continues from the trained parameters on the
reference split alone, with the base optimizer at a constant learning rate.
With a target the reference split is the target sample, and without one it
is the held-out split of `config.data.reference_size` training examples.

Fine-tuning writes no checkpoint of its own. It starts from the main
training's last checkpoint and is a deterministic function of it and the
config. So a run interrupted during fine-tuning resumes at the end of the
main training and repeats the whole fine-tuning.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddlr import analysis, steps
from ddlr.models import create_model

# Mixed into the training seed for the fine-tuning batch order.
_FINETUNE_STREAM = 2


def evaluate_target_and_rest(evaluate_fn: Callable, data) -> dict[str, float]:
  """Score the target test set and the rest of the test set.

  Args:
    evaluate_fn: `(images, labels) -> {"accuracy": ..., "loss": ...}`.
    data: the run's TrainingData.

  Returns:
    `target_test_accuracy` and `rest_test_accuracy`, or {} when the run has
    no target distribution.
  """
  if data.target_kind == "none":
    return {}
  scores = {}
  for name, mask in (("target", data.test_is_target), ("rest", ~data.test_is_target)):
    scores[f"{name}_test_accuracy"] = evaluate_fn(data.test_images[mask], data.test_labels[mask])[
      "accuracy"
    ]
  return scores


def history_summary(target_history: list[float], rest_history: list[float]) -> dict:
  """Summarise the per-epoch target and rest accuracies: last epoch, best epoch and lists.

  The best epoch is the one with the highest target-test accuracy, and
  `rest_test_accuracy_at_best_target_epoch` is the rest accuracy there.
  """
  if not target_history:
    return {}
  best = int(np.argmax(target_history))
  return {
    "last_epoch_target_test_accuracy": target_history[-1],
    "best_epoch_target_test_accuracy": target_history[best],
    "best_target_epoch": best + 1,
    "last_epoch_rest_test_accuracy": rest_history[-1],
    "best_epoch_rest_test_accuracy": max(rest_history),
    "rest_test_accuracy_at_best_target_epoch": rest_history[best],
    "target_test_accuracy_per_epoch": list(target_history),
    "rest_test_accuracy_per_epoch": list(rest_history),
  }


def domain_auroc(exponent: np.ndarray, data) -> dict[str, float]:
  """Score the learned rates against the training instances' target-domain mask.

  Returns:
    `target_domain_auroc`, the probability that an instance from the target
    distribution has a higher rate than one from outside it, or {} when
    the mask has only one class.
  """
  mask = np.asarray(data.is_target_domain, bool)
  if not mask.any() or mask.all():
    return {}
  return {"target_domain_auroc": analysis.auroc(exponent, mask)}


def finetune_data_name(target_kind: str) -> str:
  """Names the data fine-tuning trains on: the reference split, or the target sample it holds."""
  return "reference split" if target_kind == "none" else "target sample"


def finetune(config, data, state, *, tx, evaluate_fn: Callable, check_finite: Callable) -> dict:
  """Fine-tune the trained model on the reference split and evaluate after every epoch.

  Each epoch is a permutation of the target sample drawn from the training
  seed and the epoch; the last partial batch is dropped.

  Args:
    config: the run's config; `finetune.epochs` and `train.batch_size` are read.
    data: the run's TrainingData. Fine-tuning trains on its reference split,
      which is the target sample when the run has a target distribution.
    state: the TrainState after the main training.
    tx: the fine-tuning optimizer, without per-instance rates.
    evaluate_fn: `(params_state, images, labels) -> {"accuracy", "loss"}`.
    check_finite: `(step_metrics, first_step, epoch)`, raises on a
      non-finite loss.

  Returns:
    `finetune_test_accuracy_per_epoch` and, with a target,
    `finetune_target_test_accuracy_per_epoch` and
    `finetune_rest_test_accuracy_per_epoch`; the last entry scores the
    returned model.
  """
  size = len(data.reference_labels)
  batch_size = min(config.train.batch_size, size)
  model = create_model(config.model, data.num_classes)
  device_data = steps.DeviceData(
    train_images=jnp.asarray(data.reference_images),
    train_labels=jnp.asarray(data.reference_labels),
    reference_images=jnp.asarray(data.reference_images),
    reference_labels=jnp.asarray(data.reference_labels),
  )
  train_fn = jax.jit(
    functools.partial(
      steps.train_step, model=model, tx=tx, settings=steps.StepSettings(enabled=False)
    )
  )
  order_rng = jax.random.fold_in(jax.random.key(config.seed), _FINETUNE_STREAM)
  state = state.replace(step=jnp.zeros([], jnp.int32), opt_state=tx.init(state.params))
  logging.info(
    "Fine-tuning on the %d-example %s for %d epochs, batch %d.",
    size, finetune_data_name(data.target_kind), config.finetune.epochs, batch_size,
  )  # fmt: skip

  history = {"finetune_test_accuracy_per_epoch": []}
  for epoch in range(1, config.finetune.epochs + 1):
    order = jax.random.permutation(jax.random.fold_in(order_rng, epoch), size)
    epoch_metrics = []
    for index in range(size // batch_size):
      state, metrics = train_fn(
        state, device_data, order[index * batch_size : (index + 1) * batch_size]
      )
      epoch_metrics.append(metrics)
    first_step = (epoch - 1) * (size // batch_size)
    check_finite(jax.device_get(epoch_metrics), first_step, epoch)

    def evaluate_split(images, labels, state=state):
      return evaluate_fn(state, images, labels)

    scores = {"test_accuracy": evaluate_split(data.test_images, data.test_labels)["accuracy"]}
    scores.update(evaluate_target_and_rest(evaluate_split, data))
    for key, value in scores.items():
      history.setdefault(f"finetune_{key}_per_epoch", []).append(value)
    logging.info(
      "Fine-tuned epoch %d: %s.",
      epoch, ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in scores.items()),
    )  # fmt: skip
  return history
