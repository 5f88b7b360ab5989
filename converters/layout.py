"""Layouts: which torch key is which Flax leaf, and how the tensor is transformed.

A layout is a list of `Leaf`s (torch key <-> Flax path + transform), `Fused` parts (one torch
tensor <-> several Flax leaves stacked along its first axis, such as timm's fused `qkv`) and
`Buffer`s (torch-only tensors such as BatchNorm's `num_batches_tracked`, dropped on import and
written on export), in torch's state_dict order. `Leaf` and `Fused` share one interface
(`paths`, `torch_shape`, `to_flax`, `to_torch`), which is all `convert.py` uses.
Per-architecture layouts are built from the block helpers below (`conv`, `batch_norm`, `dense`,
`layer_norm`, `fused_dense`) and registered by model name with `register`; a new architecture is
one more registered builder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import numpy as np

from mergejax.converters.transforms import (
    CONV,
    DENSE,
    IDENTITY,
    FlattenedDense,
    Shape,
    Transform,
)
from mergejax.registry import Registry

InputShape = tuple[int, int, int]  # one example, (H, W, C)
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """torch `torch_key` <-> Flax `path` (collection first, e.g. ('params', 'conv1', 'kernel'))."""

    torch_key: str
    path: Path
    transform: Transform = IDENTITY

    @property
    def paths(self) -> tuple[Path, ...]:
        """The Flax leaves this tensor holds (one)."""
        return (self.path,)

    def torch_shape(self, flax_shapes: Sequence[Shape]) -> Shape:
        """The torch shape that corresponds to the Flax leaf shape `flax_shapes[0]`."""
        return self.transform.torch_shape(flax_shapes[0])

    def to_flax(self, a: np.ndarray) -> list[np.ndarray]:
        """[the Flax leaf] of torch tensor `a`."""
        return [self.transform.to_flax(a)]

    def to_torch(self, leaves: Sequence[np.ndarray]) -> np.ndarray:
        """The torch tensor of [the Flax leaf]."""
        return self.transform.to_torch(leaves[0])


@dataclasses.dataclass(frozen=True)
class Fused:
    """torch `torch_key` <-> the Flax leaves `paths`, stacked in that order along the torch
    tensor's axis 0, each part passed through `transform`.

    timm's `attn.qkv.weight` (3D, D) is q, k, v's Linear weights (D, D) stacked: rows 0:D are q,
    D:2D k, 2D:3D v (its forward reshapes the output to (B, T, 3, heads, head_dim)); torch's
    MultiheadAttention `in_proj_weight` (3D, D) / `in_proj_bias` (3D,) are stacked the same way.
    """

    torch_key: str
    paths: tuple[Path, ...]
    transform: Transform = IDENTITY

    def torch_shape(self, flax_shapes: Sequence[Shape]) -> Shape:
        """The torch shape: each leaf's torch shape, concatenated along axis 0."""
        shapes = [self.transform.torch_shape(s) for s in flax_shapes]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"{self.torch_key}: fused leaves of unequal shapes {shapes}")
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def to_flax(self, a: np.ndarray) -> list[np.ndarray]:
        """The Flax leaves (in `paths` order) of torch tensor `a`, split into equal parts."""
        return [self.transform.to_flax(p) for p in np.split(a, len(self.paths), axis=0)]

    def to_torch(self, leaves: Sequence[np.ndarray]) -> np.ndarray:
        """The torch tensor of the Flax leaves (in `paths` order)."""
        return np.concatenate([self.transform.to_torch(a) for a in leaves], axis=0)


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A torch-only int64 scalar (`num_batches_tracked`): ignored on import, written on export."""

    torch_key: str


Tensor = Leaf | Fused  # a torch tensor holding Flax leaves
Part = Leaf | Fused | Buffer
LayoutBuilder = Callable[[nn.Module, InputShape], list[Part]]
# (module, {torch key: shape}) -> the example input shape the tensors were made for, or None if
# they do not tell (e.g. a ViT's position-embedding count and patch size give its image size)
ShapeInference = Callable[[nn.Module, Mapping[str, Shape]], InputShape | None]


@dataclasses.dataclass(frozen=True)
class Arch:
    """A registered layout: `build(module, input_shape)` lists the parts for a model instance;
    `input_shape` is the example input used to build the Flax shape template by default;
    `infer_input_shape`, if set, reads the input shape off a checkpoint's tensor shapes (used
    when the caller gives none)."""

    name: str
    build: LayoutBuilder
    input_shape: InputShape
    infer_input_shape: ShapeInference | None = None


_ARCHS: Registry[Arch] = Registry("converter architecture")


def register(name: str, input_shape: InputShape = (32, 32, 3),
             infer_input_shape: ShapeInference | None = None):
    """Decorator registering `build(module, input_shape) -> [Leaf | Fused | Buffer]` for model
    `name` (`input_shape` the default example, `infer_input_shape` as in `Arch`)."""

    def deco(build: LayoutBuilder) -> LayoutBuilder:
        _ARCHS.register(name, Arch(name, build, tuple(input_shape), infer_input_shape))
        return build

    return deco


def get(name: str) -> Arch:
    """The layout registered for model `name` (KeyError listing the known ones)."""
    return _ARCHS.get(name)


def names() -> list[str]:
    """Model names with a registered layout."""
    return _ARCHS.names()


# ---------------------------------------------------------------------------------------------
# Block helpers: `t` is the torch module prefix ("layer1.0.conv1"), `f` the Flax module path
# ("layer1_0/conv1").


def _params(f: str, leaf: str) -> tuple[str, ...]:
    return ("params", *f.split("/"), leaf)


def conv(t: str, f: str, bias: bool = False) -> list[Part]:
    """Conv2d weight (O, I, kh, kw) <-> Conv kernel (kh, kw, I, O) [+ bias (O,)]."""
    parts = [Leaf(f"{t}.weight", _params(f, "kernel"), CONV)]
    if bias:
        parts.append(Leaf(f"{t}.bias", _params(f, "bias")))
    return parts


def batch_norm(t: str, f: str) -> list[Part]:
    """BatchNorm2d weight/bias (C,) -> params scale/bias; running_mean/var (C,) -> batch_stats
    mean/var; num_batches_tracked () int64 -> nothing (Flax keeps no step count)."""
    stats = ("batch_stats", *f.split("/"))
    return [
        Leaf(f"{t}.weight", _params(f, "scale")),
        Leaf(f"{t}.bias", _params(f, "bias")),
        Leaf(f"{t}.running_mean", (*stats, "mean")),
        Leaf(f"{t}.running_var", (*stats, "var")),
        Buffer(f"{t}.num_batches_tracked"),
    ]


def dense(t: str, f: str, chw: Sequence[int] | None = None) -> list[Part]:
    """Linear weight (out, in) <-> Dense kernel (in, out), bias (out,).

    `chw` = (C, H, W) when the input is a feature map that torch flattens (C, H, W) and Flax
    (H, W, C); the kernel rows are then reordered. None (or a 1x1 map) needs no reordering.
    """
    if chw is not None and tuple(chw)[1:] != (1, 1) and tuple(chw)[0] != 1:
        transform = FlattenedDense(tuple(chw))
    else:
        transform = DENSE
    return [Leaf(f"{t}.weight", _params(f, "kernel"), transform),
            Leaf(f"{t}.bias", _params(f, "bias"))]


def layer_norm(t: str, f: str) -> list[Part]:
    """LayerNorm weight/bias (C,) <-> params scale/bias (no running statistics)."""
    return [Leaf(f"{t}.weight", _params(f, "scale")), Leaf(f"{t}.bias", _params(f, "bias"))]


def fused_dense(t_weight: str, t_bias: str | None, fs: Sequence[str]) -> list[Part]:
    """Linear layers `fs` (Flax module paths) stacked along the output axis of one torch weight
    `t_weight` (k*out, in) [and bias `t_bias` (k*out,)]: each part a Dense kernel (in, out)."""
    parts: list[Part] = [Fused(t_weight, tuple(_params(f, "kernel") for f in fs), DENSE)]
    if t_bias is not None:
        parts.append(Fused(t_bias, tuple(_params(f, "bias") for f in fs)))
    return parts
