"""Flax models selected by name from the `model` section of a config."""

import inspect

import flax.linen as nn
import ml_collections

from ddlr.models.densenet import DenseNetBC
from ddlr.models.resnet import ResNet, ResNet18, ResNet34, ResNet50
from ddlr.models.small_cnn import SmallCNN
from ddlr.models.vgg import VGG16BN
from ddlr.models.wide_resnet import WideResNet

__all__ = [
  "MODELS",
  "DenseNetBC",
  "ResNet",
  "SmallCNN",
  "VGG16BN",
  "WideResNet",
  "create_model",
  "model_arguments",
]

MODELS = {
  "small_cnn": SmallCNN,
  "resnet18": ResNet18,
  "resnet34": ResNet34,
  "resnet50": ResNet50,
  "wide_resnet": WideResNet,
  "vgg16_bn": VGG16BN,
  "densenet_bc": DenseNetBC,
}


def model_arguments(name: str) -> set[str]:
  """Returns the constructor arguments of model `name` that a config's model section may set."""
  return set(inspect.signature(MODELS[name]).parameters) - {"num_classes", "parent", "name"}


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the model named `config.name` with the remaining fields as arguments.

  Raises:
    ValueError: for an unknown model name, a field the model does not take,
      or an argument value the model rejects.
  """
  if config.name not in MODELS:
    raise ValueError(
      f"config.model.name={config.name!r} is unknown; expected one of {sorted(MODELS)}."
    )
  kwargs = {key: value for key, value in config.items() if key != "name"}
  accepted = model_arguments(config.name)
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(
      f"{config.name} does not take the field {', '.join(unknown)} of config.model; its "
      f"arguments are {', '.join(sorted(accepted))}. Use a config whose model section sets "
      "only those (README.md, section Extending), or the `model` argument of "
      "configs/fashion_mnist.py, configs/cifar.py or configs/imagenet.py for the models it lists."
    )
  return MODELS[config.name](num_classes=num_classes, **kwargs)
