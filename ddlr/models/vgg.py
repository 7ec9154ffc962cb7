"""VGG-16 with BatchNorm for 32x32 inputs (the CIFAR variant).

Follows the 13-convolution configuration D of Simonyan and Zisserman, "Very Deep
Convolutional Networks for Large-Scale Image Recognition" (2014),
https://arxiv.org/abs/1409.1556, with the CIFAR adaptation of Zagoruyko's
`vgg_bn_drop.lua` (https://github.com/szagoruyko/cifar.torch): BatchNorm after every
convolution and a classifier of one 512-unit hidden layer with BatchNorm on the 512
features left after five 2x2 max poolings. Unlike that model, convolutions and the
hidden dense layer have no bias because the BatchNorm after them cancels it, and
dropout appears only in the classifier. With `hidden_layer=False` the classifier is a
single dense layer, the other CIFAR variant in common use.
"""

import functools

import flax.linen as nn
import jax

# Output channels of the 13 convolutions as multiples of `width`, with "M" for 2x2 max
# pooling. With `width=64` this is configuration D: 64, 64, M, 128, 128, M, ….
VGG16_LAYERS = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


class VGG16BN(nn.Module):
  """VGG-16 with BatchNorm: 13 3x3 convolutions, 5 max poolings and a dense classifier.

  `width` is the channel count of the first convolutions (64 in the paper), and the
  later ones have 2, 4 or 8 times as many. The hidden dense layer, present when
  `hidden_layer` is true, has `8 * width` units. `dropout_rate` applies before every
  dense layer. The default 0.0 trains without dropout, where Zagoruyko's model uses
  0.5 there and 0.3 to 0.4 inside the convolution stack.

  NOTE: a positive `dropout_rate` needs a `"dropout"` RNG in `model.apply` when
  `train=True`, and `ddlr.steps` does not pass one.
  """

  num_classes: int
  width: int = 64
  hidden_layer: bool = True
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)

    for layer in VGG16_LAYERS:
      if layer == "M":
        # SAME padding rounds odd sizes up, so 28x28 inputs also end at 1x1.
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        continue
      x = nn.Conv(
        layer * self.width, (3, 3), use_bias=False, kernel_init=nn.initializers.he_normal()
      )(x)
      x = nn.relu(norm()(x))

    # The map is 1x1 for 28x28 and 32x32 inputs, where the mean equals flattening.
    x = x.mean(axis=(1, 2))
    if self.hidden_layer:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.Dense(8 * self.width, use_bias=False)(x)
      x = nn.relu(norm()(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)
