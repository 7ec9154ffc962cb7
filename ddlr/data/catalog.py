"""Static facts about the supported datasets: classes, image shape, statistics."""

import dataclasses

from ddlr.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Shape, class count and per-channel pixel statistics of one dataset.

  `mean` and `std` are per-channel statistics of the full training split, on
  pixel values scaled to [0, 1].
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


# Fashion-MNIST statistics were computed from the 60,000 training images of
# Debian's dataset-fashion-mnist package (a test checks them).
# NOTE: the MNIST and CIFAR statistics are the widely published values
# (population std over all training pixels). They were not recomputed here
# because no copy of those datasets was available.
_SPECS = {
  "mnist": DatasetSpec("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,)),
  "fashion_mnist": DatasetSpec("fashion_mnist", 10, (28, 28, 1), (0.28604,), (0.35302,)),
  "cifar10": DatasetSpec(
    "cifar10",
    10,
    (32, 32, 3),
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
  ),
  "cifar100": DatasetSpec(
    "cifar100",
    100,
    (32, 32, 3),
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
  ),
  # ImageNet images vary in size; the stream resizes them to config.data.image_size,
  # whose default is the shape given here. Statistics: the widely published values.
  "imagenet2012": DatasetSpec(
    "imagenet2012",
    1000,
    (224, 224, 3),
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
  ),
}

SUPPORTED_DATASETS = tuple(_SPECS)

# Class names in label order, as tfds 4.9 names them. CIFAR names come from the
# dataset's own metadata file instead.
MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASS_NAMES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
# The class names of each dataset that source='idx' reads from IDX files,
# which hold only label numbers.
IDX_CLASS_NAMES = {"mnist": MNIST_CLASS_NAMES, "fashion_mnist": FASHION_MNIST_CLASS_NAMES}


def get_spec(name: str) -> DatasetSpec:
  """Return the spec of dataset `name`, or raise DataError if it is unsupported."""
  if name not in _SPECS:
    raise DataError(
      f"unknown dataset name {name!r}. Expected one of {', '.join(SUPPORTED_DATASETS)}"
    )
  return _SPECS[name]
