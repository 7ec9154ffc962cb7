"""The benchmark script: its variant names, memory figures and one tiny run end to end."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlr import steps
from ddlr.models import SmallCNN
from scripts import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variant_names_parse():
  split_half = benchmark.parse_variant("jvp/split-half").settings
  assert split_half.reference == "split"
  assert split_half.split_batch_stats == "half"
  assert benchmark.parse_variant("jvp/split").settings.split_batch_stats == "batch"
  cached = benchmark.parse_variant("layerwise/reference@4").settings
  assert cached.reference_every_steps == 4
  assert cached.alignment == "layerwise"
  assert not benchmark.parse_variant("uniform").settings.enabled
  assert not benchmark.parse_variant("direct-jvp/momentum").settings.linearize


@pytest.mark.parametrize(
  "name",
  [
    "jvp/oracle",
    "exact/momentum",
    "jvp",
    "jvp/reference@0",
    "jvp/reference@x",
    "jvp/reference@",
    "jvp/reference@²",
    "jvp/split-half@4",
  ],
)
def test_invalid_variant_raises(name):
  with pytest.raises(ValueError, match=f"invalid variant '{name}'"):
    benchmark.parse_variant(name)


def test_tiny_benchmark_prints_ratios():
  command = [
    sys.executable, "-m", "scripts.benchmark", "--model=small_cnn", "--width=2",
    "--batch_norm", "--batch_size=8", "--steps=4", "--rounds=2", "--warmup=0",
    "--variants=uniform,jvp/split,jvp/split-half",
  ]  # fmt: skip
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "device: cpu" in result.stdout
  rows = {}
  for line in result.stdout.splitlines():
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    if cells[0] in ("jvp/split", "jvp/split-half"):
      rows[cells[0]] = cells
  assert set(rows) == {"jvp/split", "jvp/split-half"}
  # The median ratio over rounds, then the lowest and highest in brackets.
  median, spread = rows["jvp/split-half"][2].split("x ")
  lowest, highest = (float(value) for value in spread.strip("()").split("-"))
  assert 0 < lowest <= float(median) <= highest
  # With BatchNorm, per-half statistics skip the second VJP and tangent.
  flop_ratios = {name: float(cells[4][:-1]) for name, cells in rows.items()}
  assert flop_ratios["jvp/split-half"] < flop_ratios["jvp/split"]


def make_device_data(num_reference):
  rng = np.random.default_rng(0)
  return steps.DeviceData(
    train_images=jnp.asarray(rng.normal(size=(64, 28, 28, 1)).astype(np.float32)),
    train_labels=jnp.asarray(rng.integers(0, 10, 64).astype(np.int32)),
    reference_images=jnp.asarray(rng.normal(size=(num_reference, 28, 28, 1)).astype(np.float32)),
    reference_labels=jnp.asarray(rng.integers(0, 10, num_reference).astype(np.int32)),
  )


@functools.cache
def build_tiny_step(name, num_reference):
  """Builds variant `name` for a width-2 small CNN and returns its state's bytes and memory."""
  model = SmallCNN(num_classes=benchmark.NUM_CLASSES, width=2)
  data = make_device_data(num_reference)
  _, state, memory = benchmark.build_step(benchmark.parse_variant(name), model, data, 8)
  return benchmark.tree_bytes(state), memory


def test_tree_bytes_matches_xla_arguments():
  # A function that reads every argument, a PRNG key among them, keeps all of
  # them, so XLA's argument size is the bytes of every leaf.
  arguments = {"key": jax.random.key(0), "values": jnp.ones([3, 5], jnp.float32)}
  compiled = (
    jax.jit(lambda tree: jax.random.key_data(tree["key"]).sum() + tree["values"].sum())
    .lower(arguments)
    .compile()
  )
  analysis = compiled.memory_analysis()
  assert benchmark.tree_bytes(arguments) == 8 + 60
  assert benchmark.tree_bytes(arguments) == analysis.argument_size_in_bytes


@pytest.mark.parametrize(
  "name", ["uniform", "layerwise/momentum", "jvp/reference", "jvp/reference@4"]
)
def test_peak_includes_whole_train_state(name):
  # The step of uniform and layerwise/momentum never reads the reference split,
  # jvp/reference does, and jvp/reference@4 reads it in its refresh call.
  # Each peak adds the train state, the ids and the outputs that do not reuse
  # a donated buffer to the temporary memory, so it is at least state plus temp.
  state_bytes, memory = build_tiny_step(name, num_reference=256)
  assert memory["peak"] >= state_bytes + memory["temp"]


@pytest.mark.parametrize("name", ["uniform", "layerwise/momentum"])
def test_peak_ignores_unread_reference_split(name):
  small = build_tiny_step(name, num_reference=16)[1]
  large = build_tiny_step(name, num_reference=256)[1]
  assert small["peak"] == large["peak"]
