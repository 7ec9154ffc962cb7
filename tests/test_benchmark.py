"""The benchmark script: its flags and variant names, memory figures and one tiny run."""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from ddlr import steps
from ddlr.models import SmallCNN
from scripts import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variant_names_parse():
  split_half = benchmark.parse_variant("jvp/split-half").settings
  assert split_half.reference == "split"
  assert split_half.split_batch_stats == "half"
  assert benchmark.parse_variant("jvp/split").settings.split_batch_stats == "batch"
  assert not benchmark.parse_variant("jvp/split").settings.split_sequential
  sequential = benchmark.parse_variant("layerwise/split-seq").settings
  assert (sequential.reference, sequential.split_batch_stats) == ("split", "batch")
  assert sequential.split_sequential
  sequential_half = benchmark.parse_variant("jvp/split-half-seq").settings
  assert (sequential_half.reference, sequential_half.split_batch_stats) == ("split", "half")
  assert sequential_half.split_sequential
  cached = benchmark.parse_variant("layerwise/reference@4").settings
  assert cached.reference_every_steps == 4
  assert cached.alignment == "layerwise"
  assert not benchmark.parse_variant("uniform").settings.enabled
  assert not benchmark.parse_variant("direct-jvp/momentum").settings.linearize


@pytest.mark.parametrize(
  ("name", "reason"),
  [
    ("jvp/oracle", "unknown reference 'oracle', expected one of batch,"),
    ("exact/momentum", "unknown path 'exact', expected one of jvp, layerwise, vmap, direct-jvp."),
    ("jvp", "expected 'uniform' or '<path>/<reference>[@k]'."),
    ("jvp/reference@0", "the refresh interval after '@' must be a whole number >= 1, not '0'."),
    ("jvp/reference@x", "must be a whole number >= 1, not 'x'."),
    ("jvp/reference@", "must be a whole number >= 1, not ''."),
    ("jvp/reference@²", "must be a whole number >= 1, not '²'."),
    ("jvp/reference@٣", "must be a whole number >= 1, not '٣'."),
    ("jvp/split-half@4", "a refresh interval '@k' applies only to the reference 'reference'."),
  ],
)
def test_invalid_variant_raises(name, reason):
  with pytest.raises(ValueError, match=f"invalid variant '{name}': ") as raised:
    benchmark.parse_variant(name)
  assert reason in str(raised.value)


def test_timed_variants_put_uniform_first():
  listed = benchmark.timed_variants(["jvp/split", "uniform", "jvp/momentum"])
  assert [variant.name for variant in listed] == ["uniform", "jvp/split", "jvp/momentum"]
  added = benchmark.timed_variants(["jvp/split"])
  assert [variant.name for variant in added] == ["uniform", "jvp/split"]


@pytest.fixture
def parse_flags():
  """Parses benchmark flags in this process and restores their defaults afterwards."""

  def parse(*arguments):
    benchmark.FLAGS(["benchmark", *arguments])

  yield parse
  benchmark.FLAGS.unparse_flags()


@pytest.mark.parametrize(
  "arguments",
  [
    [],
    ["--batch_size=1", "--variants=uniform,jvp/momentum,layerwise/reference@4"],
    ["--batch_size=2", "--variants=jvp/split", "--memory_only=jvp/small_loss_split"],
    [f"--batch_size={benchmark.NUM_INSTANCES}"],
    ["--model=wide_resnet"],
    ["--model=wide_resnet", "--width=0"],
    ["--model=resnet18", "--width=8"],
    ["--model=small_cnn", "--batch_norm", "--width=4"],
    ["--variants=jvp/split,uniform", "--memory_only=vmap/momentum,vmap/split"],
  ],
)
def test_valid_flags_parse(parse_flags, arguments):
  parse_flags(*arguments)


