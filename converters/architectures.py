"""The registered layouts, one builder per architecture (torch key names are the published ones).

- `mlp`: a torch MLP `dense.{i}` (nn.ModuleList of Linear) + `linear`, applied to `x.flatten(1)`
  of an NCHW input, so the first layer's rows are reordered from (C, H, W) to (H, W, C).
- `resnet20`, `resnet`: the ZipIt! CIFAR ResNet (`models/resnets.py`): conv1, bn1,
  layer{s}.{b}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear.
- `vgg11`, `vgg16`: kuangliu / ZipIt! VGG: `features.{i}` Sequential of Conv(bias), [BatchNorm],
  ReLU, MaxPool; `classifier` Linear.
- `resnet50`: torchvision ResNet-50: conv1, bn1, layer{s}.{b}.{conv1..3,bn1..3,downsample.0/1}, fc.
- `tv_vgg16`, `tv_vgg16_bn`: torchvision VGG-16: `features.{i}`, classifier.{0,3,6}.
"""

from __future__ import annotations

from mergejax.converters.layout import InputShape, Part, batch_norm, conv, dense, register
from mergejax.models.mlp import MLP
from mergejax.models.resnet import ResNet
from mergejax.models.resnet50 import EXPANSION, ResNet50
from mergejax.models.tv_vgg import POOL_SIZE, TorchvisionVGG, feature_layers
from mergejax.models.vgg import VGG


@register("mlp", input_shape=(8, 8, 1))
def mlp_layout(m: MLP, input_shape: InputShape) -> list[Part]:
    """Linear layers `dense.{i}` then `linear`; `input_shape` fixes the first layer's inputs."""
    h, w, c = input_shape
    parts = []
    for i in range(len(m.hidden)):
        parts += dense(f"dense.{i}", f"dense_{i}", chw=(c, h, w) if i == 0 else None)
    parts += dense("linear", "linear", chw=(c, h, w) if not m.hidden else None)
    return parts


@register("resnet20")
@register("resnet")
def zipit_resnet_layout(m: ResNet, input_shape: InputShape) -> list[Part]:
    """Stem, 3 stages of BasicBlocks (3x3 conv + BN shortcut on the first block of stages 2-3)."""
    del input_shape  # global average pooling: no flatten order to fix
    parts = conv("conv1", "conv1") + batch_norm("bn1", "bn1")
    for stage in (1, 2, 3):
        for block in range(m.blocks_per_stage):
            t, f = f"layer{stage}.{block}", f"layer{stage}_{block}"
            parts += conv(f"{t}.conv1", f"{f}/conv1") + batch_norm(f"{t}.bn1", f"{f}/bn1")
            parts += conv(f"{t}.conv2", f"{f}/conv2") + batch_norm(f"{t}.bn2", f"{f}/bn2")
            if stage > 1 and block == 0:  # the only blocks whose shape changes
                parts += conv(f"{t}.shortcut.0", f"{f}/shortcut_conv")
                parts += batch_norm(f"{t}.shortcut.1", f"{f}/shortcut_bn")
    return parts + dense("linear", "linear")


def _vgg_features(depth: int, bn: bool, f_conv, f_bn) -> list[Part]:
    """`features.{i}` convs (+ BatchNorms) named `f_conv(k, i)` / `f_bn(k, i)` in Flax."""
    parts = []
    for k, (conv_index, bn_index, _, _) in enumerate(feature_layers(depth, bn)):
        parts += conv(f"features.{conv_index}", f_conv(k, conv_index), bias=True)
        if bn_index is not None:
            parts += batch_norm(f"features.{bn_index}", f_bn(k, bn_index))
    return parts


@register("vgg11")
@register("vgg16")
def zipit_vgg_layout(m: VGG, input_shape: InputShape) -> list[Part]:
    """kuangliu / ZipIt! VGG; its classifier sees the last map flattened (1x1 at 32x32 input)."""
    layers = feature_layers(m.depth, m.batch_norm)
    shrink = 2 ** sum(pool for *_, pool in layers)
    channels = layers[-1][2] * m.width
    chw = (channels, input_shape[0] // shrink, input_shape[1] // shrink)
    parts = _vgg_features(m.depth, m.batch_norm, lambda k, i: f"conv_{k}", lambda k, i: f"bn_{k}")
    return parts + dense("classifier", "classifier", chw=chw)


@register("resnet50", input_shape=(224, 224, 3))
def torchvision_resnet50_layout(m: ResNet50, input_shape: InputShape) -> list[Part]:
    """Stem, 4 stages of Bottlenecks (1x1 conv + BN downsample on each stage's first block)."""
    del input_shape  # global average pooling
    parts = conv("conv1", "conv1") + batch_norm("bn1", "bn1")
    in_channels = m.planes(1)
    for stage, blocks in enumerate(m.stage_sizes, start=1):
        planes = m.planes(stage)
        for block in range(blocks):
            t, f = f"layer{stage}.{block}", f"layer{stage}_{block}"
            for i in (1, 2, 3):
                parts += conv(f"{t}.conv{i}", f"{f}/conv{i}")
                parts += batch_norm(f"{t}.bn{i}", f"{f}/bn{i}")
            stride = 2 if stage > 1 and block == 0 else 1
            if stride != 1 or in_channels != planes * EXPANSION:  # as the model decides
                parts += conv(f"{t}.downsample.0", f"{f}/downsample_conv")
                parts += batch_norm(f"{t}.downsample.1", f"{f}/downsample_bn")
            in_channels = planes * EXPANSION
    return parts + dense("fc", "fc")


@register("tv_vgg16", input_shape=(224, 224, 3))
@register("tv_vgg16_bn", input_shape=(224, 224, 3))
def torchvision_vgg_layout(m: TorchvisionVGG, input_shape: InputShape) -> list[Part]:
    """Features with names mirroring the Sequential indices; the first FC layer sees the 7x7
    adaptive-pooled map flattened, (C, 7, 7) in torch and (7, 7, C) in Flax."""
    del input_shape  # the adaptive pool fixes the flattened map at 7x7
    name = lambda k, i: f"features_{i}"
    parts = _vgg_features(m.depth, m.batch_norm, name, name)
    channels = int(feature_layers(m.depth, m.batch_norm)[-1][2] * m.width)
    parts += dense("classifier.0", "classifier_0", chw=(channels, POOL_SIZE, POOL_SIZE))
    return parts + dense("classifier.3", "classifier_3") + dense("classifier.6", "classifier_6")
