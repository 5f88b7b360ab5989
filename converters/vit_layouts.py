"""ViT layouts: timm, torchvision and open_clip checkpoints <-> `mergejax.models.vit.ViT`.

All three hold the same network (pre-norm blocks, class token, learned positions); they differ
in key names, in how q/k/v are stored, and in a few options of the Flax model (see its
docstring). Key names and shapes follow the published sources:

- timm `VisionTransformer` (`vit`, `vit_tiny`, `vit_b16`, `vit_b32`): `cls_token` (1, 1, D),
  `pos_embed` (1, T, D), `patch_embed.proj`, [`norm_pre` if `ln_pre`: timm's CLIP models],
  `blocks.{i}.norm1`, `.attn.qkv` (fused (3D, D) weight and (3D,) bias: q, k, v stacked),
  `.attn.proj`, `.norm2`, `.mlp.fc1`, `.mlp.fc2`, then `norm` and `head`. Flax `pool="mean"` is
  timm's `class_token=False, global_pool="avg"`: no `cls_token`, `norm` is an Identity and the
  final LayerNorm is `fc_norm` (applied to the token mean). timm's `global_pool="avg"` with a
  class token (which it leaves out of the mean) has no Flax counterpart: its `cls_token` is
  reported as an unexpected key.
- torchvision `vit_b_16` / `vit_b_32` (`tv_vit_b_16`, `tv_vit_b_32`): `class_token` (1, 1, D),
  `conv_proj`, `encoder.pos_embedding` (1, T, D), `encoder.layers.encoder_layer_{i}.ln_1`,
  `.self_attention.in_proj_weight` (3D, D) / `.in_proj_bias` (3D,) (nn.MultiheadAttention,
  q, k, v stacked), `.self_attention.out_proj`, `.ln_2`, `.mlp.0`, `.mlp.3`, `encoder.ln`,
  `heads.head` (no `representation_size` pre-logits layer).
- open_clip's visual tower (`clip_vit_b_16`, `clip_vit_b_32`), keys of a CLIP model's
  state_dict under `visual.`: `class_embedding` (D,), `positional_embedding` (T, D), `proj`
  (D, out) used as `x @ proj` (already a Dense kernel), `conv1` (no bias), `ln_pre`,
  `transformer.resblocks.{i}.ln_1`, `.attn.in_proj_weight` / `.in_proj_bias`,
  `.attn.out_proj`, `.ln_2`, `.mlp.c_fc`, `.mlp.c_proj`, `ln_post`. Class-token pooling
  (`pool_type="tok"`), LayerNorm before pooling (`final_ln_after_pool=False`), no LayerScale,
  no attentional pooler. A full CLIP state_dict also holds the text tower: `from_torch(...,
  select="visual.")` (CLI `--select visual.`) takes the image tower; without it the text keys
  are reported as unexpected, with that hint. `to_torch` writes the `visual.` keys only.

Keys appear in torch's state_dict order (a module's own parameters before its submodules').
Every layout infers the example input shape from the position embeddings (T tokens, a square
grid of T - 1 patches with a class token, T without) and the patch convolution's weight (its
input channels): square images only; other shapes need `input_shape`.
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
from mergejax.converters.transforms import IDENTITY, LeadingAxes, Shape
from mergejax.models.vit import ViT

QKV = ("q", "k", "v")  # their order in every fused tensor


def _require(m: ViT, source: str, **expected) -> None:
    """ValueError unless the model's options match what the `source` layout stores."""
    wrong = {k: getattr(m, k) for k, v in expected.items() if getattr(m, k) != v}
    if wrong:
        raise ValueError(f"{source} checkpoints need ViT options "
                         f"{ {k: expected[k] for k in wrong} }, got {wrong}")


def _inference(pos_key: str, patch_key: str):
    """An input-shape inference for a layout whose position embedding is `pos_key` (tokens on
    axis -2) and patch convolution weight `patch_key` (D, C, p, p)."""

    def infer(m: ViT, shapes: Mapping[str, Shape]) -> InputShape | None:
        if pos_key not in shapes or patch_key not in shapes or len(shapes[patch_key]) != 4:
            return None
        patches = shapes[pos_key][-2] - (m.pool == "cls")
        grid = math.isqrt(max(patches, 0))
        if grid < 1 or grid * grid != patches:
            return None  # not a square grid: the caller's input_shape (or default) decides
        return (grid * m.patch, grid * m.patch, shapes[patch_key][1])

    return infer


def _block(t: str, f: str, keys: dict[str, str]) -> list[Part]:
    """One pre-norm block: torch module prefix `t`, Flax path `f`, torch names in `keys`
    (ln1, qkv_weight, qkv_bias, proj, ln2, fc1, fc2)."""
    attn = [f"{f}/attn/{n}" for n in QKV]
    return (layer_norm(f"{t}.{keys['ln1']}", f"{f}/norm1")
            + fused_dense(f"{t}.{keys['qkv_weight']}", f"{t}.{keys['qkv_bias']}", attn)
            + dense(f"{t}.{keys['proj']}", f"{f}/attn/proj")
            + layer_norm(f"{t}.{keys['ln2']}", f"{f}/norm2")
            + dense(f"{t}.{keys['fc1']}", f"{f}/mlp/fc1")
            + dense(f"{t}.{keys['fc2']}", f"{f}/mlp/fc2"))


