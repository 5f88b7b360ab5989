"""VGG in torchvision's layout (`vgg16`, `vgg16_bn`): features, 7x7 adaptive pool, 3 FC layers.

`features` is torch's Sequential of 3x3 convs (padding 1, bias), [BatchNorm], ReLU and 2x2 max
pools; `classifier` is Linear(512*7*7, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU-Dropout-
Linear(4096, num_classes). Parameter names are the torch Sequential indices (`features_0`,
`features_1`, ..., `classifier_0`, `classifier_3`, `classifier_6`), which keeps the converter a
rename. Dropout is omitted (identity, as in eval): `Model.apply_train` passes no dropout rng.
`width` scales the conv channels and `hidden` sets the FC width, so tests can run it tiny.

The flatten before `classifier_0` orders features (7, 7, C) here and (C, 7, 7) in torch: the
converter permutes that kernel's rows.

Taps: `act_{k}` (post-ReLU output of the k-th conv, after the following max pool if any) and
`hidden{0,1}` (post-ReLU outputs of the first two FC layers).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax.models.base import BN_KWARGS, batch_norm, conv3x3
from mergejax.models.vgg import CONFIGS

POOL_SIZE = 7  # torchvision's AdaptiveAvgPool2d((7, 7))


def feature_layers(depth: int, batch_norm: bool) -> list[tuple[int, int | None, int, bool]]:
    """Each conv of torch's `features` Sequential as (conv index, BatchNorm index or None,
    base channels, followed by a max pool).

    The numbering is that of torchvision's and kuangliu's / ZipIt!'s `_make_layers`: a conv takes
    one index, its BatchNorm the next, its ReLU the next, and each max pool one.
    """
    if depth not in CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
    cfg = CONFIGS[depth]
    layers, index = [], 0
    for i, item in enumerate(cfg):
        if item == "M":
            index += 1
            continue
        pool = i + 1 < len(cfg) and cfg[i + 1] == "M"
        layers.append((index, index + 1 if batch_norm else None, item, pool))
        index += 3 if batch_norm else 2
    return layers


def _pool_matrix(n: int, size: int) -> np.ndarray:
    """(size, n) averaging weights of torch's adaptive pooling of a length-n axis to `size`:
    output i averages inputs [floor(i*n/size), ceil((i+1)*n/size))."""
    m = np.zeros((size, n), np.float32)
    for i in range(size):
        start, end = (i * n) // size, -(-(i + 1) * n // size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch's `AdaptiveAvgPool2d((size, size))` on (B, H, W, C) -> (B, size, size, C)."""
    if x.shape[1] != size:
        x = jnp.einsum("ih,bhwc->biwc", _pool_matrix(x.shape[1], size), x)
    if x.shape[2] != size:
        x = jnp.einsum("jw,biwc->bijc", _pool_matrix(x.shape[2], size), x)
    return x


class TorchvisionVGG(nn.Module):
    """torchvision VGG-`depth` (11 or 16), with BatchNorm if `batch_norm`; conv channels scaled
    by `width`, FC width `hidden`."""

    num_classes: int = 1000
    depth: int = 16
    batch_norm: bool = False
    width: float = 1.0
    hidden: int = 4096
    bn_momentum: float = BN_KWARGS["momentum"]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        layers = feature_layers(self.depth, self.batch_norm)
        for k, (conv_index, bn_index, channels, pool) in enumerate(layers):
            features = int(channels * self.width)
            if features < 1:
                raise ValueError(f"VGG width {self.width} leaves conv {k} with no channels")
            x = conv3x3(features, use_bias=True, name=f"features_{conv_index}")(x)
            if bn_index is not None:
                x = batch_norm(train, self.bn_momentum, f"features_{bn_index}")(x)
            x = nn.relu(x)
            if pool:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            self.sow("intermediates", f"act_{k}", x)
        x = adaptive_avg_pool(x, POOL_SIZE).reshape(x.shape[0], -1)
        for i, name in enumerate(("classifier_0", "classifier_3")):
            x = nn.relu(nn.Dense(self.hidden, name=name)(x))
            self.sow("intermediates", f"hidden{i}", x)
        return nn.Dense(self.num_classes, name="classifier_6")(x)
