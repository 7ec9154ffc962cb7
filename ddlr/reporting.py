"""Run outputs: metrics a person can plot, progress lines and final files."""

import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epy

from ddlr import analysis, baselines, optim, optimizer_state, personalisation
from ddlr.baselines import hypergradient

# clu's summary writer imports TensorFlow, about 3 s, so it is imported when
# the first run writes metrics: a command that stops at a config or flag
# error then ends sooner.
with epy.lazy_imports():
  from clu import metric_writers


class MetricsLog:
  """Writes scalars to TensorBoard event files, to `metrics.jsonl` and to the log."""

  def __init__(self, workdir: str):
    # The progress line already shows these scalars, so only event files are written here.
    self._writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    self._jsonl_path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Appends one record of `scalars` at `step` to every sink.

    NaN and infinite values are written as null to metrics.jsonl.
    """
    scalars = {key: float(value) for key, value in scalars.items()}
    self._writer.write_scalars(step, scalars)
    record = _json_compatible({"step": step, **scalars})
    with open(self._jsonl_path, "a") as f:
      f.write(json.dumps(record, allow_nan=False) + "\n")

  def close(self) -> None:
    """Flushes and closes the event files."""
    self._writer.flush()
    self._writer.close()


class Progress:
  """Measures steps per second and the time left between two log lines."""

  def __init__(self, total_steps: int, batch_size: int, first_step: int = 0):
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._last_step = first_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    """Returns steps/s, examples/s and the estimated seconds left at `step`."""
    now = time.perf_counter()
    steps_per_second = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return {
      "steps_per_second": steps_per_second,
      "examples_per_second": steps_per_second * self._batch_size,
      "eta_seconds": (self._total_steps - step) / max(steps_per_second, 1e-9),
    }


class EpochTimer:
  """Measures the mean seconds per training step of each epoch.

  The first step after every start of the process, fresh or resumed, is not
  timed: it includes the compilation of the jitted step, which can take longer
  than many steps together. Timing it would inflate the epoch where a run resumes.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._compiled = False
    self._start_time = None
    self._start_step = 0

  def start_epoch(self, step: int) -> None:
    """Starts timing an epoch that begins after `step` steps."""
    if self._compiled:
      self._start_time, self._start_step = self._clock(), step

  def step_done(self, state, step: int) -> None:
    """Starts the clock after the first step of the process, once `state` is computed."""
    if not self._compiled:
      jax.block_until_ready(state)
      self._compiled = True
      self._start_time, self._start_step = self._clock(), step

  def end_epoch(self, state, step: int) -> float | None:
    """Returns the epoch's seconds per timed step, or None when no step of it was timed.

    That is the case when the first step of the process was the epoch's last one.
    """
    jax.block_until_ready(state)
    timed_steps = step - self._start_step
    if self._start_time is None or timed_steps == 0:
      return None
    return (self._clock() - self._start_time) / timed_steps


