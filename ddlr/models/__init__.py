"""Flax models selected by name from the `model` section of a config."""

import flax.linen as nn
import ml_collections

from ddlr.models.small_cnn import SmallCNN

__all__ = ["MODELS", "SmallCNN", "create_model"]

MODELS = {"small_cnn": SmallCNN}


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the model named `config.name` with the remaining fields as arguments.

  Raises:
    ValueError: for an unknown model name.
  """
  if config.name not in MODELS:
    raise ValueError(
      f"config.model.name={config.name!r} is unknown; expected one of {sorted(MODELS)}."
    )
  kwargs = {key: value for key, value in config.items() if key != "name"}
  return MODELS[config.name](num_classes=num_classes, **kwargs)
