"""Layouts: which torch key is which Flax leaf, and how the tensor is transformed.

A layout is a list of `Leaf`s (torch key <-> Flax path + transform) and `Buffer`s (torch-only
tensors such as BatchNorm's `num_batches_tracked`, dropped on import and written on export),
in torch's state_dict order. Per-architecture layouts are built from the block helpers below
(`conv`, `batch_norm`, `dense`) and registered by model name with `register`; a new
architecture is one more registered builder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn

from mergejax.converters.transforms import CONV, DENSE, IDENTITY, FlattenedDense, Transform
from mergejax.registry import Registry

InputShape = tuple[int, int, int]  # one example, (H, W, C)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """torch `torch_key` <-> Flax `path` (collection first, e.g. ('params', 'conv1', 'kernel'))."""

    torch_key: str
    path: tuple[str, ...]
    transform: Transform = IDENTITY


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A torch-only int64 scalar (`num_batches_tracked`): ignored on import, written on export."""

    torch_key: str


Part = Leaf | Buffer
LayoutBuilder = Callable[[nn.Module, InputShape], list[Part]]


@dataclasses.dataclass(frozen=True)
class Arch:
    """A registered layout: `build(module, input_shape)` lists the parts for a model instance;
    `input_shape` is the example input used to build the Flax shape template by default."""

    name: str
    build: LayoutBuilder
    input_shape: InputShape


_ARCHS: Registry[Arch] = Registry("converter architecture")


def register(name: str, input_shape: InputShape = (32, 32, 3)):
    """Decorator registering `build(module, input_shape) -> [Leaf | Buffer]` for model `name`."""

    def deco(build: LayoutBuilder) -> LayoutBuilder:
        _ARCHS.register(name, Arch(name, build, tuple(input_shape)))
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
