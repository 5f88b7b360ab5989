"""Per-tensor layout transforms between PyTorch and Flax, each with its exact inverse.

A transform maps a torch tensor to its Flax leaf (`to_flax`), back (`to_torch`), and gives the
torch shape a Flax shape corresponds to (`torch_shape`), so shapes are checked before any
reshaping can fail with a less helpful numpy error.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

Shape = tuple[int, ...]


class Transform(Protocol):
    """torch tensor <-> Flax leaf, exactly invertible."""

    def to_flax(self, a: np.ndarray) -> np.ndarray: ...

    def to_torch(self, a: np.ndarray) -> np.ndarray: ...

    def torch_shape(self, flax_shape: Shape) -> Shape: ...


@dataclasses.dataclass(frozen=True)
class Identity:
    """Same layout on both sides (biases, BatchNorm vectors)."""

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        return a

    def torch_shape(self, flax_shape: Shape) -> Shape:
        return tuple(flax_shape)


@dataclasses.dataclass(frozen=True)
class Transpose:
    """Flax leaf = torch tensor with axes permuted by `axes` (`np.transpose(t, axes)`)."""

    axes: tuple[int, ...]

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        return np.transpose(a, self.axes)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        return np.transpose(a, np.argsort(self.axes))

    def torch_shape(self, flax_shape: Shape) -> Shape:
        return tuple(flax_shape[i] for i in np.argsort(self.axes))


# Conv2d weight (O, I, H, W) -> Flax Conv kernel (H, W, I, O).
CONV = Transpose((2, 3, 1, 0))
# Linear weight (out, in) -> Flax Dense kernel (in, out).
DENSE = Transpose((1, 0))
IDENTITY = Identity()


@dataclasses.dataclass(frozen=True)
class FlattenedDense:
    """A Linear layer fed a flattened (C, H, W) feature map in torch and the same map flattened
    (H, W, C) in Flax: transpose, and reorder the input rows.

    torch weight (out, C*H*W), input index c*H*W + h*W + w; Flax kernel (H*W*C, out), row index
    h*W*C + w*C + c.
    """

    chw: tuple[int, int, int]

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        c, h, w = self.chw
        return a.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        c, h, w = self.chw
        return a.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)

    def torch_shape(self, flax_shape: Shape) -> Shape:
        return (flax_shape[1], flax_shape[0])


@dataclasses.dataclass(frozen=True)
class LeadingAxes:
    """Flax leaf = torch tensor with `count` leading size-1 axes added: open_clip's
    `class_embedding` (D,) <-> `cls_token` (1, 1, D) (count 2) and `positional_embedding` (T, D)
    <-> `pos_embed` (1, T, D) (count 1). A reshape only: values and order are unchanged."""

    count: int

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        return a.reshape((1,) * self.count + a.shape)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        if a.shape[:self.count] != (1,) * self.count:
            raise ValueError(f"expected {self.count} leading size-1 axes, got shape {a.shape}")
        return a.reshape(a.shape[self.count:])

    def torch_shape(self, flax_shape: Shape) -> Shape:
        return tuple(flax_shape[self.count:])
