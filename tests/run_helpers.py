"""Shared helpers of the end-to-end tests: a tiny config and runs on mocked tfds data."""

import os
import subprocess
import sys

import tensorflow_datasets as tfds

from configs import default
from ddlr import checkpoint, train

MOCK_EXAMPLES = 100  # 90 training instances after a reference split of 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """Returns the quick default config sized for mocked data, with `overrides` applied.

  The config reads every mocked example (num_train and num_test 0), holds
  out 10 as the reference split, and trains a width-4 model for one epoch of
  batch 32. `overrides` maps dotted field paths, e.g. "ddlr.reference", to values.
  """
  config = default.get_config("quick")
  config.data.num_train = 0
  config.data.num_test = 0
  config.data.reference_size = 10
  config.ddlr.reference_batch_size = 8
  config.train.num_epochs = 1
  config.train.batch_size = 32
  config.train.log_every_steps = 1
  config.eval.batch_size = 50
  config.model.width = 4
  apply_overrides(config, overrides)
  return config


def apply_overrides(config, overrides: dict) -> None:
  """Sets each dotted field path of `overrides`, e.g. "ddlr.reference", in `config`."""
  for path, value in overrides.items():
    *sections, field = path.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value


def run_on_mock(config, workdir, num_examples=MOCK_EXAMPLES):
  """Trains `config` in `workdir` on mocked tfds data and returns the run's summary."""
  with tfds.testing.mock_data(num_examples=num_examples):
    return train.train_and_evaluate(config, str(workdir))


def latest_state(workdir, config):
  """Restores the latest checkpoint of `workdir` into a freshly built template.

  Returns:
    What `checkpoint.restore_latest` returns: the train state and the loop record.
  """
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    data = train._load_data(config, str(workdir), resuming=True)
    _, template = train._build(config, str(workdir), data)
  manager = checkpoint.create_manager(str(workdir), config.checkpoint.max_to_keep)
  return checkpoint.restore_latest(manager, template, len(data.labels))


def run_experiment(module, *arguments, env=None):
  """Runs `python -m experiments.<module>` from the repository root and returns the result.

  `env` adds to or replaces variables of this process's environment.
  """
  command = [sys.executable, "-m", f"experiments.{module}", *arguments]
  return subprocess.run(
    command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
    timeout=600,
  )  # fmt: skip
