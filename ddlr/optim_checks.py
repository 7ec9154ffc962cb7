"""Argument checks of the `ddlr` transformation (`ddlr.optim`).

Concrete values are checked when the transformation is built and on every
`update` call outside jit. Values traced under jit cannot be read, so they
pass here, and `optim.ddlr`'s docstring describes what bad ones do then.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HYPERGRADIENT_SCALES = ("none", "rms")


def check_hyperparameters(
  *,
  num_instances,
  learning_rate,
  hyper_learning_rate,
  hyper_momentum,
  instance_rates,
  num_classes,
  class_hyper_learning_rate,
  init_log_lr,
  log_lr_decay,
  log_lr_min,
  log_lr_max,
  normalize,
  hypergradient_scale,
  accumulation_steps,
) -> None:
  """Checks the arguments of `optim.ddlr`, whose docstring gives their meaning.

  Values traced under `optax.inject_hyperparams` inside jit pass unchecked.

  Raises:
    ValueError: naming the first invalid argument, its value and what is expected.
  """
  _check_positive_int("num_instances", num_instances)
  if num_instances > np.iinfo(np.int32).max and not jax.config.jax_enable_x64:
    raise ValueError(
      f"num_instances={num_instances} exceeds the int32 maximum {np.iinfo(np.int32).max}, "
      "and ids are int32 unless jax_enable_x64 is set; enable it or use fewer instances."
    )
  if not callable(learning_rate):
    _check_finite_at_least("learning_rate", learning_rate, 0.0)
  if accumulation_steps is None:
    accumulation_steps = 1
  _check_positive_int("accumulation_steps", accumulation_steps)
  _check_finite_at_least("hyper_learning_rate", hyper_learning_rate, 0.0)
  # Under optax.inject_hyperparams the float arguments arrive as traced arrays
  # inside jit, where their values cannot be checked; concrete ones are.
  if not is_traced(hyper_momentum) and not 0.0 <= hyper_momentum < 1.0:
    raise ValueError(f"hyper_momentum must be in [0, 1), got {hyper_momentum}.")
  if num_classes is not None:
    _check_positive_int("num_classes", num_classes)
  elif class_hyper_learning_rate is not None:
    raise ValueError(
      f"class_hyper_learning_rate={class_hyper_learning_rate!r} is set but num_classes is not, "
      "so there is no class table for it to update; give num_classes to learn class rates."
    )
  if class_hyper_learning_rate is None:
    class_hyper_learning_rate = hyper_learning_rate
  _check_finite_at_least("class_hyper_learning_rate", class_hyper_learning_rate, 0.0)
  _check_finite_at_least("log_lr_decay", log_lr_decay, 0.0)
  for name, value in (("log_lr_min", log_lr_min), ("log_lr_max", log_lr_max)):
    _check_finite_at_least(name, value, None)
  _check_finite_at_least("init_log_lr", init_log_lr, None)
  bounds = (log_lr_min, log_lr_max, init_log_lr)
  if not any(is_traced(value) for value in bounds):
    if not log_lr_min < log_lr_max:
      raise ValueError(f"log_lr_min must be below log_lr_max, got {log_lr_min} and {log_lr_max}.")
    if not log_lr_min <= init_log_lr <= log_lr_max:
      raise ValueError(
        f"init_log_lr={init_log_lr} is outside [log_lr_min, log_lr_max] = "
        f"[{log_lr_min}, {log_lr_max}]."
      )
  if not isinstance(normalize, (bool, np.bool_)):
    raise ValueError(f"normalize must be True or False, got {normalize!r}.")
  if hypergradient_scale not in HYPERGRADIENT_SCALES:
    raise ValueError(
      f"hypergradient_scale must be one of {HYPERGRADIENT_SCALES}, got {hypergradient_scale!r}."
    )
  if not instance_rates and num_classes is None:
    raise ValueError(
      "ddlr needs instance_rates=True or num_classes; with neither it "
      "learns nothing, so use the base optimizer directly."
    )


def check_batch_args(ids, alignment, labels, num_instances: int, num_classes: int | None) -> None:
  """Checks the batch arguments of `update`: their shapes and dtypes, and concrete values.

  Raises:
    ValueError: naming the first invalid argument. Traced values get only the
      shape and dtype checks.
  """
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} {ids.dtype}.")
  if ids.shape[0] == 0:
    raise ValueError("ids is empty; a batch needs at least one example.")
  if alignment.shape != ids.shape:
    raise ValueError(f"alignment must have the shape of ids {ids.shape}, got {alignment.shape}.")
  if not is_traced(alignment):
    # Under jit a non-finite alignment gives the batch NaN rates instead.
    bad = np.flatnonzero(~np.isfinite(np.asarray(alignment, np.float32)))
    if bad.size:
      raise ValueError(
        f"alignment[{bad[0]}] is {float(np.asarray(alignment)[bad[0]])}; every alignment must "
        "be finite, because one non-finite value turns the rates of the whole batch into NaN."
      )
  if num_classes is not None:
    if labels is None:
      raise ValueError("class rates are enabled (num_classes given), so update needs labels.")
    if labels.shape != ids.shape or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(
        f"labels must be an integer array of the shape of ids {ids.shape}, "
        f"got shape {labels.shape} {labels.dtype}."
      )
    _check_concrete_range("label", labels, num_classes, "labels must be class indices")
  # Checked before the ids become a jax array, which would wrap 64-bit values to 32 bits.
  _check_concrete_range("instance id", ids, num_instances, "ids must index the training set")


def check_state_tables(state, num_instances: int, num_classes: int | None) -> None:
  """Raises ValueError if the tables of the `DdlrState` were made for other sizes."""
  if state.log_lr is not None and state.log_lr.shape[0] != num_instances:
    raise ValueError(
      f"the state's instance table has {state.log_lr.shape[0]} rates, but this transformation "
      f"has num_instances={num_instances}; init the state with the same transformation."
    )
  if state.class_log_lr is not None and state.class_log_lr.shape[0] != num_classes:
    raise ValueError(
      f"the state's class table has {state.class_log_lr.shape[0]} rates, but this "
      f"transformation has num_classes={num_classes}; init the state with the same transformation."
    )


def _check_concrete_range(name: str, values, bound: int, requirement: str) -> None:
  """Raises ValueError if concrete integer `values` leave [0, bound); traced values pass."""
  if is_traced(values):
    return
  values = np.asarray(values)
  bad = values[(values < 0) | (values >= bound)]
  if bad.size:
    raise ValueError(f"{name} {int(bad[0])} is outside [0, {bound}); {requirement}.")


def is_traced(value) -> bool:
  """Returns whether `value` is a jax tracer, whose value cannot be read."""
  return isinstance(value, jax.core.Tracer)


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    hint = ""
    if isinstance(value, jax.Array):
      hint = " It sizes the state, so with optax.inject_hyperparams list it in static_args."
    raise ValueError(f"{name} must be a positive integer, got {value!r}.{hint}")


def _check_finite_at_least(name: str, value: Any, minimum: float | None) -> None:
  """Raises ValueError unless a concrete `value` is a finite real number >= `minimum` (if given)."""
  if is_traced(value):
    return
  try:
    number = None if isinstance(value, (str, bool)) else float(value)
  except (TypeError, ValueError):
    number = None
  if number is None or not np.isfinite(number) or (minimum is not None and number < minimum):
    expected = "a finite number" + ("" if minimum is None else f" >= {minimum}")
    raise ValueError(f"{name} must be {expected}, got {value!r}.")
