"""A multi-layer perceptron on flattened inputs (Dense-ReLU blocks and a linear head).

Taps: `hidden{i}` (post-ReLU output of Dense layer i) and `pre_hidden{i}` (the Dense output before
the ReLU, which REPAIR rescales). Inputs (B, H, W, C) are flattened in (H, W, C) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """`len(hidden)` Dense+ReLU layers named `dense_{i}`, then the head `linear`."""

    num_classes: int = 10
    hidden: Sequence[int] = (256, 256)
    bn_momentum: float = 0.9  # unused (no BatchNorm); keeps the Model surface uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            self.sow("intermediates", f"pre_hidden{i}", x)
            x = nn.relu(x)
            self.sow("intermediates", f"hidden{i}", x)
        return nn.Dense(self.num_classes, name="linear")(x)
