"""A small convolutional network for 28x28 and 32x32 images."""

import flax.linen as nn
import jax


class SmallCNN(nn.Module):
  """Two 3x3 conv blocks (width, 2*width channels) with max pooling, then two dense layers.

  With `batch_norm`, each convolution is followed by BatchNorm, whose batch
  statistics couple the examples of a batch in training mode.
  """

  num_classes: int
  width: int = 32
  hidden: int = 128
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for features in (self.width, 2 * self.width):
      x = nn.Conv(features, (3, 3))(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)
