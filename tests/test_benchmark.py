"""The benchmark script: its variant names and one tiny run end to end."""

import os
import subprocess
import sys

import pytest

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