@pytest.mark.parametrize(
  ("arguments", "flag_values", "message"),
  [
    (["--batch_size=0"], "flag --batch_size=0", "not an integer in the range [1, 4096]"),
    (["--batch_size=-3"], "flag --batch_size=-3", "not an integer in the range [1, 4096]"),
    (["--batch_size=4097"], "flag --batch_size=4097", "not an integer in the range [1, 4096]"),
    (
      ["--batch_size=1", "--variants=uniform,jvp/split"],
      "flags batch_size=1, variants=['uniform', 'jvp/split'], memory_only=[]",
      "variants with a split reference (jvp/split) score each half of the batch against the "
      "other half, so they need --batch_size >= 2.",
    ),
    (
      ["--batch_size=1", "--variants=uniform", "--memory_only=layerwise/small_loss_split"],
      "flags batch_size=1, variants=['uniform'], memory_only=['layerwise/small_loss_split']",
      "variants with a split reference (layerwise/small_loss_split)",
    ),
    (["--width=-2"], "flag --width=-2", "-2 is not a non-negative integer"),
    (["--model=nosuch"], "flag --model=nosuch", "value should be one of <densenet_bc|resnet18|"),
    (
      ["--variants=foo/momentum"],
      "flag --variants=['foo/momentum']",
      "invalid variant 'foo/momentum': unknown path 'foo', expected one of jvp, layerwise, vmap, "
      "direct-jvp.",
    ),
    (["--variants="], "flag --variants=[]", "expected at least one variant"),
    (
      ["--model=wide_resnet", "--width=4"],
      "flags model=wide_resnet, width=4",
      "wide_resnet has no width option, so remove --width or pick a model that has one: "
      "resnet18, resnet34, resnet50, small_cnn, vgg16_bn.",
    ),
    (
      ["--model=resnet18", "--batch_norm"],
      "flags model=resnet18, batch_norm=True",
      "resnet18 has no batch_norm option, so remove --batch_norm or pick a model that has one: "
      "small_cnn.",
    ),
    (
      ["--variants=uniform", "--memory_only=bogus"],
      "flag --memory_only=['bogus']",
      "invalid variant 'bogus': expected 'uniform' or '<path>/<reference>[@k]'.",
    ),
    (
      ["--variants=uniform,jvp/split,jvp/momentum,jvp/split"],
      "flag --variants=['uniform', 'jvp/split', 'jvp/momentum', 'jvp/split']",
      "duplicate variant jvp/split, expected each variant once.",
    ),
    (
      ["--variants=uniform", "--memory_only=vmap/momentum,vmap/momentum"],
      "flag --memory_only=['vmap/momentum', 'vmap/momentum']",
      "duplicate variant vmap/momentum",
    ),
    (
      ["--variants=uniform,jvp/split", "--memory_only=jvp/split"],
      "flags variants=['uniform', 'jvp/split'], memory_only=['jvp/split']",
      "--variants and --memory_only both list jvp/split. List each variant in one of them.",
    ),
    (
      ["--variants=jvp/split", "--memory_only=uniform"],
      "flag --memory_only=['uniform']",
      "the uniform step is always timed, so remove it from --memory_only.",
    ),
  ],
)
def test_invalid_flags_raise(parse_flags, arguments, flag_values, message):
  with pytest.raises(flags.IllegalFlagValueError) as raised:
    parse_flags(*arguments)
  assert str(raised.value).startswith(f"{flag_values}: ")
  assert message in str(raised.value)


def test_tiny_benchmark_prints_ratios():
  command = [
    sys.executable, "-m", "scripts.benchmark", "--model=small_cnn", "--width=2",
    "--batch_norm", "--batch_size=8", "--steps=4", "--rounds=2", "--warmup=1",
    "--variants=uniform,jvp/split,jvp/split-half,jvp/reference@2",
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
  # Each round makes 3 calls (1 warm-up, 2 timed), so the refreshes follow
  # calls 2, 4 and 6, and call 4 is the second round's warm-up step.
  refresh = re.search(
    r"^jvp/reference@2: a refresh took ([0-9.]+) ms \(([0-9.]+)x the uniform step, "
    r"([0-9.]+)x per step\), mean of 3, 1 of them in warm-up steps$",
    result.stdout,
    re.MULTILINE,
  )
  assert refresh, result.stdout
  milliseconds, ratio, per_step = (float(value) for value in refresh.groups())
  assert milliseconds > 0
  assert per_step == pytest.approx(ratio / 2, abs=0.01)


def test_refreshes_in_warmup_steps_counted(parse_flags):
  parse_flags("--batch_size=8", "--steps=4", "--rounds=2", "--warmup=1")
  rng = np.random.default_rng(0)
  shape = (benchmark.NUM_INSTANCES, 28, 28, 1)
  data = steps.DeviceData(
    train_images=jnp.asarray(rng.normal(size=shape).astype(np.float32)),
    train_labels=jnp.asarray(rng.integers(0, 10, shape[0]).astype(np.int32)),
    reference_images=jnp.asarray(rng.normal(size=(256, 28, 28, 1)).astype(np.float32)),
    reference_labels=jnp.asarray(rng.integers(0, 10, 256).astype(np.int32)),
  )
  variants = benchmark.timed_variants(["jvp/reference@2"])
  model = SmallCNN(num_classes=benchmark.NUM_CLASSES, width=2)
  times, _, refreshing = benchmark.time_variants(variants, model, data)

  # Each round makes 1 warm-up and 2 timed calls: calls 1 to 3, then 4 to 6,
  # with warm-up calls 1 and 4. A refresh follows calls 2, 4 and 6.
  assert [len(steps_in_round) for steps_in_round in times["jvp/reference@2"]] == [2, 2]
  step = refreshing["jvp/reference@2"]
  assert step.calls == 6
  assert len(step.refresh_times) == 3
  assert step.warmup_refreshes == 1


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
