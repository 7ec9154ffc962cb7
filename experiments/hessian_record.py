"""The record of `experiments.hessian_spectrum`: loading it and checking a rerun against it.

`hessian_spectrum.json` keeps the settings, the data and the number of
training epochs the spectra were computed with. A rerun adds epochs to it
only when all of these are the same.
"""

import dataclasses
import json
import os
import reprlib

from ddlr import resume
from ddlr.config_checks import ConfigError


def load_record(path: str, settings, header: dict) -> dict:
  """Returns the spectrum record in `path`, or a new one when there is none.

  Every value of `header` must equal the record's, except `num_epochs`, which
  `check_num_epochs` checks because records written before it was stored lack it.

  Raises:
    ConfigError: if the record was written with different settings or data,
      naming each field that differs with both values.
  """
  expected = {"settings": dataclasses.asdict(settings), **header}
  expected = json.loads(json.dumps(expected))  # tuples become lists, as in the file
  if not os.path.exists(path):
    return {**expected, "points": []}
  with open(path) as f:
    record = json.load(f)
  differences = [
    difference
    for key, value in expected.items()
    if key != "num_epochs"
    for difference in _differences(key, record.get(key, _MISSING), value)
  ]
  if differences:
    raise ConfigError(
      f"{path} was written with other settings or data: {'; '.join(differences)}. Use a new "
      "--workdir, or the flags and config of that run."
    )
  return record


_MISSING = "<missing>"
# Shortens the sample id lists and other long values in the messages of load_record.
# Python 3.11's reprlib.Repr takes no keyword arguments, so the limits are set after.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = 6
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60


def _differences(key: str, recorded, expected) -> list[str]:
  """Returns "key: <recorded> in the record, <expected> now" for each field that differs.

  Dicts are compared field by field, so the text names only the fields that differ.
  """
  if recorded == expected:
    return []
  if not (isinstance(recorded, dict) and isinstance(expected, dict)):
    return [f"{key}: {_SHORT_REPR.repr(recorded)} in the record, {_SHORT_REPR.repr(expected)} now"]
  differences = []
  for field in sorted(set(recorded) | set(expected)):
    differences += _differences(
      f"{key}.{field}", recorded.get(field, _MISSING), expected.get(field, _MISSING)
    )
  return differences


def check_num_epochs(record: dict, record_path: str, config, train_dir: str) -> None:
  """Checks that the recorded spectra were computed under `config.train.num_epochs`.

  The learning-rate schedule depends on train.num_epochs, so spectra from runs
  with different values do not belong in one record. A record without the
  `num_epochs` key was written before the record stored it. For such a record
  the value saved with the training run (`train_dir/config.json`) is compared
  instead, and without that file the record is accepted. A record without
  points is always accepted.

  Raises:
    ConfigError: naming train.num_epochs with both values.
    checkpoint.ResumeError: the training run's config.json cannot be read.
  """
  if not record["points"]:
    return
  requested = config.train.num_epochs
  recorded, source = record.get("num_epochs"), record_path
  if recorded is None:
    config_path = os.path.join(train_dir, "config.json")
    if not os.path.exists(config_path):
      return
    changed = resume.config_differences(config_path, config)
    recorded, source = changed.get("train.num_epochs", (requested, None))[0], config_path
  if recorded != requested:
    raise ConfigError(
      f"config.train.num_epochs={requested} is invalid for {record_path}, whose spectra were "
      f"computed with train.num_epochs={recorded} (from {source}); the learning-rate schedule "
      "depends on it, so the spectra would mix two schedules. Use a new --workdir, or "
      f"--config.train.num_epochs={recorded}."
    )
