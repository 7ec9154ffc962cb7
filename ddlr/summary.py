"""The outputs written when a run finishes: summary.json, rates.npz and the rate histogram."""

import os

import numpy as np

from ddlr import analysis, checkpoint, optim, personalisation, reporting


def write_final_outputs(run, state, loop: checkpoint.LoopRecord, finetuned: dict) -> dict:
  """Writes rates.npz, the rate histogram and summary.json of a finished run; returns the summary.

  `final_*` accuracies score the returned model: after fine-tuning when
  `finetuned` has its history, else after the last epoch.
  """
  history = loop.test_accuracy
  seconds_per_step = float(np.median(loop.seconds_per_step)) if loop.seconds_per_step else None
  summary = {
    "completed": True,
    "last_epoch_test_accuracy": history[-1],
    "best_epoch_test_accuracy": max(history),
    "best_epoch": int(np.argmax(history)) + 1,
    "test_accuracy_per_epoch": history,
    "last_epoch_test_loss": loop.test_loss[-1],
    "final_train_loss": loop.train_loss[-1],
    "train_loss_per_epoch": loop.train_loss,
    # The median resists an epoch with a one-off cost. None when no step was
    # timed (see reporting.EpochTimer).
    "seconds_per_step": seconds_per_step,
    "examples_per_second": run.config.train.batch_size / seconds_per_step
    if seconds_per_step
    else None,
    "num_params": run.num_params,
    "realised_noise_rate": float(run.data.noise_rate),
    **personalisation.history_summary(loop.target_test_accuracy, loop.rest_test_accuracy),
    **finetuned,
  }
  for key in ("test_accuracy", "target_test_accuracy", "rest_test_accuracy"):
    per_epoch = finetuned.get(f"finetune_{key}_per_epoch") or summary.get(f"{key}_per_epoch")
    if per_epoch:
      summary[f"final_{key}"] = per_epoch[-1]
  if run.config.ddlr.enabled:
    ddlr_state = optim.find_ddlr_state(state.opt_state)
    if ddlr_state.log_lr is None:  # class rates only, so every instance has multiplier 1
      log_lr = np.zeros(len(run.data.labels), np.float32)
    else:
      log_lr = np.asarray(ddlr_state.log_lr)
    class_log_lr = None if ddlr_state.class_log_lr is None else np.asarray(ddlr_state.class_log_lr)
    # Each instance's multiplier before batch normalisation is exp(a_i + b_{y_i}).
    exponent = log_lr if class_log_lr is None else log_lr + class_log_lr[run.data.labels]
    summary.update(
      reporting.rate_report(
        exponent, class_log_lr, run.data, score_noise=ddlr_state.log_lr is not None
      )
    )
    if ddlr_state.log_lr is not None:
      summary.update(personalisation.domain_auroc(exponent, run.data))
    reporting.save_rates(
      os.path.join(run.workdir, "rates.npz"), log_lr, exponent, class_log_lr, run.data
    )
    analysis.plot_rate_histogram(
      exponent,
      _histogram_groups(run.data),
      os.path.join(run.workdir, "rates_histogram.png"),
      _histogram_title(run.config.data),
      xlabel=_histogram_label(ddlr_state),
    )
  summary.update(reporting.baseline_report(run.config.baseline.name, state, run.data, run.workdir))
  reporting.write_json(os.path.join(run.workdir, "summary.json"), summary)
  return summary


def _histogram_groups(data) -> list[tuple[str, np.ndarray]]:
  """Returns the histogram's groups: rest and target domain with a target, else clean and noisy.

  The second group, usually the smaller, is drawn on top. A target run with
  noisy labels is split by domain alone, and its title names the noise.
  """
  if data.target_kind != "none":
    in_domain = np.asarray(data.is_target_domain, bool)
    return [("rest", ~in_domain), ("target domain", in_domain)]
  is_noisy = np.asarray(data.is_noisy, bool)
  return [("clean", ~is_noisy), ("noisy", is_noisy)]


def _histogram_title(data_config) -> str:
  noise = data_config.noise
  title = data_config.name
  title += ", clean labels" if noise.kind == "none" else f", {noise.kind} noise {noise.rate:g}"
  target = data_config.target
  if target.kind == "classes":
    title += f", target: classes {', '.join(str(label) for label in target.classes)}"
  elif target.kind == "transform":
    title += f", target: {target.transform} on {100 * target.fraction:g}% of images"
  return title


def _histogram_label(ddlr_state) -> str:
  if ddlr_state.class_log_lr is None:
    return "learned log learning-rate multiplier a_i (log_lr)"
  if ddlr_state.log_lr is None:
    return "learned log class multiplier b_y of each instance's label"
  return "learned log multiplier a_i + b_y (instance plus class)"