TIMM_BLOCK = dict(ln1="norm1", qkv_weight="attn.qkv.weight", qkv_bias="attn.qkv.bias",
                  proj="attn.proj", ln2="norm2", fc1="mlp.fc1", fc2="mlp.fc2")
MHA_BLOCK = dict(ln1="ln_1", qkv_weight="self_attention.in_proj_weight",
                 qkv_bias="self_attention.in_proj_bias", proj="self_attention.out_proj",
                 ln2="ln_2", fc1="mlp.0", fc2="mlp.3")
CLIP_BLOCK = dict(ln1="ln_1", qkv_weight="attn.in_proj_weight", qkv_bias="attn.in_proj_bias",
                  proj="attn.out_proj", ln2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj")


def _head(t: str, m: ViT) -> list[Part]:
    head = dense(t, "head")
    return head if m.head_bias else head[:1]


_TIMM_SHAPES = _inference("pos_embed", "patch_embed.proj.weight")


@register("vit", infer_input_shape=_TIMM_SHAPES)
@register("vit_tiny", input_shape=(8, 8, 1), infer_input_shape=_TIMM_SHAPES)
@register("vit_b16", input_shape=(224, 224, 3), infer_input_shape=_TIMM_SHAPES)
@register("vit_b32", input_shape=(224, 224, 3), infer_input_shape=_TIMM_SHAPES)
def timm_vit_layout(m: ViT, input_shape: InputShape) -> list[Part]:
    """timm `VisionTransformer` (see the module docstring); any Flax options (ln_pre is timm's
    `norm_pre`, the head's and patch embedding's biases as the model says)."""
    del input_shape  # positions are a parameter whose shape the template gives
    parts: list[Part] = [Leaf("cls_token", ("params", "cls_token"))] if m.pool == "cls" else []
    parts.append(Leaf("pos_embed", ("params", "pos_embed")))
    parts += conv("patch_embed.proj", "patch_embed", bias=m.patch_bias)
    if m.ln_pre:
        parts += layer_norm("norm_pre", "ln_pre")
    for i in range(m.depth):
        parts += _block(f"blocks.{i}", f"blocks_{i}", TIMM_BLOCK)
    parts += layer_norm("norm" if m.pool == "cls" else "fc_norm", "norm")
    return parts + _head("head", m)


_TV_SHAPES = _inference("encoder.pos_embedding", "conv_proj.weight")


@register("tv_vit_b_16", input_shape=(224, 224, 3), infer_input_shape=_TV_SHAPES)
@register("tv_vit_b_32", input_shape=(224, 224, 3), infer_input_shape=_TV_SHAPES)
def torchvision_vit_layout(m: ViT, input_shape: InputShape) -> list[Part]:
    """torchvision `VisionTransformer` (see the module docstring)."""
    del input_shape
    _require(m, "torchvision ViT", pool="cls", ln_pre=False, patch_bias=True, head_bias=True)
    parts: list[Part] = [Leaf("class_token", ("params", "cls_token"))]
    parts += conv("conv_proj", "patch_embed", bias=True)
    parts.append(Leaf("encoder.pos_embedding", ("params", "pos_embed")))
    for i in range(m.depth):
        parts += _block(f"encoder.layers.encoder_layer_{i}", f"blocks_{i}", MHA_BLOCK)
    return parts + layer_norm("encoder.ln", "norm") + _head("heads.head", m)


CLIP_PREFIX = "visual."
_CLIP_SHAPES = _inference(f"{CLIP_PREFIX}positional_embedding", f"{CLIP_PREFIX}conv1.weight")


@register("clip_vit_b_16", input_shape=(224, 224, 3), infer_input_shape=_CLIP_SHAPES)
@register("clip_vit_b_32", input_shape=(224, 224, 3), infer_input_shape=_CLIP_SHAPES)
def open_clip_vit_layout(m: ViT, input_shape: InputShape) -> list[Part]:
    """open_clip `VisionTransformer` under `visual.` (see the module docstring); `ln_pre` may be
    off (open_clip's `no_ln_pre`)."""
    del input_shape
    _require(m, "open_clip ViT", pool="cls", patch_bias=False, head_bias=False)
    v = CLIP_PREFIX
    parts: list[Part] = [
        Leaf(f"{v}class_embedding", ("params", "cls_token"), LeadingAxes(2)),
        Leaf(f"{v}positional_embedding", ("params", "pos_embed"), LeadingAxes(1)),
        Leaf(f"{v}proj", ("params", "head", "kernel"), IDENTITY),  # x @ proj: (in, out) already
    ]
    parts += conv(f"{v}conv1", "patch_embed")
    if m.ln_pre:
        parts += layer_norm(f"{v}ln_pre", "ln_pre")
    for i in range(m.depth):
        parts += _block(f"{v}transformer.resblocks.{i}", f"blocks_{i}", CLIP_BLOCK)
    return parts + layer_norm(f"{v}ln_post", "norm")
