"""ResNet-18, -34 and -50 with a CIFAR or an ImageNet stem.

Follows He et al., "Deep Residual Learning for Image Recognition" (2015),
https://arxiv.org/abs/1512.03385, with projection shortcuts (1x1 convolution and
BatchNorm) wherever the shape changes, which is option B of that paper. The bottleneck
block puts its stride on the 3x3 convolution, as torchvision does ("ResNet v1.5"),
where the paper puts it on the first 1x1 convolution. Both placements have the same
parameters.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
  """Residual block of two 3x3 convolutions, used by ResNet-18 and ResNet-34."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)

    residual = conv(self.features, (3, 3), strides=self.strides)(x)
    residual = nn.relu(norm()(residual))
    residual = conv(self.features, (3, 3))(residual)
    residual = norm()(residual)

    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = norm()(conv(self.features, (1, 1), strides=self.strides)(x))
    return nn.relu(residual + shortcut)


class Bottleneck(nn.Module):
  """Residual block of 1x1, 3x3 and 1x1 convolutions with 4x as many output channels.

  `features` is the width of the inner 3x3 convolution, so the block outputs
  `4 * features` channels. ResNet-50 and deeper use this block.
  """

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    out_features = 4 * self.features

    residual = nn.relu(norm()(conv(self.features, (1, 1))(x)))
    residual = conv(self.features, (3, 3), strides=self.strides)(residual)
    residual = nn.relu(norm()(residual))
    residual = norm()(conv(out_features, (1, 1))(residual))

    shortcut = x
    if x.shape[-1] != out_features or self.strides != 1:
      shortcut = norm()(conv(out_features, (1, 1), strides=self.strides)(x))
    return nn.relu(residual + shortcut)


class ResNet(nn.Module):
  """Residual network of four stages, global average pooling and a dense classifier.

  Stage `i` has `stage_sizes[i]` blocks whose convolutions have `width * 2**i`
  channels, and every stage after the first halves the spatial size in its first
  block. The `"cifar"` stem is one 3x3 convolution with stride 1 and no pooling, for
  32x32 inputs. The `"imagenet"` stem is a 7x7 convolution with stride 2 followed by
  3x3 max pooling with stride 2, for 224x224 inputs.
  """

  num_classes: int
  stage_sizes: Sequence[int]
  block: type[BasicBlock] | type[Bottleneck]
  stem: str = "cifar"
  width: int = 64

  def __post_init__(self):
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem={self.stem!r} is unknown; expected one of {STEMS}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
    if self.stem == "cifar":
      x = conv(self.width, (3, 3))(x)
    else:
      x = conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block(self.width * 2**stage, strides=strides)(x, train=train)

    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
