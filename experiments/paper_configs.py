"""Configs of the architecture and noisy-label sweeps, from the CIFAR and Fashion-MNIST configs.

CIFAR-10/100 are the full-scale datasets. Fashion-MNIST is the stand-in that
runs on a CPU, its `small` size in seconds per run.
"""

import ml_collections

from configs import cifar, fashion_mnist

# Dataset name -> (config module, the argument that selects the dataset).
_CONFIG_MODULES = {
  "cifar10": (cifar, "dataset=cifar10"),
  "cifar100": (cifar, "dataset=cifar100"),
  "fashion_mnist": (fashion_mnist, ""),
}
DATASETS = tuple(_CONFIG_MODULES)
# Row suffix -> rates option of the configs.
METHODS = {"uniform": "uniform", "ddlr": "instance"}


def models_of(dataset: str) -> tuple[str, ...]:
  """Returns the architectures that the config of `dataset` offers."""
  _check_dataset(dataset)
  return tuple(_CONFIG_MODULES[dataset][0].MODELS)


def build_config(
  dataset: str,
  model: str,
  method: str,
  *,
  noise: str = "none",
  rate: float = 0.0,
  small: bool = False,
) -> ml_collections.ConfigDict:
  """Returns the config of one sweep run.

  Raises:
    ValueError: for an unknown dataset or method, or an argument the config rejects.
  """
  _check_dataset(dataset)
  if method not in METHODS:
    raise ValueError(f"method {method!r} is unknown; expected one of {', '.join(METHODS)}.")
  module, dataset_arg = _CONFIG_MODULES[dataset]
  parts = [dataset_arg, f"model={model}", f"rates={METHODS[method]}", f"noise={noise}"]
  if noise != "none":
    parts.append(f"rate={rate}")
  if small:
    parts.append("small")
  return module.get_config(",".join(part for part in parts if part))


def _check_dataset(dataset: str) -> None:
  if dataset not in _CONFIG_MODULES:
    raise ValueError(f"--dataset={dataset!r} is invalid; expected one of {', '.join(DATASETS)}.")
