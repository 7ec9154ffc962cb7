"""Datasets with stable instance ids, recorded label noise and reference splits.

Entry point: `load_dataset(config)` returns a `TrainingData` whose training
row k is instance k.
"""

from ddlr.data.catalog import SUPPORTED_DATASETS, DatasetSpec, get_spec
from ddlr.data.config import check_config, default_config
from ddlr.data.dataset import TrainingData, load_dataset, normalize_images
from ddlr.data.errors import DataError
from ddlr.data.noise import NOISE_KINDS, check_noise_config, corrupt_labels
from ddlr.data.record import SplitRecord, load_split_record, save_split_record
from ddlr.data.sources import SOURCES, load_split
from ddlr.data.splits import hold_out_reference

__all__ = [
  "NOISE_KINDS",
  "SOURCES",
  "SUPPORTED_DATASETS",
  "DataError",
  "DatasetSpec",
  "SplitRecord",
  "TrainingData",
  "check_config",
  "check_noise_config",
  "corrupt_labels",
  "default_config",
  "get_spec",
  "hold_out_reference",
  "load_dataset",
  "load_split",
  "load_split_record",
  "normalize_images",
  "save_split_record",
]
