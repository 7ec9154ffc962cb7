"""Tests of the registered image models: exact parameter counts and a tiny training pass.

Parameter counts include BatchNorm scales and biases but not the running statistics,
as PyTorch's `sum(p.numel() for p in model.parameters())` does, so they compare
directly with published figures.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ddlr.models import MODELS, create_model
from ddlr.models.resnet import Bottleneck, ResNet

# Each case: model config, number of classes, input size, exact count as a sum of its
# parts (derived by hand in the comment), and the published count or None.
PARAMETER_COUNTS = {
  # A basic block with c_in inputs and c channels has two 3x3 convolutions
  # (9*c_in*c + 9*c*c) and two BatchNorms (2*2c). The first block of stages 2 to 4 adds
  # a 1x1 projection (c_in*c) and its BatchNorm (2c). This sums to 147_968, 525_568,
  # 2_099_712 and 8_393_728 for the four stages of two blocks. The 3x3 stem conv has
  # 1_728 weights and a BatchNorm of 128, and the 512x10 dense layer has 5_130. PyTorch
  # CIFAR ResNet-18 ports with these layers report 11,173,962.
  "resnet18_cifar": (
    {"name": "resnet18"},
    10,
    32,
    (1_728 + 128) + 147_968 + 525_568 + 2_099_712 + 8_393_728 + (512 * 10 + 10),
    11.17e6,
  ),
  # A bottleneck block with c_in inputs and width c has 1x1, 3x3 and 1x1 convolutions
  # (c_in*c + 9*c*c + 4*c*c) and BatchNorms (2c + 2c + 8c). The first block of each
  # stage adds a 1x1 projection (c_in*4c) and its BatchNorm (8c). Stages of 3, 4, 6 and
  # 3 blocks sum to 215_808, 1_219_584, 7_098_368 and 14_964_736. The 7x7 stem conv has
  # 9_408 weights, and the 2048x1000 dense layer has 2_049_000. torchvision's docs list
  # num_params 25,557,032 for resnet50.
  "resnet50_imagenet": (
    {"name": "resnet50", "stem": "imagenet"},
    1000,
    224,
    (9_408 + 128) + 215_808 + 1_219_584 + 7_098_368 + 14_964_736 + (2048 * 1000 + 1000),
    25.56e6,
  ),
  # The CIFAR ResNet-18 count with the 7x7 stem conv and 1000 classes. torchvision
  # lists num_params 11,689,512 for resnet18.
  "resnet18_imagenet": (
    {"name": "resnet18", "stem": "imagenet"},
    1000,
    224,
    (9_408 + 128) + 147_968 + 525_568 + 2_099_712 + 8_393_728 + (512 * 1000 + 1000),
    11.69e6,
  ),
  # ResNet-18's stages plus one, two, four and one more identity blocks, each with
  # 2*9*c*c + 4c parameters for c = 64, 128, 256 and 512.
  "resnet34_cifar": (
    {"name": "resnet34"},
    10,
    32,
    (1_728 + 128)
    + (147_968 + 73_984)
    + (525_568 + 2 * 295_424)
    + (2_099_712 + 4 * 1_180_672)
    + (8_393_728 + 4_720_640)
    + (512 * 10 + 10),
    None,
  ),
  # On 32x32x3 inputs: a 5x5 conv to 32 channels (2_400 weights) and a 3x3 conv to
  # 64 (18_432), both of stride 2, leave 8x8x64 = 4_096 features for the 4096x128 and
  # 128x10 dense layers (524_416 and 1_290 with biases). Convolutions have 32 + 64
  # biases without BatchNorm, and BatchNorms of 2*32 + 2*64 in their place with it.
  "small_cnn": (
    {"name": "small_cnn"},
    10,
    32,
    2_400 + 18_432 + 96 + 524_416 + 1_290,
    None,
  ),
  "small_cnn_batch_norm": (
    {"name": "small_cnn", "batch_norm": True},
    10,
    32,
    2_400 + 18_432 + 192 + 524_416 + 1_290,
    None,
  ),
  # A pre-activation block with c_in inputs and c channels has BatchNorms (2*c_in + 2c)
  # and two 3x3 convolutions (9*c_in*c + 9*c*c). The first block of each group adds a
  # 1x1 projection (c_in*c). Groups of four blocks with 160, 320 and 640 channels sum to
  # 1_640_672, 6_968_000 and 27_862_400. The 3x3 stem conv has 432 weights, the final
  # BatchNorm 1_280 and the 640x10 dense layer 6_410. osmr/imgclsmob's CIFAR-10 table
  # lists 36,479,194 for WRN-28-10, and the paper rounds it to 36.5M.
  "wide_resnet_28_10": (
    {"name": "wide_resnet"},
    10,
    32,
    432 + 1_640_672 + 6_968_000 + 27_862_400 + 1_280 + (640 * 10 + 10),
    36.5e6,
  ),
  # 13 bias-free 3x3 convolutions have 14_710_464 weights, and their BatchNorms over
  # 4_224 channels have 8_448 parameters. The bias-free 512x512 hidden layer and its
  # BatchNorm add 262_144 + 1_024, and the 512x10 dense layer 5_130. Zagoruyko's
  # vgg_bn_drop.lua has the same layers with 4_224 + 512 biases more, 14,991,946 in all,
  # which is the roughly 15M usually quoted for CIFAR VGG-16.
  "vgg16_bn_cifar": (
    {"name": "vgg16_bn"},
    10,
    32,
    14_710_464 + 8_448 + (262_144 + 1_024) + (512 * 10 + 10),
    15.0e6,
  ),
  # The same convolutions with only the 512x10 dense layer. With convolution biases
  # this variant has 4_224 more, 14,728,266, as several CIFAR codebases report.
  "vgg16_bn_cifar_single_dense": (
    {"name": "vgg16_bn", "hidden_layer": False},
    10,
    32,
    14_710_464 + 8_448 + (512 * 10 + 10),
    None,
  ),
  # A bottleneck layer on c channels has 50c + 5_280 parameters: BatchNorm 2c, 1x1
  # conv c*48, BatchNorm 96 and 3x3 conv 9*48*12. A block of 16 layers entered with c0
  # channels, growing by 12 per layer, has 800*c0 + 156_480. Blocks start at 24, 108 and
  # 150 channels and end at 216, 300 and 342. The transitions have a BatchNorm (2c) and
  # a c x c/2 conv on 216 and 300 channels. The 3x3 stem conv to 24 channels has 648
  # weights, the final BatchNorm 684 and the 342x10 dense layer 3_430. osmr/imgclsmob's
  # CIFAR-10 table lists 769,162 for DenseNet-BC-100 (k=12), and the paper rounds it
  # to 0.8M.
  "densenet_bc_100_12": (
    {"name": "densenet_bc"},
    10,
    32,
    648
    + (800 * 24 + 156_480)
    + (432 + 216 * 108)
    + (800 * 108 + 156_480)
    + (600 + 300 * 150)
    + (800 * 150 + 156_480)
    + 684
    + (342 * 10 + 10),
    0.77e6,
  ),
}


def _count_parameters(model, image_size: int) -> int:
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(
    lambda key, x: model.init(key, x, train=False), jax.random.key(0), images
  )
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("case", sorted(PARAMETER_COUNTS))
def test_parameter_count_exact(case):
  config, num_classes, image_size, expected, published = PARAMETER_COUNTS[case]
  model = create_model(ml_collections.ConfigDict(config), num_classes)

  count = _count_parameters(model, image_size)

  assert count == expected
  if published is not None:
    assert abs(count - published) <= 0.01 * published


def test_parameter_counts_literal():
  # The sums above, evaluated, so a reader can compare with published exact figures.
  expected = {case: value[3] for case, value in PARAMETER_COUNTS.items()}
  assert expected == {
    "resnet18_cifar": 11_173_962,
    "resnet50_imagenet": 25_557_032,
    "resnet18_imagenet": 11_689_512,
    "resnet34_cifar": 21_282_122,
    "wide_resnet_28_10": 36_479_194,
    "vgg16_bn_cifar": 14_987_210,
    "vgg16_bn_cifar_single_dense": 14_724_042,
    "densenet_bc_100_12": 769_162,
    "small_cnn": 546_634,
    "small_cnn_batch_norm": 546_730,
  }


def test_models_registered():
  expected = {"resnet18", "resnet34", "resnet50", "wide_resnet", "vgg16_bn", "densenet_bc"}
  assert expected <= set(MODELS)


@pytest.mark.parametrize(
  ("config", "message"),
  [
    ({"name": "resnet18", "stem": "tiny"}, "stem='tiny' is unknown"),
    ({"name": "wide_resnet", "depth": 27}, "depth=27 is invalid"),
    ({"name": "densenet_bc", "depth": 99}, "depth=99 is invalid"),
    ({"name": "densenet_bc", "compression": 0.0}, "compression=0.0 is invalid"),
    ({"name": "resnet18", "batch_norm": True}, "resnet18 does not take the field batch_norm"),
    ({"name": "nosuch"}, "config.model.name='nosuch' is unknown"),
  ],
)
def test_invalid_config_raises(config, message):
  with pytest.raises(ValueError, match=message):
    create_model(ml_collections.ConfigDict(config), 10)


# Reduced models for one real training pass each. On a loaded 2-core CPU (jax 0.10.2),
# XLA takes 4 to 7 s to compile the gradient of each at optimization level 0 and about
# twice that at the default level, so the cases are few and small. Level 0 turns down
# only the LLVM optimization of the compiled code.
TINY_MODELS = {
  "resnet18": (MODELS["resnet18"](num_classes=5, width=4), 8),
  "resnet_bottleneck_imagenet_stem": (
    ResNet(num_classes=5, stage_sizes=(1, 1), block=Bottleneck, stem="imagenet", width=2),
    16,
  ),
  # Depth 10 has one block per group. The first group keeps 16 channels, so it covers
  # the identity shortcut, and dropout covers the "dropout" RNG path.
  "wide_resnet": (
    MODELS["wide_resnet"](num_classes=5, depth=10, widen_factor=1, dropout_rate=0.3),
    8,
  ),
  # At 32x32 the last convolutions see 2x2 maps. On 1x1 maps a BatchNorm over two
  # examples outputs nearly +-1 whatever its input, which leaves the gradient near 0.
  "vgg16_bn": (MODELS["vgg16_bn"](num_classes=5, width=2), 32),
  "densenet_bc": (MODELS["densenet_bc"](num_classes=5, depth=10, growth_rate=4), 8),
}


def _host_variables(model, images):
  """Builds He-normal kernels, unit BatchNorm scales and zero biases with NumPy.

  Compiling `model.init` costs XLA more than the gradient itself (38 s for the tiny
  VGG with a threefry key on the loaded 2-core CPU above), so the tests fill the
  abstract variables on the host.
  """
  shapes = jax.eval_shape(lambda key: model.init(key, images, train=False), jax.random.key(0))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(leaf.dtype)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(
  jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0}
)
def _loss_and_gradient(model, variables, images, labels, dropout_key):
  def loss_fn(params):
    logits, mutated = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      images,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": dropout_key},
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, mutated["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    variables["params"]
  )
  return loss, logits, batch_stats, grads


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_trains(name):
  # NumPy builds the inputs and checks the outputs because every eager jax.numpy call
  # on a new shape costs one more XLA compilation.
  model, image_size = TINY_MODELS[name]
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, image_size, image_size, 3)).astype(np.float32)
  labels = np.array([0, 3], np.int32)
  variables = _host_variables(model, images)

  loss, logits, batch_stats, grads = jax.device_get(
    _loss_and_gradient(model, variables, images, labels, jax.random.key(2))
  )

  assert logits.shape == (2, 5)
  assert np.isfinite(loss)
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads))
  assert jax.tree.structure(batch_stats) == jax.tree.structure(variables["batch_stats"])
  stats_changed = jax.tree.map(
    lambda new, old: bool(np.any(new != np.asarray(old))), batch_stats, variables["batch_stats"]
  )
  assert all(jax.tree.leaves(stats_changed))
