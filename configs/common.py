"""Argument strings and settings shared by the experiment configs.

A config file takes its argument after a colon, as comma-separated `key=value`
items and bare switches:

  --config=configs/cifar.py:dataset=cifar100,model=wide_resnet,noise=symmetric,rate=0.4,small

Configs import this module as `configs.common`, so run them from the
repository root (as `python -m ddlr.main` does).
"""

import dataclasses
from typing import Any

import ml_collections

# Rates options of every config: the uniform baseline, per-instance rates,
# per-class rates, or both tables together.
RATES = ("uniform", "instance", "class", "instance+class")
NOISE_KINDS = ("none", "symmetric", "pairflip")


@dataclasses.dataclass(frozen=True)
class Option:
  """One key of a config argument string: its default, its type and allowed values.

  A `bool` option is a switch: the bare key sets it to True. An empty
  `choices` allows any value of `kind`.
  """

  default: Any
  kind: type = str
  choices: tuple = ()


def parse_arguments(arg: str | None, config_file: str, options: dict[str, Option]):
  """Parses a config argument string against `options`.

  Args:
    arg: the text after the colon in `--config=FILE:ARG`, or None.
    config_file: the config's path, used in error messages.
    options: every accepted key and its `Option`.

  Returns:
    A ConfigDict with every key of `options`, set to its value in `arg` or to
    its default.

  Raises:
    ValueError: for an unknown or repeated key, a value that does not convert
      to the option's type, or a value outside its choices.
  """
  values = {key: option.default for key, option in options.items()}
  seen = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in options:
      raise ValueError(
        f"{config_file}: unknown argument {key!r} in {arg!r}; expected keys "
        f"{', '.join(sorted(options))}."
      )
    if key in seen:
      raise ValueError(f"{config_file}: argument {key!r} is given twice in {arg!r}.")
    seen.add(key)
    values[key] = _convert(config_file, key, options[key], text.strip() if has_value else None)
  return ml_collections.ConfigDict(values)


# The expected value of an option of each kind, as error messages name it.
_KIND_NAMES = {int: "an integer", float: "a float", str: "a string"}


def _convert(config_file: str, key: str, option: Option, text: str | None):
  if option.kind is bool:
    if text is None or text.lower() == "true":
      return True
    if text.lower() == "false":
      return False
    raise ValueError(f"{config_file}: argument {key}={text!r} is invalid; expected true or false.")
  if text is None:
    raise ValueError(f"{config_file}: argument {key!r} needs a value, as in {key}=VALUE.")
  try:
    value = option.kind(text)
  except ValueError:
    expected = _KIND_NAMES.get(option.kind, f"a value of type {option.kind.__name__}")
    raise ValueError(
      f"{config_file}: argument {key}={text!r} is invalid; expected {expected}."
    ) from None
  if option.choices and value not in option.choices:
    raise ValueError(
      f"{config_file}: argument {key}={text!r} is invalid; expected one of "
      f"{', '.join(map(str, option.choices))}."
    )
  return value


def set_rates(config: ml_collections.ConfigDict, rates: str) -> None:
  """Sets the ddlr section for one of `RATES`."""
  if rates not in RATES:
    raise ValueError(f"rates={rates!r} is invalid; expected one of {', '.join(RATES)}.")
  config.ddlr.enabled = rates != "uniform"
  config.ddlr.instance_rates = rates in ("instance", "instance+class")
  config.ddlr.class_rates = rates in ("class", "instance+class")


def set_noise(config: ml_collections.ConfigDict, config_file: str, kind: str, rate: float) -> None:
  """Sets the label noise of the data section.

  Raises:
    ValueError: when a noise kind has no rate in (0, 1), or `kind='none'` has one.
  """
  if kind == "none":
    if rate != 0.0:
      raise ValueError(
        f"{config_file}: rate={rate} needs a noise kind; add noise=symmetric or noise=pairflip."
      )
  elif not 0.0 < rate < 1.0:
    raise ValueError(
      f"{config_file}: noise={kind} needs a rate in (0, 1), as in rate=0.4; got rate={rate}."
    )
  config.data.noise.kind = kind
  config.data.noise.rate = rate


def set_augmentation(config: ml_collections.ConfigDict, augmentation: str, image_size=None):
  """Sets `config.data.augmentation`, and `config.data.image_size` unless it is None."""
  config.data.augmentation = augmentation
  if image_size is not None:
    config.data.image_size = image_size


def shrink_to_small(config: ml_collections.ConfigDict) -> None:
  """Shrinks data, batch and epochs in place to the `small` size, a run of seconds on a CPU.

  512 training instances after a 100-example reference split, 256 test
  examples, batch 64 and two epochs. The configs shrink their models themselves.
  """
  config.data.num_train = 612
  config.data.num_test = 256
  config.data.reference_size = 100
  config.ddlr.reference_batch_size = 32
  config.baseline.reference_batch_size = 32
  config.train.num_epochs = 2
  config.train.batch_size = 64
  config.train.log_every_steps = 4
  config.eval.batch_size = 128
