"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Small datasets are held in device memory; each epoch is a permutation of the
instance ids drawn from the seed and the epoch number, so the data order is
reproducible and independent of the rates. The last partial batch of an epoch
is dropped so that every step has the same shape; evaluation covers every test
example.
"""

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ddlr import analysis, optim, reporting, steps
from ddlr import data as data_lib
from ddlr.config_checks import validate_config
from ddlr.models import create_model


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN or infinite."""


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch):
  """Returns the base learning-rate schedule: optional linear warm-up, then constant or cosine."""
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "constant":
    main = optax.constant_schedule(config.learning_rate)
  else:
    main = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - warmup_steps, 1))
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def build_optimizer(config, *, num_instances, num_classes, learning_rate):
  """Returns the base optimizer, wrapped by `optim.ddlr` when the config enables it."""
  opt = config.optimizer
  if opt.name == "adamw":
    base = optax.adamw(
      learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay
    )
  else:
    momentum = {"sgd": None, "momentum": opt.momentum, "nesterov": opt.momentum}[opt.name]
    base = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=opt.name == "nesterov"),
    )
  if not config.ddlr.enabled:
    return base
  settings = config.ddlr
  return optim.ddlr(
    base,
    num_instances=num_instances,
    learning_rate=learning_rate,
    hyper_learning_rate=settings.hyper_learning_rate,
    hyper_momentum=settings.hyper_momentum,
    instance_rates=settings.instance_rates,
    num_classes=num_classes if settings.class_rates else None,
    init_log_lr=settings.init_log_lr,
    log_lr_decay=settings.log_lr_decay,
    log_lr_min=settings.log_lr_min,
    log_lr_max=settings.log_lr_max,
    normalize=settings.normalize,
    hypergradient_scale=settings.hypergradient_scale,
  )


def step_settings(config) -> steps.StepSettings:
  """Returns the static train-step settings of `config`."""
  return steps.StepSettings(
    enabled=config.ddlr.enabled,
    reference=config.ddlr.reference,
    reference_at=config.ddlr.reference_at,
    alignment=config.ddlr.alignment,
    normalize=config.ddlr.normalize,
    class_rates=config.ddlr.class_rates,
    reference_batch_size=config.ddlr.reference_batch_size,
    preconditioner="adam" if config.optimizer.name == "adamw" else "identity",
    adam_b2=config.optimizer.b2,
    adam_eps=config.optimizer.eps,
  )


def create_train_state(model, tx, sample_images, rng) -> steps.TrainState:
  """Initialises parameters, BatchNorm statistics and optimizer state."""
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, sample_images, train=False)
  params = variables["params"]
  return steps.TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=state_rng,
  )


def evaluate(eval_fn, state, images, labels, batch_size) -> dict[str, float]:
  """Returns accuracy and mean loss over every example of (images, labels)."""
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for start in range(0, len(labels), batch_size):
    batch_images = images[start : start + batch_size]
    batch_labels = labels[start : start + batch_size]
    size = len(batch_labels)
    # Padding the last batch keeps one compiled shape; the mask drops the padding.
    padding = batch_size - size
    mask = np.concatenate([np.ones(size, np.float32), np.zeros(padding, np.float32)])
    batch_images = np.concatenate(
      [batch_images, np.zeros((padding, *images.shape[1:]), images.dtype)]
    )
    batch_labels = np.concatenate([batch_labels, np.zeros(padding, labels.dtype)])
    sums = eval_fn(state.params, state.batch_stats, batch_images, batch_labels, mask)
    for key, value in jax.device_get(sums).items():
      totals[key] += float(value)
  return {"accuracy": totals["correct"] / totals["count"], "loss": totals["loss"] / totals["count"]}


