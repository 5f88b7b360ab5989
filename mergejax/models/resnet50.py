"""ResNet-50 in torchvision's layout (v1.5: the stride sits on the 3x3 conv of a Bottleneck).

7x7 stride-2 stem conv (padding 3) + BatchNorm + ReLU + 3x3 stride-2 max pool (padding 1), four
stages of Bottleneck blocks (1x1 -> 3x3 -> 1x1 convs, expansion 4) with `stage_sizes` blocks each,
a 1x1 conv + BatchNorm `downsample` shortcut where the shape changes, global average pooling and
the head `fc`. Parameter names mirror the torch state_dict (`layer1_0/downsample_conv` is
`layer1.0.downsample.0`). `width` scales every channel count (1.0 = torchvision's 64..2048), so
tests can run it tiny.

Taps (post-ReLU, what the next layer consumes): `stem` (after the max pool),
`layer{s}_{b}/inner1` and `layer{s}_{b}/inner2` (a block's two hidden spaces) and `stream{s}`
(stage s's residual stream).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax.models.base import BN_KWARGS, batch_norm, conv3x3

EXPANSION = 4


def conv1x1(features: int, stride: int = 1, name: str | None = None):
    """A bias-free 1x1 convolution (torch padding 0: 'VALID' takes the same pixels at stride 2)."""
    return nn.Conv(features, (1, 1), strides=(stride, stride), padding="VALID", use_bias=False,
                   name=name)


class Bottleneck(nn.Module):
    """conv1x1-bn-relu, conv3x3(stride)-bn-relu, conv1x1-bn, plus shortcut, then relu.

    `planes` is the hidden width; the block outputs `planes * 4` channels.
    """

    planes: int
    stride: int
    bn_momentum: float = BN_KWARGS["momentum"]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: batch_norm(train, self.bn_momentum, name)
        out = nn.relu(bn("bn1")(conv1x1(self.planes, name="conv1")(x)))
        self.sow("intermediates", "inner1", out)
        out = nn.relu(bn("bn2")(conv3x3(self.planes, self.stride, name="conv2")(out)))
        self.sow("intermediates", "inner2", out)
        out = bn("bn3")(conv1x1(self.planes * EXPANSION, name="conv3")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes * EXPANSION:
            shortcut = conv1x1(self.planes * EXPANSION, self.stride, name="downsample_conv")(x)
            shortcut = bn("downsample_bn")(shortcut)
        return nn.relu(out + shortcut)


class ResNet50(nn.Module):
    """torchvision ResNet-50 (`stage_sizes` (3, 4, 6, 3)); channels scaled by `width`."""

    num_classes: int = 1000
    width: float = 1.0
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    bn_momentum: float = BN_KWARGS["momentum"]

    def planes(self, stage: int) -> int:
        """Hidden width of the Bottlenecks of `stage` (1-based): 64 * 2**(stage-1) * width."""
        planes = int(64 * 2 ** (stage - 1) * self.width)
        if planes < 1:
            raise ValueError(f"ResNet50 width {self.width} leaves stage {stage} with no channels")
        return planes

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(self.planes(1), (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                    use_bias=False, name="conv1")(x)
        x = batch_norm(train, self.bn_momentum, "bn1")(x)
        x = nn.relu(x)
        # flax pads max pools with -inf, as torch does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self.sow("intermediates", "stem", x)
        for stage, blocks in enumerate(self.stage_sizes, start=1):
            for block in range(blocks):
                stride = 2 if stage > 1 and block == 0 else 1
                x = Bottleneck(self.planes(stage), stride, self.bn_momentum,
                               name=f"layer{stage}_{block}")(x, train)
            self.sow("intermediates", f"stream{stage}", x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)
