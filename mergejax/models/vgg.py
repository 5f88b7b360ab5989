"""VGG-11/16 for CIFAR (kuangliu / ZipIt! layout), optionally with BatchNorm.

Convolutions are 3x3 with padding 1 and a bias, each followed by BatchNorm (if `batch_norm`) and
ReLU; 'M' entries are 2x2 max pools; the classifier is one linear layer on the flattened
features (512*w at 32x32 input). Parameter names: `conv_{k}`, `bn_{k}` for the k-th conv,
`classifier`. Taps: `act_{k}` (post-ReLU output, after the following max pool if any, i.e. what
the next layer consumes) and `pre_act_{k}` (conv (+BatchNorm) output before the ReLU and pool,
the pre-activation REPAIR rescales).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from mergejax.models.base import BN_KWARGS, batch_norm, conv3x3

CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def conv_channels(depth: int, width: int) -> list[int]:
    """Output channels of each conv layer of VGG-`depth` at width multiplier `width`."""
    return [c * width for c in CONFIGS[depth] if c != "M"]


class VGG(nn.Module):
    """VGG-`depth` (11 or 16) at width multiplier `width`."""

    num_classes: int = 10
    depth: int = 11
    width: int = 1
    batch_norm: bool = True
    bn_momentum: float = BN_KWARGS["momentum"]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {self.depth}")
        k = 0
        layers = CONFIGS[self.depth]
        for i, item in enumerate(layers):
            if item == "M":
                continue
            x = conv3x3(item * self.width, use_bias=True, name=f"conv_{k}")(x)
            if self.batch_norm:
                x = batch_norm(train, self.bn_momentum, f"bn_{k}")(x)
            self.sow("intermediates", f"pre_act_{k}", x)
            x = nn.relu(x)
            if i + 1 < len(layers) and layers[i + 1] == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            self.sow("intermediates", f"act_{k}", x)
            k += 1
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="classifier")(x)
