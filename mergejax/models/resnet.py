"""CIFAR ResNet-20 (any width, any 6k+2 depth) in the layout of the ZipIt! repository.

3x3 stem, three stages of 16w/32w/64w channels, BasicBlocks with bias-free 3x3 convolutions and
BatchNorm, a 3x3 conv + BatchNorm shortcut where the shape changes, global average pooling and
one linear head. Parameter names mirror the torch state_dict (`layer2_0/shortcut_conv` is
`layer2.0.shortcut.0`), which keeps the converter a rename.

Taps (consumer inputs, post-ReLU, as ZipIt! observes them): `layer{s}_{b}/inner` (a block's
hidden channels) and `stream{s}` (stage s's residual stream, seen at the next stage's input or
before pooling).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax.models.base import BN_KWARGS, batch_norm, conv3x3


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus shortcut, then relu."""

    planes: int
    stride: int
    bn_momentum: float = BN_KWARGS["momentum"]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: batch_norm(train, self.bn_momentum, name)
        out = nn.relu(bn("bn1")(conv3x3(self.planes, self.stride, name="conv1")(x)))
        self.sow("intermediates", "inner", out)
        out = bn("bn2")(conv3x3(self.planes, name="conv2")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = bn("shortcut_bn")(conv3x3(self.planes, self.stride, name="shortcut_conv")(x))
        return nn.relu(out + shortcut)


class ResNet(nn.Module):
    """CIFAR-style ResNet of `depth` = 6k+2 layers, channel widths (16, 32, 64) * `width`."""

    num_classes: int = 10
    width: int = 1
    depth: int = 20
    bn_momentum: float = BN_KWARGS["momentum"]

    @property
    def blocks_per_stage(self) -> int:
        if (self.depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6k+2, got {self.depth}")
        return (self.depth - 2) // 6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv3x3(16 * self.width, name="conv1")(x)
        x = batch_norm(train, self.bn_momentum, "bn1")(x)
        x = nn.relu(x)
        for stage, planes in enumerate((16, 32, 64), start=1):
            for block in range(self.blocks_per_stage):
                stride = 2 if stage > 1 and block == 0 else 1
                x = BasicBlock(planes * self.width, stride, self.bn_momentum,
                               name=f"layer{stage}_{block}")(x, train)
            self.sow("intermediates", f"stream{stage}", x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(x)