def _check_finite(step_metrics: list[dict], first_step: int, epoch: int) -> None:
  for offset, metrics in enumerate(step_metrics):
    if not (math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/grad_norm"])):
      raise NonFiniteLossError(
        f"non-finite training loss or gradient at step {first_step + offset + 1} "
        f"(epoch {epoch}): loss={metrics['train/loss']}, "
        f"grad_norm={metrics['train/grad_norm']}. Stopping; what the run wrote "
        "before this step is kept."
      )


def _log_progress(step, total_steps, epoch, metrics, rate_stats, speed, learning_rate):
  rates = ""
  if rate_stats:
    rates = (
      f" | rate q10/50/90 {rate_stats['rate_q10']:.3f}/{rate_stats['rate_median']:.3f}/"
      f"{rate_stats['rate_q90']:.3f}"
    )
  logging.info(
      "step %d/%d epoch %d | loss %.4f acc %.3f lr %.4f%s | %.1f steps/s %.0f ex/s ETA %s",
      step, total_steps, epoch, metrics["train/loss"], metrics["train/accuracy"],
      learning_rate, rates, speed["steps_per_second"], speed["examples_per_second"],
      reporting.format_duration(speed["eta_seconds"]),
  )  # fmt: skip


def _table_rate_stats(opt_state) -> dict[str, float]:
  """Returns quantiles of the instance multipliers (one device-to-host copy)."""
  state = optim.find_ddlr_state(opt_state)
  if not state.log_lr.shape[0]:
    return {}
  quantiles = jnp.exp(jnp.quantile(state.log_lr, jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])))
  names = ("rate_min", "rate_q10", "rate_median", "rate_q90", "rate_max")
  return {f"ddlr/{name}": float(value) for name, value in zip(names, quantiles, strict=True)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured model, evaluates after every epoch and writes the outputs.

  Writes to `workdir`: `config.json`, `split_record.npz`, `metrics.jsonl` and
  TensorBoard event files, `rates.npz`, `rates_histogram.png` and
  `summary.json`.

  Returns:
    The summary: last- and best-epoch test accuracy, rate statistics, AUROC of
    the rates against the corruption mask, and timing.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  logging.info("Config:\n%s", config)
  reporting.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

  # Stage 1: data, held on the device.
  data = data_lib.load_dataset(config.data)
  data_lib.save_split_record(data, os.path.join(workdir, "split_record.npz"))
  num_instances = len(data.labels)
  logging.info(
      "Data: %d training instances (%.1f%% corrupted, %s), %d reference, %d test, %d classes.",
      num_instances, 100 * data.noise_rate, config.data.noise.kind,
      len(data.reference_labels), len(data.test_labels), data.num_classes,
  )  # fmt: skip
  if (
    config.ddlr.enabled and config.ddlr.reference == "reference" and not len(data.reference_labels)
  ):
    raise data_lib.DataError(
      "config.ddlr.reference='reference' needs a reference split; "
      "set config.data.reference_size > 0."
    )
  device_data = steps.DeviceData(
    train_images=jnp.asarray(data.images),
    train_labels=jnp.asarray(data.labels),
    reference_images=jnp.asarray(data.reference_images),
    reference_labels=jnp.asarray(data.reference_labels),
  )

  # Stage 2: model, optimizer and jitted steps.
  batch_size = config.train.batch_size
  steps_per_epoch = num_instances // batch_size
  if steps_per_epoch == 0:
    raise data_lib.DataError(
      f"config.train.batch_size={batch_size} exceeds the {num_instances} training instances."
    )
  total_steps = steps_per_epoch * config.train.num_epochs
  learning_rate = learning_rate_schedule(config.optimizer, total_steps, steps_per_epoch)
  model = create_model(config.model, data.num_classes)
  tx = build_optimizer(
    config, num_instances=num_instances, num_classes=data.num_classes, learning_rate=learning_rate
  )
  rng = jax.random.key(config.seed)
  state = create_train_state(model, tx, data.images[:1], rng)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model %s: %d parameters.", config.model.name, num_params)
  train_fn = jax.jit(
    functools.partial(steps.train_step, model=model, tx=tx, settings=step_settings(config)),
    donate_argnums=0,
  )
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model))

  # Stage 3: the epochs.
  metrics_log = reporting.MetricsLog(workdir)
  progress = reporting.Progress(total_steps, batch_size)
  order_rng = jax.random.fold_in(rng, 1)
  history, step_times = [], []
  pending, pending_first = [], 0
  try:
    for epoch in range(1, config.train.num_epochs + 1):
      epoch_start = time.perf_counter()
      order = jax.random.permutation(jax.random.fold_in(order_rng, epoch), num_instances)
      batches = order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
      for index in range(steps_per_epoch):
        step = (epoch - 1) * steps_per_epoch + index
        state, step_metrics = train_fn(state, device_data, batches[index])
        if not pending:
          pending_first = step
        pending.append(step_metrics)
        if (step + 1) % config.train.log_every_steps == 0 or index == steps_per_epoch - 1:
          pending = jax.device_get(pending)
          _check_finite(pending, pending_first, epoch)
          if config.ddlr.enabled:
            optim.raise_if_invalid_ids(state.opt_state)
          averaged = {key: float(np.mean([m[key] for m in pending])) for key in pending[0]}
          rate_stats = _table_rate_stats(state.opt_state) if config.ddlr.enabled else {}
          speed = progress.update(step + 1)
          lr_now = float(learning_rate(step))
          metrics_log.write(
              step + 1,
              {**averaged, **rate_stats, "train/learning_rate": lr_now,
               "train/steps_per_second": speed["steps_per_second"]},
          )  # fmt: skip
          _log_progress(
              step + 1, total_steps, epoch, averaged,
              {k.removeprefix("ddlr/"): v for k, v in rate_stats.items()}, speed, lr_now,
          )  # fmt: skip
          pending = []
      jax.block_until_ready(state)
      step_times.append((time.perf_counter() - epoch_start) / steps_per_epoch)

      test = evaluate(eval_fn, state, data.test_images, data.test_labels, config.eval.batch_size)
      history.append(test["accuracy"])
      last_test_loss = test["loss"]
      metrics_log.write(
        (epoch) * steps_per_epoch,
        {"eval/accuracy": test["accuracy"], "eval/loss": test["loss"], "epoch": epoch},
      )
      logging.info(
          "Evaluated epoch %d: test accuracy %.4f, test loss %.4f (best so far %.4f).",
          epoch, test["accuracy"], test["loss"], max(history),
      )  # fmt: skip
  finally:
    metrics_log.close()

  # Stage 4: final rates, plots and summary.
  summary = {
    "last_epoch_test_accuracy": history[-1],
    "best_epoch_test_accuracy": max(history),
    "best_epoch": int(np.argmax(history)) + 1,
    "test_accuracy_per_epoch": history,
    "last_epoch_test_loss": last_test_loss,
    "final_train_loss": averaged["train/loss"],
    # The first epoch includes compilation, so the median is the steady rate.
    "seconds_per_step": float(np.median(step_times)),
    "examples_per_second": batch_size / float(np.median(step_times)),
    "num_params": int(num_params),
    "realised_noise_rate": float(data.noise_rate),
  }
  if config.ddlr.enabled:
    ddlr_state = optim.find_ddlr_state(state.opt_state)
    log_lr = np.asarray(ddlr_state.log_lr)
    class_log_lr = np.asarray(ddlr_state.class_log_lr)
    if not len(log_lr):
      log_lr = np.zeros(num_instances, np.float32)
    summary.update(reporting.rate_report(log_lr, class_log_lr, data))
    reporting.save_rates(os.path.join(workdir, "rates.npz"), log_lr, class_log_lr, data)
    plot_path = os.path.join(workdir, "rates_histogram.png")
    title = f"{config.data.name}, {config.data.noise.kind} noise {config.data.noise.rate:g}"
    analysis.plot_rate_histogram(log_lr, data.is_noisy, plot_path, title)
  reporting.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
