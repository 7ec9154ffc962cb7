"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Small datasets are held in device memory; each epoch is a permutation of the
instance ids drawn from the seed and the epoch number, so the data order is
reproducible and independent of the rates. imagenet2012 streams through
tf.data with an order drawn the same way (`ddlr.input_pipeline`). The last
partial batch of an epoch is dropped so that every step has the same shape;
evaluation covers every test example.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ddlr import (
  baselines,
  checkpoint,
  input_pipeline,
  layerwise,
  losses,
  optim,
  personalisation,
  references,
  reporting,
  resume,
  steps,
)
from ddlr import data as data_lib
from ddlr import summary as summary_lib
from ddlr.config_checks import (
  ConfigError,
  check_model_deterministic,
  check_reference_batches,
  validate_config,
)
from ddlr.data import augment
from ddlr.evaluation import evaluate, evaluate_batches  # noqa: F401 (evaluate is API)
from ddlr.input_pipeline import epoch_batches  # noqa: F401 (part of this module's API)
from ddlr.models import create_model
from ddlr.optimizers import build_optimizer  # noqa: F401 (part of this module's API)
from ddlr.schedules import learning_rate_schedule


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN or infinite."""


def step_settings(config, steps_per_epoch: int = 1) -> steps.StepSettings:
  """Returns the static train-step settings of `config`.

  `steps_per_epoch` is needed only by the small-loss baseline's schedule.
  """
  # inception_crop runs in the tf.data stream, so the step itself adds none.
  augmentation = config.data.augmentation
  if augmentation not in augment.ON_DEVICE_AUGMENTATIONS:
    augmentation = "none"
  if config.baseline.name == "learning_to_reweight":
    # Learning to reweight is the `reference` alignment at the current
    # parameters with plain (unpreconditioned) gradients.
    return steps.StepSettings(
      enabled=False,
      reference="reference",
      reference_at="current",
      alignment=config.ddlr.alignment,
      reference_batch_size=config.baseline.reference_batch_size,
      preconditioner="identity",
      baseline=baselines.settings_from_config(config, steps_per_epoch),
      augmentation=augmentation,
    )
  return steps.StepSettings(
    enabled=config.ddlr.enabled,
    reference=config.ddlr.reference,
    reference_at=config.ddlr.reference_at,
    alignment=config.ddlr.alignment,
    normalize=config.ddlr.normalize,
    class_rates=config.ddlr.class_rates,
    reference_batch_size=config.ddlr.reference_batch_size,
    reference_every_steps=config.ddlr.reference_every_steps,
    split_batch_stats=config.ddlr.split_batch_stats,
    split_sequential=config.ddlr.split_sequential,
    small_loss_fraction=config.ddlr.small_loss_fraction,
    small_loss_per_class=config.ddlr.small_loss_per_class,
    preconditioner="adam" if config.optimizer.name == "adamw" else "identity",
    adam_b2=config.optimizer.b2,
    adam_eps=config.optimizer.eps,
    baseline=baselines.settings_from_config(config, steps_per_epoch),
    augmentation=augmentation,
  )


def create_train_state(
  model, tx, sample_images, rng, *, cache_reference: bool = False, baseline_state=None
) -> steps.TrainState:
  """Initialises parameters, BatchNorm statistics and optimizer state.

  With `cache_reference`, the state keeps a params-shaped reference gradient,
  zeros until the caller applies `references.refresh_reference_direction`.
  `baseline_state` is stored as given.
  """
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, sample_images, train=False)
  params = variables["params"]
  return steps.TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=state_rng,
    reference_direction=jax.tree.map(jnp.zeros_like, params) if cache_reference else None,
    baseline_state=baseline_state,
  )


def _check_finite(step_metrics: list[dict], first_step: int, epoch: int) -> None:
  names = {"train/loss": "loss", "train/grad_norm": "gradient", "train/update_norm": "update"}
  for offset, metrics in enumerate(step_metrics):
    non_finite = [name for key, name in names.items() if not math.isfinite(metrics[key])]
    if not bool(metrics.get("ddlr/rates_finite", True)):
      non_finite.append("per-instance or class rates of the batch")
    if non_finite:
      raise NonFiniteLossError(
        f"non-finite {', '.join(non_finite)} at step {first_step + offset + 1} (epoch {epoch}): "
        f"loss={metrics['train/loss']}, grad_norm={metrics['train/grad_norm']}, "
        f"update_norm={metrics['train/update_norm']}. Stopping; the checkpoints and "
        "outputs written before this step are kept."
      )


@dataclasses.dataclass
class _Run:
  """Data, schedule and jitted steps of one run, built once per process."""

  config: ml_collections.ConfigDict
  workdir: str
  data: data_lib.TrainingData
  inputs: Any  # input_pipeline.DeviceInputs or StreamedInputs
  device_data: steps.DeviceData
  learning_rate: optax.Schedule
  train_fn: Any
  # Recomputes the reused reference gradient; None unless reference_every_steps > 1.
  refresh_fn: Any
  eval_fn: Any
  steps_per_epoch: int
  total_steps: int
  num_params: int


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured model, evaluates after every epoch and writes the outputs.

  Rerunning with the same workdir resumes from its latest checkpoint; for a
  finished run it reads and returns `summary.json`, writing nothing. Writes
  to `workdir`: `config.json`, `split_record.npz`, `checkpoints/`,
  `metrics.jsonl` and TensorBoard event files, and at the end `rates.npz`,
  `rates_histogram.png` and `summary.json`. The run holds a lock on the
  workdir until it returns, so a second run in the same workdir stops at
  once.

  Returns:
    The summary: last- and best-epoch test accuracy, rate statistics, AUROC of
    the rates against the corruption mask, and timing. A run stopped by
    `config.train.stop_after_steps` returns `{"completed": False, "step": ...,
    "total_steps": ...}`, the step it reached and the step it would end at.

  Raises:
    ConfigError, DataError, checkpoint.ResumeError: for invalid input.
    NonFiniteLossError: when the loss diverges; the last checkpoint is kept.
  """
  validate_config(config)
  missing = resume.missing_directories(workdir)
  resume.make_workdir(workdir)
  checkpoint_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  # A run rejected before training, e.g. for data that cannot be read, leaves
  # no empty workdir or checkpoints/ behind. The workdir is removed only while
  # the lock is held, so a run rejected because another run holds it keeps it.
  with (
    resume.hold_workdir(workdir),
    resume.removed_if_rejected(workdir, missing),
    resume.removed_if_rejected(checkpoint_dir),
  ):
    return _train_and_evaluate_in(config, workdir)


