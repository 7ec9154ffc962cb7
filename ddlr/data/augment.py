"""Augmentation of the training batches held in device memory, run inside the jitted train step.

`crop_flip` is the standard CIFAR augmentation: pad every image by 4 pixels on
each side, take a random crop of the original size and flip it horizontally
with probability 1/2, with an independent draw for every example. ImageNet's
`inception_crop` runs in the tf.data pipeline instead (`ddlr.data.imagenet`).
"""

import jax
import jax.numpy as jnp

# `none` leaves the batch unchanged; `crop_flip` runs on device (this module);
# `inception_crop` runs in the ImageNet tf.data pipeline.
AUGMENTATIONS = ("none", "crop_flip", "inception_crop")
ON_DEVICE_AUGMENTATIONS = ("none", "crop_flip")
CROP_PADDING = 4


def crop_flip(rng: jax.Array, images: jax.Array, padding: int = CROP_PADDING) -> jax.Array:
  """Randomly crops and horizontally flips every image of a batch.

  Each image is padded with `padding` zeros on every side and cropped back to
  its own height and width at an offset drawn uniformly from
  `[0, 2 * padding]` in each direction, then mirrored left to right with
  probability 1/2. The batch contains normalised images, so a zero pad is the
  dataset's mean colour, not black.

  Args:
    rng: PRNG key; the same key gives the same crops and flips.
    images: `[B, H, W, C]` batch.
    padding: pixels of zero padding on each side.

  Returns:
    The augmented batch, same shape and dtype as `images`.
  """
  batch_size, height, width, channels = images.shape
  offset_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(offset_rng, (batch_size, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_rng, 0.5, (batch_size,))
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def crop_one(image, offset, flip):
    window = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
    return jnp.where(flip, window[:, ::-1], window)

  return jax.vmap(crop_one)(padded, offsets, flips)


def augment_batch(augmentation: str, rng: jax.Array, images: jax.Array) -> jax.Array:
  """Applies the on-device `augmentation` to a training batch and returns it.

  Raises:
    ValueError: `augmentation` is not one of `ON_DEVICE_AUGMENTATIONS`.
  """
  if augmentation == "none":
    return images
  if augmentation == "crop_flip":
    return crop_flip(rng, images)
  raise ValueError(
    f"augmentation {augmentation!r} does not run on device; expected one of "
    f"{ON_DEVICE_AUGMENTATIONS}"
  )
