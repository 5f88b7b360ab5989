"""Compact-Transformers CCT checkpoints <-> `mergejax.models.cct.CCT` (every named size).

Key names and shapes of SHI-Labs/Compact-Transformers' `CCT` (`src/cct.py`, `src/utils/
tokenizer.py`, `src/utils/transformers.py`), in its state_dict order (a module's own parameters
before its submodules'):

- `tokenizer.conv_layers.{j}.0.weight` (C_out, C_in, k, k): convolution j (no bias; `.1` is the
  ReLU and `.2` the max-pool, which hold no tensors);
- `classifier.positional_emb` (1, T, D): the learnable positions or the fixed sine table (a
  `Parameter` with `requires_grad=False`, saved all the same); absent with "none";
- `classifier.attention_pool.{weight (1, D), bias (1,)}`: sequence pooling's scorer;
- `classifier.blocks.{i}.pre_norm`, `.self_attn.qkv.weight` (3D, D), no bias, rows 0:D the
  queries, D:2D the keys, 2D:3D the values (its forward reshapes to (B, T, 3, heads,
  head_dim)), `.self_attn.proj`, `.linear1`, `.norm1`, `.linear2`;
- `classifier.norm`, `classifier.fc`.

The fused `qkv` weight becomes the Flax kernels of q, k and v (a `Fused` part). The example
input shape is read off the checkpoint where it matters (the positions' T = g^2 tokens and the
first convolution's input channels): the largest square image whose token grid is g (every
image side with that grid gives the same tensors); with "none" positions nothing depends on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mergejax.converters.layout import (
    InputShape,
    Leaf,
    Part,
    conv,
    dense,
    fused_dense,
    layer_norm,
    register,
)
from mergejax.converters.transforms import Shape
from mergejax.models.cct import CCT

POSITIONS = "classifier.positional_emb"
FIRST_CONV = "tokenizer.conv_layers.0.0.weight"


def infer_input_shape(m: CCT, shapes: Mapping[str, Shape]) -> InputShape | None:
    """(H, W, C) of the square images the checkpoint's positions were made for, or None when the
    tensors do not tell (no positions, a non-square token count, or no image side fits)."""
    if POSITIONS not in shapes or FIRST_CONV not in shapes or len(shapes[FIRST_CONV]) != 4:
        return None
    grid = math.isqrt(shapes[POSITIONS][-2])
    if grid < 1 or grid * grid != shapes[POSITIONS][-2]:
        return None
    # each stage shrinks the side by at most conv stride x pool stride (plus the kernels)
    bound = (grid + 1) * (m.conv_stride * m.pool_stride) ** m.conv_layers + 2 * m.kernel_size
    sides = [s for s in range(1, bound + 1) if m.grid(s) == grid]
    return (sides[-1], sides[-1], shapes[FIRST_CONV][1]) if sides else None


def _block(i: int) -> list[Part]:
    t, f = f"classifier.blocks.{i}", f"blocks_{i}"
    return (layer_norm(f"{t}.pre_norm", f"{f}/pre_norm")
            + fused_dense(f"{t}.self_attn.qkv.weight", None,
                          [f"{f}/attn/{n}" for n in ("q", "k", "v")])
            + dense(f"{t}.self_attn.proj", f"{f}/attn/proj")
            + dense(f"{t}.linear1", f"{f}/mlp/fc1")
            + layer_norm(f"{t}.norm1", f"{f}/norm1")
            + dense(f"{t}.linear2", f"{f}/mlp/fc2"))


def cct_layout(m: CCT, input_shape: InputShape) -> list[Part]:
    """The repository's `CCT` (see the module docstring)."""
    del input_shape  # positions are a parameter whose shape the template gives
    parts: list[Part] = []
    for j in range(m.conv_layers):
        parts += conv(f"tokenizer.conv_layers.{j}.0", f"tokenizer/conv_{j}")
    if m.positional != "none":
        parts.append(Leaf(POSITIONS, ("params", "positional_emb")))
    parts += dense("classifier.attention_pool", "attention_pool")
    for i in range(m.depth):
        parts += _block(i)
    return parts + layer_norm("classifier.norm", "norm") + dense("classifier.fc", "fc")


for _name, _size in (("cct", 32), ("cct_2_3x2", 32), ("cct_4_3x2", 32), ("cct_6_3x1", 32),
                     ("cct_6_3x2", 32), ("cct_7_3x1", 32), ("cct_7_3x2", 32),
                     ("cct_7_7x2", 224), ("cct_14_7x2", 224)):
    register(_name, input_shape=(_size, _size, 3), infer_input_shape=infer_input_shape)(
        cct_layout)