def _train_and_evaluate_in(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `train_and_evaluate` in a workdir that this process holds."""
  logging.info("Config:\n%s", config)
  if not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
    # Before the manager creates the directory, so a rejected workdir stays as it was.
    resume.check_no_final_outputs(workdir)
  manager = checkpoint.create_manager(workdir, config.checkpoint.max_to_keep)
  try:
    resuming = manager.latest_step() is not None
    config_path = os.path.join(workdir, "config.json")
    if resuming:
      resume.check_run_record(workdir)
      changed = resume.check_resumable_config(config_path, config)
    else:
      resume.check_no_final_outputs(workdir)
    data = _load_data(config, workdir, resuming)
    run, state = _build(config, workdir, data)

    loop = checkpoint.LoopRecord(num_instances=len(data.labels))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if resuming:
      state, loop = checkpoint.restore_latest(manager, state, len(data.labels))
      _check_resume_point(run, int(state.step), loop)
      summary_path = os.path.join(workdir, "summary.json")
      if int(state.step) == run.total_steps and os.path.exists(summary_path):
        logging.info("The run has finished all %d steps; see %s.", run.total_steps, summary_path)
        return resume.read_summary(summary_path)
      resume.set_aside_final_outputs(workdir, int(state.step), run.total_steps, run.steps_per_epoch)
      resume.log_config_changes(changed)
    elif os.path.exists(metrics_path):
      logging.warning(
        "No checkpoint in %s: starting afresh and clearing %s.", workdir, metrics_path
      )
    # Written only after every resume check passed, because sweeps compare it
    # with their config to decide whether a finished run can be reused. A
    # finished run trains no further, so its file keeps the config it trained with.
    if int(state.step) < run.total_steps:
      reporting.write_json(config_path, json.loads(config.to_json()))
    resume.truncate_metrics(metrics_path, int(state.step))
    state, completed = _train(run, state, loop, manager)
  finally:
    manager.close()
  if not completed:
    return {"completed": False, "step": int(state.step), "total_steps": run.total_steps}
  finetuned = _finetune(run, state) if config.finetune.epochs else {}
  return summary_lib.write_final_outputs(run, state, loop, finetuned)


def _finetune(run: _Run, state) -> dict:
  """Fine-tunes on the target sample; see `personalisation.finetune`."""
  uniform = ml_collections.ConfigDict(run.config.to_dict())
  uniform.ddlr.enabled = False
  tx = build_optimizer(
    uniform,
    num_instances=len(run.data.reference_labels),
    num_classes=run.data.num_classes,
    learning_rate=run.config.finetune.learning_rate,
  )
  batch_size = run.config.eval.batch_size

  def evaluate_fn(state, images, labels):
    return evaluate(run.eval_fn, state, images, labels, batch_size)

  return personalisation.finetune(
    run.config, run.data, state, tx=tx, evaluate_fn=evaluate_fn, check_finite=_check_finite
  )


def _load_data(config, workdir: str, resuming: bool) -> data_lib.TrainingData:
  """Loads the dataset and records its split, or checks it against the record when resuming."""
  data = data_lib.load_dataset(config.data)
  # Before the split record is written, so a rejected config leaves no new file.
  num_train = len(data.labels)
  if config.train.batch_size > num_train:
    raise data_lib.DataError(
      f"config.train.batch_size={config.train.batch_size} exceeds the {num_train} training "
      f"instances; set it to at most {num_train}."
    )
  check_reference_batches(config, len(data.reference_labels), num_train)
  record_path = os.path.join(workdir, "split_record.npz")
  if resuming and os.path.exists(record_path):
    resume.check_split_record(record_path, data)
  else:
    data_lib.save_split_record(data, record_path)
  logging.info(
    "Data: %d training instances (%.1f%% corrupted, %s), %d reference, %d test, %d classes.",
    len(data.labels), 100 * data.noise_rate, config.data.noise.kind,
    len(data.reference_labels), len(data.test_labels), data.num_classes,
  )  # fmt: skip
  return data


def _build(config, workdir: str, data) -> tuple[_Run, steps.TrainState]:
  """Builds the model, optimizer, jitted steps and the initial train state."""
  num_instances = len(data.labels)
  batch_size = config.train.batch_size
  steps_per_epoch = num_instances // batch_size
  total_steps = steps_per_epoch * config.train.num_epochs
  learning_rate = learning_rate_schedule(config.optimizer, total_steps, steps_per_epoch)
  model = create_model(config.model, data.num_classes)
  tx = build_optimizer(
    config, num_instances=num_instances, num_classes=data.num_classes, learning_rate=learning_rate
  )
  rng = jax.random.key(config.seed)
  settings = step_settings(config, steps_per_epoch)
  inputs = input_pipeline.create_inputs(data, jax.random.fold_in(rng, 1), config.seed, batch_size)
  device_data = inputs.device_data()
  state = create_train_state(
    model, tx, inputs.sample_images(), rng, cache_reference=references.caches_reference(settings),
    baseline_state=baselines.init_state(config, num_instances, data.num_classes),
  )  # fmt: skip
  check_model_deterministic(
    model, state.batch_stats, state.params, inputs.sample_images(), model_name=config.model.name
  )
  settings = _resolve_alignment(settings, model, state, inputs.sample_images(), data.num_classes)
  refresh_fn = None
  if references.caches_reference(settings):
    refresh_fn = jax.jit(
      functools.partial(references.refresh_reference_direction, model=model, settings=settings),
      donate_argnums=0,
    )
    state = refresh_fn(state, device_data)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model %s: %d parameters.", config.model.name, num_params)
  run = _Run(
    config=config,
    workdir=workdir,
    data=data,
    inputs=inputs,
    device_data=device_data,
    learning_rate=learning_rate,
    train_fn=jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx, settings=settings),
      donate_argnums=0,
    ),
    eval_fn=jax.jit(functools.partial(steps.eval_step, model=model)),
    refresh_fn=refresh_fn,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    num_params=int(num_params),
  )
  return run, state


def _check_resume_point(run: _Run, start_step: int, loop: checkpoint.LoopRecord) -> None:
  """Raises ResumeError unless the restored step and loop record fit this run."""
  first_epoch = start_step // run.steps_per_epoch + 1
  for name, history in (("evaluated", loop.test_accuracy), ("train-loss", loop.train_loss)):
    if len(history) != first_epoch - 1:
      raise checkpoint.ResumeError(
        f"the checkpoint at step {start_step} records {len(history)} {name} epochs, expected "
        f"{first_epoch - 1}; the checkpoint directory is inconsistent."
      )
  if start_step > run.total_steps:
    raise checkpoint.ResumeError(
      f"the checkpoint at step {start_step} is past the end of this run "
      f"(config.train.num_epochs={run.config.train.num_epochs} gives {run.total_steps} "
      "steps); raise config.train.num_epochs or use a new --workdir."
    )


def _resolve_alignment(settings, model, state, sample_images, num_classes):
  """Returns `settings` with alignment 'auto' or 'layerwise' replaced by the path to use.

  Raises:
    ConfigError: for alignment 'layerwise' on a model where it does not apply.
  """
  if settings.alignment not in ("auto", "layerwise"):
    return settings
  if not settings.enabled and settings.alignment == "auto":
    # Without ddlr only learning to reweight scores examples, and it does so
    # before the backward pass, where jvp is the cheaper path.
    return dataclasses.replace(settings, alignment="jvp")
  # A small random batch suffices: the check compares two exact paths.
  images = np.random.default_rng(0).normal(size=(4, *sample_images.shape[1:]))
  loss_fn = losses.make_loss_fn(
    model, state.batch_stats, jnp.asarray(images, jnp.float32), jnp.arange(4) % num_classes
  )
  alignment, reason = layerwise.choose_alignment(
    settings.alignment, settings.enabled, loss_fn, state.params, state.batch_stats
  )
  if alignment is None:
    raise ConfigError(
      f"config.ddlr.alignment='layerwise' does not apply: {reason}. Use 'auto' or 'jvp'."
    )
  logging.info("Alignment: %s%s.", alignment, f", because {reason}" if reason else "")
  return dataclasses.replace(settings, alignment=alignment)


def _train(run: _Run, state, loop: checkpoint.LoopRecord, manager) -> tuple[Any, bool]:
  """Runs the remaining steps; returns the state and whether all epochs finished."""
  config = run.config
  start_step = int(state.step)
  first_epoch = start_step // run.steps_per_epoch + 1
  _check_resume_point(run, start_step, loop)
  if start_step >= run.total_steps:
    logging.info("The run has finished all %d steps; writing its final outputs.", start_step)
  elif start_step:
    logging.info("Resuming at step %d (epoch %d).", start_step, first_epoch)
  if start_step % run.steps_per_epoch == 0:
    # Nothing of this epoch is done yet. Also clears the unknown (NaN) sum of a
    # loop record written before the per-epoch train loss was kept.
    loop.epoch_loss_sum, loop.epoch_loss_steps = 0.0, 0
  every_steps, stop_after = config.checkpoint.every_steps, config.train.stop_after_steps
  if stop_after and start_step >= stop_after and start_step < run.total_steps:
    logging.warning(
      "The run is at step %d, not before config.train.stop_after_steps=%d; stopping.",
      start_step, stop_after,
    )  # fmt: skip
    return state, False
  metrics_log = reporting.MetricsLog(run.workdir)
  progress = reporting.Progress(run.total_steps, config.train.batch_size, first_step=start_step)
  pending, timer = [], reporting.EpochTimer()
  try:
    for epoch in range(first_epoch, config.train.num_epochs + 1):
      timer.start_epoch(int(state.step))
      first_index = int(state.step) - (epoch - 1) * run.steps_per_epoch
      inputs = run.inputs.train_inputs(epoch, first_index)
      for index, step_inputs in zip(range(first_index, run.steps_per_epoch), inputs, strict=True):
        step = (epoch - 1) * run.steps_per_epoch + index + 1  # steps done after this one
        state, step_metrics = run.train_fn(state, run.device_data, *step_inputs)
        if run.refresh_fn is not None and step % config.ddlr.reference_every_steps == 0:
          state = run.refresh_fn(state, run.device_data)
        pending.append(step_metrics)
        epoch_end = index == run.steps_per_epoch - 1
        # At an epoch end the checkpoint follows the evaluation, so that a
        # resumed run finds every finished epoch evaluated.
        stop_now = step == stop_after
        save_due = (every_steps and step % every_steps == 0 or stop_now) and not epoch_end
        if step % config.train.log_every_steps == 0 or epoch_end or save_due:
          _report_steps(run, state, pending, step, epoch, metrics_log, progress, loop)
          pending = []
        if save_due:
          checkpoint.save(manager, state, loop)
        if stop_now and not epoch_end:
          logging.info("Stopping after step %d as config.train.stop_after_steps asks.", step)
          return state, False
        timer.step_done(state, step)
      seconds_per_step = timer.end_epoch(state, int(state.step))
      if seconds_per_step is not None:
        loop.seconds_per_step.append(seconds_per_step)
      _evaluate_epoch(run, state, loop, epoch, metrics_log)
      checkpoint.save(manager, state, loop)
      if int(state.step) == stop_after and int(state.step) < run.total_steps:
        logging.info("Stopping after step %d as config.train.stop_after_steps asks.", stop_after)
        return state, False
  finally:
    metrics_log.close()
  return state, True


def _report_steps(run, state, pending, step, epoch, metrics_log, progress, loop) -> None:
  """Checks the pending steps' metrics, logs their average and adds their losses to `loop`."""
  pending = jax.device_get(pending)
  _check_finite(pending, step - len(pending), epoch)
  for metrics in pending:
    loop.epoch_loss_sum += float(metrics["train/loss"])
  loop.epoch_loss_steps += len(pending)
  if run.config.ddlr.enabled:
    optim.raise_if_invalid_ids(state.opt_state)
  averaged = {key: float(np.mean([m[key] for m in pending])) for key in pending[0]}
  rate_stats = (
    reporting.table_rate_stats(state.opt_state, run.data.labels) if run.config.ddlr.enabled else {}
  )
  speed = progress.update(step)
  lr_now = float(run.learning_rate(step - 1))
  metrics_log.write(
    step,
    {
      **averaged,
      **rate_stats,
      "train/learning_rate": lr_now,
      "train/steps_per_second": speed["steps_per_second"],
    },
  )
  reporting.log_progress(
    step, run.total_steps, epoch, averaged,
    {k.removeprefix("ddlr/"): v for k, v in rate_stats.items()}, speed, lr_now,
  )  # fmt: skip


def _evaluate_epoch(run, state, loop, epoch: int, metrics_log) -> None:
  train_loss = loop.epoch_loss_sum / loop.epoch_loss_steps
  loop.train_loss.append(train_loss)
  loop.epoch_loss_sum, loop.epoch_loss_steps = 0.0, 0
  batch_size = run.config.eval.batch_size
  test = evaluate_batches(run.eval_fn, state, run.inputs.eval_batches(batch_size), batch_size)
  loop.test_accuracy.append(test["accuracy"])
  loop.test_loss.append(test["loss"])
  target = personalisation.evaluate_target_and_rest(
    lambda images, labels: evaluate(run.eval_fn, state, images, labels, batch_size), run.data
  )
  if target:
    loop.target_test_accuracy.append(target["target_test_accuracy"])
    loop.rest_test_accuracy.append(target["rest_test_accuracy"])
    logging.info(
      "Epoch %d: target test accuracy %.4f, rest of test accuracy %.4f.",
      epoch, target["target_test_accuracy"], target["rest_test_accuracy"],
    )  # fmt: skip
  metrics_log.write(
    epoch * run.steps_per_epoch,
    {
      "eval/accuracy": test["accuracy"],
      "eval/loss": test["loss"],
      "eval/examples": test["count"],
      "train/epoch_loss": train_loss,
      "epoch": epoch,
      **{f"eval/{key}": value for key, value in target.items()},
    },
  )
  logging.info(
    "Evaluated epoch %d: test accuracy %.4f, test loss %.4f (best so far %.4f).",
    epoch, test["accuracy"], test["loss"], max(loop.test_accuracy),
  )  # fmt: skip
