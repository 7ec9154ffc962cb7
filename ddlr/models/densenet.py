"""DenseNet-BC for 32x32 inputs, DenseNet-BC-100 with growth rate 12 by default.

Follows Huang et al., "Densely Connected Convolutional Networks" (2016),
https://arxiv.org/abs/1608.06993: a 3x3 convolution with `2 * growth_rate` channels,
three dense blocks of `(depth - 4) / 6` bottleneck layers, and between blocks a
transition that compresses the channels by `compression` and halves the spatial size.
There is no dropout, as in the paper's runs on augmented CIFAR.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


class DenseLayer(nn.Module):
  """Bottleneck layer (BatchNorm, ReLU, 1x1 and 3x3 convolutions) that appends its output.

  The 1x1 convolution has `4 * growth_rate` channels and the 3x3 one `growth_rate`, and
  the result is concatenated to the input channels.
  """

  growth_rate: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)

    y = conv(4 * self.growth_rate, (1, 1))(nn.relu(norm()(x)))
    y = conv(self.growth_rate, (3, 3))(nn.relu(norm()(y)))
    return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
  """BatchNorm, ReLU, a 1x1 convolution to `features` channels and 2x2 average pooling."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=nn.initializers.he_normal())(
      nn.relu(x)
    )
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNetBC(nn.Module):
  """DenseNet-BC-`depth` with growth rate `growth_rate`: three dense blocks and a classifier.

  A transition keeps `floor(compression * channels)` of the channels of the block
  before it.
  """

  num_classes: int
  depth: int = 100
  growth_rate: int = 12
  compression: float = 0.5

  def __post_init__(self):
    if self.depth < 10 or (self.depth - 4) % 6 != 0:
      raise ValueError(
        f"DenseNetBC depth={self.depth} is invalid; expected 6n + 4 for n >= 1 (10, 40, 100, …)."
      )
    if not 0.0 < self.compression <= 1.0:
      raise ValueError(
        f"DenseNetBC compression={self.compression} is invalid; expected 0 < compression <= 1."
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    layers_per_block = (self.depth - 4) // 6

    x = nn.Conv(
      2 * self.growth_rate, (3, 3), use_bias=False, kernel_init=nn.initializers.he_normal()
    )(x)
    for block in range(3):
      for _ in range(layers_per_block):
        x = DenseLayer(self.growth_rate)(x, train=train)
      if block < 2:
        x = Transition(int(self.compression * x.shape[-1]))(x, train=train)

    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
