"""Wide residual network (WRN-d-k) for 32x32 inputs, WRN-28-10 by default.

Follows Zagoruyko and Komodakis, "Wide Residual Networks" (2016),
https://arxiv.org/abs/1605.07146: pre-activation blocks of two 3x3 convolutions
(BatchNorm, ReLU, convolution, twice), three groups of `(depth - 4) / 6` blocks with
`16k`, `32k` and `64k` channels, and optional dropout between the two convolutions of
a block.
"""

import functools

import flax.linen as nn
import jax


class WideBlock(nn.Module):
  """Pre-activation residual block of two 3x3 convolutions with optional dropout."""

  features: int
  strides: int = 1
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)

    preactivated = nn.relu(norm()(x))
    # A block that changes the shape projects the pre-activated input, as the
    # authors' code does, so the shortcut and the residual see the same BatchNorm.
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = conv(self.features, (1, 1), strides=self.strides)(preactivated)

    residual = conv(self.features, (3, 3), strides=self.strides)(preactivated)
    residual = nn.relu(norm()(residual))
    if self.dropout_rate > 0.0:
      residual = nn.Dropout(self.dropout_rate, deterministic=not train)(residual)
    residual = conv(self.features, (3, 3))(residual)
    return residual + shortcut


class WideResNet(nn.Module):
  """WRN-`depth`-`widen_factor`: a 3x3 stem, three groups of wide blocks and a classifier.

  The default `dropout_rate=0.0` trains without dropout. The authors' best WRN-28-10
  CIFAR errors are with dropout, 0.3 in their training example.

  NOTE: a positive `dropout_rate` needs a `"dropout"` RNG in `model.apply` when
  `train=True`, and `ddlr.steps` does not pass one.
  """

  num_classes: int
  depth: int = 28
  widen_factor: int = 10
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.depth < 10 or (self.depth - 4) % 6 != 0:
      raise ValueError(
        f"WideResNet depth={self.depth} is invalid; expected 6n + 4 for n >= 1 (10, 16, 22, 28, …)."
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    blocks_per_group = (self.depth - 4) // 6

    x = nn.Conv(16, (3, 3), use_bias=False, kernel_init=nn.initializers.he_normal())(x)
    for group, strides in enumerate((1, 2, 2)):
      features = 16 * self.widen_factor * 2**group
      for index in range(blocks_per_group):
        x = WideBlock(
          features, strides=strides if index == 0 else 1, dropout_rate=self.dropout_rate
        )(x, train=train)

    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