def format_duration(seconds: float) -> str:
  """Formats seconds as `1h02m`, `3m05s` or `12s`."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def log_progress(step, total_steps, epoch, metrics, rate_stats, speed, learning_rate) -> None:
  """Logs one progress line: step, loss, accuracy, learning rate, rate quantiles, speed and ETA."""
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
      format_duration(speed["eta_seconds"]),
  )  # fmt: skip


def table_rate_stats(opt_state, labels) -> dict[str, float]:
  """Returns quantiles of the multipliers exp(a_i + b_{y_i}) (one device-to-host copy).

  `labels` [N] are the training instances' observed labels, which pick each
  instance's class rate b_{y_i} when class rates are on, as in summary.json.
  """
  state = optim.find_ddlr_state(opt_state)
  exponent = state.log_lr
  if state.class_log_lr is not None:
    class_exponent = state.class_log_lr[jnp.asarray(labels)]
    exponent = class_exponent if exponent is None else exponent + class_exponent
  if exponent is None:
    return {}
  quantiles = jnp.exp(jnp.quantile(exponent, jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])))
  names = ("rate_min", "rate_q10", "rate_median", "rate_q90", "rate_max")
  return {f"ddlr/{name}": float(value) for name, value in zip(names, quantiles, strict=True)}


def _json_compatible(value):
  """Returns `value` with every NaN or infinite float, nested or not, replaced by None.

  JSON has no literal for these floats. Python's json module would write a
  bare `NaN`, which strict parsers such as JavaScript's JSON.parse reject.
  """
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {key: _json_compatible(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_compatible(item) for item in value]
  return value


def write_json(path: str, payload: dict) -> None:
  """Writes `payload` as indented JSON, replacing the file atomically.

  NaN and infinite floats are written as null (see `_json_compatible`).
  """
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(_json_compatible(payload), f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")
  os.replace(temporary, path)


def rate_report(log_lr, class_log_lr, data, *, score_noise: bool = True) -> dict[str, float]:
  """Returns rate statistics and, for noisy data, how well the rates find the noise.

  `log_lr` is each instance's log multiplier, a_i + b_{y_i}. `auroc` is the
  probability that a clean instance has a higher rate than a noisy one, and
  `noisy_precision_lowest_10pct` is the share of noisy instances among the 10%
  lowest rates; both are left out when `score_noise` is false (class rates
  alone cannot tell instances of one class apart).
  """
  report = analysis.rate_summary(log_lr, data.labels, data.num_classes)
  if class_log_lr is not None:
    for label, value in enumerate(np.exp(class_log_lr)):
      report[f"class_{label}_class_rate"] = float(value)
  if score_noise and data.is_noisy.any() and not data.is_noisy.all():
    report["auroc"] = analysis.auroc(log_lr, ~data.is_noisy)
    report["noisy_precision_lowest_10pct"] = analysis.precision_of_lowest(
      log_lr, data.is_noisy, 0.1
    )
  return report


def save_rates(path: str, log_lr, exponent, class_log_lr, data) -> None:
  """Writes the final rates with the labels, the corruption mask and the target-domain mask (.npz).

  `log_lr` is the instance table a, `exponent` is a_i + b_{y_i}, and the saved
  `rate` is exp(exponent), each instance's multiplier before batch
  normalisation.
  """
  np.savez(
    path,
    ids=np.arange(len(data.labels)),
    log_lr=np.asarray(log_lr),
    rate=np.exp(np.asarray(exponent)),
    class_log_lr=np.zeros(0, np.float32) if class_log_lr is None else np.asarray(class_log_lr),
    labels=data.labels,
    true_labels=data.true_labels,
    is_noisy=data.is_noisy,
    source_index=data.source_index,
    is_target_domain=data.is_target_domain,
  )
  logging.info("Saved the per-instance rates to %s.", path)


def baseline_report(name: str, state, data, workdir: str) -> dict[str, float]:
  """Scores a baseline's per-instance table against the corruption mask and saves it.

  Writes `baseline_scores.npz` (per instance id: `score`, higher for
  instances the method treats as clean, with labels and the corruption mask)
  for methods that keep a table. Returns `auroc` (probability that a clean
  instance scores above a noisy one) and `noisy_precision_lowest_10pct`
  (share of noisy instances among the 10% lowest scores) when the data has
  both clean and noisy instances, the hypergradient baseline's final learned
  rate, and Data Parameters' class temperatures; an empty dict for `none`.
  """
  report = {}
  if name == "hypergradient":
    learning_rate = optimizer_state.find_state_field(
      state.opt_state, hypergradient.HypergradientState, "learning_rate"
    )
    report["hypergradient_learning_rate"] = float(learning_rate)
  if name == "data_parameters":
    for label, value in enumerate(np.exp(np.asarray(state.baseline_state.log_class_temperature))):
      report[f"class_{label}_temperature"] = float(value)
  scores = baselines.instance_scores(name, state.baseline_state)
  if scores is None:
    return report
  if data.is_noisy.any() and not data.is_noisy.all():
    report["auroc"] = analysis.auroc(scores, ~data.is_noisy)
    report["noisy_precision_lowest_10pct"] = analysis.precision_of_lowest(
      scores, data.is_noisy, 0.1
    )
  path = os.path.join(workdir, "baseline_scores.npz")
  np.savez(
    path,
    ids=np.arange(len(data.labels)),
    score=scores,
    labels=data.labels,
    true_labels=data.true_labels,
    is_noisy=data.is_noisy,
    source_index=data.source_index,
  )
  logging.info("Saved the per-instance %s scores to %s.", name, path)
  return report


def summary_lines(summary: dict, config) -> list[str]:
  """Formats the headline results of a finished run's summary as lines for the terminal."""
  lines = [
    f"last-epoch test accuracy {summary['last_epoch_test_accuracy']:.4f} | "
    f"best-epoch test accuracy {summary['best_epoch_test_accuracy']:.4f} "
    f"(epoch {summary['best_epoch']})"
  ]
  if "auroc" in summary:
    # A baseline's `auroc` scores its own per-instance table (baseline_scores.npz), not rates.
    if config.ddlr.enabled:
      scored, lowest = "learned rates", "rates"
    else:
      scored, lowest = f"{config.baseline.name} scores", "scores"
    lines.append(
      f"AUROC of {scored} (clean above noisy) {_format_score(summary['auroc'], '.4f')} | "
      f"noisy share of the 10% lowest {lowest} "
      f"{_format_score(summary['noisy_precision_lowest_10pct'], '.3f')}"
    )
  finetune_epochs = len(summary.get("finetune_test_accuracy_per_epoch", []))
  if finetune_epochs:
    # The lines above score the model before fine-tuning, and final_* the model returned.
    data_name = personalisation.finetune_data_name(config.data.target.kind)
    lines.append(
      f"test accuracy after fine-tuning {summary['final_test_accuracy']:.4f} "
      f"({finetune_epochs} epoch{'' if finetune_epochs == 1 else 's'} on the {data_name})"
    )
  if "final_target_test_accuracy" in summary:
    lines.append(
      f"target-test accuracy {summary['final_target_test_accuracy']:.4f} | "
      f"rest-of-test accuracy {summary['final_rest_test_accuracy']:.4f}"
      + (" (after fine-tuning)" if finetune_epochs else "")
    )
  if "target_domain_auroc" in summary:
    lines.append(
      "AUROC of learned rates (target-domain training images above the rest) "
      f"{_format_score(summary['target_domain_auroc'], '.4f')}"
    )
  return lines


def _format_score(value: float | None, spec: str) -> str:
  """Formats a score that can be undefined: NaN, or null as summary.json stores NaN, reads n/a."""
  if value is None or math.isnan(value):
    return "n/a"
  return format(value, spec)
