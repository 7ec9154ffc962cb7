"""Tests of the noisy-label comparison: its rows and its per-setting tables."""

import pytest

from configs import default
from ddlr import references
from ddlr.config_checks import reference_batch_source, validate_config
from experiments import noisy_comparison, sweep


def _flat(config) -> dict:
  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value

  return dict(walk(config.to_dict(), ""))


def test_rows_differ_from_uniform_only_in_method():
  config = noisy_comparison.base_config("smoke")
  rows = noisy_comparison.method_rows(config, "pairflip", 0.4, "momentum")

  assert [(row.name, row.group) for row in rows] == [
    ("ddlr_reference", noisy_comparison.TRUSTED_GROUP),
    ("learning_to_reweight", noisy_comparison.TRUSTED_GROUP),
    ("uniform", noisy_comparison.UNTRUSTED_GROUP),
    ("hypergradient", noisy_comparison.UNTRUSTED_GROUP),
    ("data_parameters", noisy_comparison.UNTRUSTED_GROUP),
    ("small_loss", noisy_comparison.UNTRUSTED_GROUP),
    ("ddlr_momentum", noisy_comparison.UNTRUSTED_GROUP),
  ]
  uniform = _flat(rows[2].config)
  assert uniform["data.noise.kind"] == "pairflip"
  assert uniform["data.noise.rate"] == 0.4
  method_fields = {"ddlr.enabled", "ddlr.reference", "baseline.name"}
  method_fields.update({"baseline.small_loss.forget_rate", "ddlr.small_loss_per_class"})
  for row in rows:
    validate_config(row.config)
    changed = {k for k, v in _flat(row.config).items() if uniform[k] != v}
    assert changed <= method_fields, row.name
  assert rows[0].config.ddlr.enabled and rows[0].config.ddlr.reference == "reference"
  assert rows[6].config.ddlr.enabled and rows[6].config.ddlr.reference == "momentum"
  assert rows[5].config.baseline.small_loss.forget_rate == 0.4
  assert not rows[6].config.ddlr.small_loss_per_class


def test_small_loss_untrusted_row_selects_per_class():
  rows = noisy_comparison.method_rows(
    noisy_comparison.base_config("smoke"), "symmetric", 0.6, "small_loss"
  )
  assert rows[6].name == "ddlr_small_loss"
  assert rows[6].config.ddlr.reference == "small_loss"
  assert rows[6].config.ddlr.small_loss_per_class
  assert not rows[0].config.ddlr.small_loss_per_class


def test_every_reference_classified_once():
  trusted = set(noisy_comparison.TRUSTED_REFERENCES)
  untrusted = set(noisy_comparison.UNTRUSTED_REFERENCES)

  assert trusted & untrusted == set()
  assert trusted | untrusted == set(references.REFERENCES)
  assert len(noisy_comparison.TRUSTED_REFERENCES) == len(trusted)
  assert len(noisy_comparison.UNTRUSTED_REFERENCES) == len(untrusted)


@pytest.mark.parametrize("reference", references.REFERENCES)
def test_trusted_references_draw_reference_split(reference):
  # The config checks know which references read the reference split, so the
  # two lists must agree, or a trusted reference would skip its size checks.
  config = default.get_config()
  config.ddlr.reference = reference
  reads_reference_split = reference_batch_source(config) == "reference split"
  assert reads_reference_split == (reference in noisy_comparison.TRUSTED_REFERENCES)


def test_invalid_size_is_rejected():
  with pytest.raises(ValueError, match="size='huge' is invalid"):
    noisy_comparison.base_config("huge")


def test_setting_table_groups_methods_and_times_them():
  rows = noisy_comparison.method_rows(
    noisy_comparison.base_config("smoke"), "symmetric", 0.6, "split"
  )
  summaries = {}
  for index, row in enumerate(rows):
    summary = {
      "last_epoch_test_accuracy": 0.5,
      "best_epoch_test_accuracy": 0.6,
      "seconds_per_step": 0.1 * (index + 1),
    }
    if row.name != "uniform" and row.name != "hypergradient":
      summary.update({"auroc": 0.9, "noisy_precision_lowest_10pct": 0.8})
    summaries[row.name] = [summary, summary]

  lines = noisy_comparison.setting_table("symmetric60", rows, summaries, [0, 1]).splitlines()

  assert lines[0] == "## symmetric noise, rate 0.6"
  assert lines[2] == "Seeds: 0, 1."
  assert lines[4] == (
    "| method | last-epoch test acc. | best-epoch test acc. | AUROC "
    "| noisy share of 10% lowest | time/step vs uniform |"
  )
  assert lines[6] == f"| **{noisy_comparison.TRUSTED_GROUP}** |" + " |" * 5
  # ddlr_reference takes 0.1 s per step, uniform 0.3 s.
  assert lines[7] == (
    "| ddlr_reference | 0.5000 ± 0.0000 | 0.6000 ± 0.0000 | 0.9000 ± 0.0000 "
    "| 0.8000 ± 0.0000 | 0.33x |"
  )
  assert lines[9] == f"| **{noisy_comparison.UNTRUSTED_GROUP}** |" + " |" * 5
  assert lines[10] == "| uniform | 0.5000 ± 0.0000 | 0.6000 ± 0.0000 | n/a | n/a | 1.00x |"
  assert lines[-3].startswith("| ddlr_split |")
  assert lines[-3].endswith("| 2.33x |")
  assert lines[-2:] == ["", sweep.STD_NOTE]


def test_table_is_written_per_setting(tmp_path):
  path = sweep.write_table(str(tmp_path), "## table\n", "results_pairflip40.md")

  assert (tmp_path / "results_pairflip40.md").read_text() == "## table\n"
  assert path == str(tmp_path / "results_pairflip40.md")
