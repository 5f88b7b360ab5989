"""The merge spec of an architecture: feature spaces and which leaf axes lie in them.

A *feature space* is a set of channels that several layers share: a hidden layer, a block's
inner channels, or a whole residual stream (every layer that reads or writes the stream).
For every leaf of the variable tree (`"params/layer1_0/conv1/kernel"`) the spec lists the axes
that lie in a space and whether the leaf *produces* the space (output side: merge matrices act
on it) or *consumes* it (input side: unmerge matrices act on it). Each space names the activation
*tap* (a key of `Model.features`) where its features are observed.

Leaves that produce no merged space are *tails* (the task head, and after partial zipping every
layer past the cut): they stay per model, with unmerge matrices folded into their inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class Space:
    """A feature space: `width` channels per model, observed at activation `tap`.

    `groups` > 1 says the channels come in that many contiguous equal groups (attention heads,
    GroupNorm groups) that group matching moves as wholes.

    `pre_tap` names the tap of the space's pre-activation (the producing layer's output before
    its nonlinearity), where REPAIR measures and corrects statistics; None if not observable or
    not foldable into the producing leaves.
    """

    name: str
    width: int
    tap: str | None
    groups: int = 1
    pre_tap: str | None = None


@dataclasses.dataclass(frozen=True)
class Axis:
    """Axis `axis` of a leaf lies in space `space`; `produces` if it is the output side."""

    axis: int
    space: str
    produces: bool


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """Feature spaces (in depth order) and the axes of every leaf, keyed by '/'-joined path."""

    spaces: tuple[Space, ...]
    leaves: Mapping[str, tuple[Axis, ...]]

    def space(self, name: str) -> Space:
        """The space called `name` (KeyError listing the spaces otherwise)."""
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"no feature space {name!r}; spaces: {[s.name for s in self.spaces]}")

    @property
    def space_names(self) -> list[str]:
        return [s.name for s in self.spaces]

    def prefix(self, stop_after: str | None) -> list[str]:
        """Names of the spaces up to and including `stop_after` (all of them for None)."""
        names = self.space_names
        if stop_after is None:
            return names
        if stop_after not in names:
            raise KeyError(f"no feature space {stop_after!r}; spaces: {names}")
        return names[: names.index(stop_after) + 1]

    def axes_of(self, space: str) -> list[tuple[str, int, bool]]:
        """Every (leaf path, axis, produces) in `space`."""
        return [(p, a.axis, a.produces) for p, axes in self.leaves.items() for a in axes
                if a.space == space]

    def check(self, variables: Mapping[str, Any], label: str = "model") -> None:
        """Raises ValueError if `variables` do not fit the spec: unknown or missing leaves, or an
        axis whose size differs from its space's width (naming the leaf and both shapes)."""
        flat = flatten(variables)
        unknown = sorted(set(flat) - set(self.leaves))
        missing = sorted(set(self.leaves) - set(flat))
        if unknown or missing:
            raise ValueError(f"{label} does not fit the merge spec: leaves not in the spec "
                             f"{unknown}, spec leaves missing from the {label} {missing}")
        widths = {s.name: s.width for s in self.spaces}
        for path, axes in self.leaves.items():
            shape = np.shape(flat[path])
            expected = list(shape)
            for a in axes:
                expected[a.axis] = widths[a.space]
            if list(shape) != expected:
                raise ValueError(f"{label}: leaf {path} has shape {tuple(shape)} but the merge "
                                 f"spec expects {tuple(expected)}")


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested dict as `{'a/b/c': leaf}`."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


class SpecBuilder:
    """Builds a MergeSpec from small layer helpers (conv, dense, norm, head).

    Paths are given without the collection (`"layer1_0/conv1"`); `norm` also adds the
    BatchNorm running statistics under `batch_stats`.
    """

    def __init__(self):
        self._spaces: dict[str, Space] = {}
        self._leaves: dict[str, tuple[Axis, ...]] = {}

    def space(self, name: str, width: int, tap: str | None, groups: int = 1,
              pre_tap: str | None = None) -> str:
        """Declares a space (in depth order) and returns its name."""
        if name in self._spaces:
            raise ValueError(f"space {name!r} declared twice")
        self._spaces[name] = Space(name, width, tap, groups, pre_tap)
        return name

    def leaf(self, path: str, *axes: Axis) -> None:
        """Adds a leaf with its axes; one space may not sit on two axes of one leaf."""
        spaces = [a.space for a in axes]
        if len(set(spaces)) != len(spaces):
            raise ValueError(f"leaf {path}: a space sits on two of its axes {spaces}")
        for a in axes:
            if a.space not in self._spaces:
                raise ValueError(f"leaf {path}: undeclared space {a.space!r}")
        if path in self._leaves:
            raise ValueError(f"leaf {path} added twice")
        self._leaves[path] = tuple(axes)

    def _kernel(self, path: str, space_in: str | None, space_out: str, in_axis: int,
                bias: bool) -> None:
        """A kernel whose axis `in_axis` consumes `space_in` and last axis produces `space_out`."""
        axes = [Axis(in_axis + 1, space_out, True)]
        if space_in is not None:
            axes.insert(0, Axis(in_axis, space_in, False))
        self.leaf(f"params/{path}/kernel", *axes)
        if bias:
            self.leaf(f"params/{path}/bias", Axis(0, space_out, True))

    def conv(self, path: str, space_in: str | None, space_out: str, bias: bool = False) -> None:
        """An HWIO conv kernel: consumes `space_in` (None: raw input), produces `space_out`."""
        self._kernel(path, space_in, space_out, 2, bias)

    def dense(self, path: str, space_in: str | None, space_out: str, bias: bool = True) -> None:
        """An (in, out) dense kernel; `space_in` None for a flattened raw input."""
        self._kernel(path, space_in, space_out, 0, bias)

    def norm(self, path: str, space: str, running_stats: bool = True) -> None:
        """Norm scale/bias (and BatchNorm mean/var) along `space`."""
        for name in ("scale", "bias"):
            self.leaf(f"params/{path}/{name}", Axis(0, space, True))
        if running_stats:
            for name in ("mean", "var"):
                self.leaf(f"batch_stats/{path}/{name}", Axis(0, space, True))

    def head(self, path: str, space_in: str, bias: bool = True) -> None:
        """A task head: consumes `space_in`, produces logits (never merged: a tail); `bias`
        False for a bare matrix (open_clip's `proj`)."""
        self.leaf(f"params/{path}/kernel", Axis(0, space_in, False))
        if bias:
            self.leaf(f"params/{path}/bias")

    def build(self) -> MergeSpec:
        """The finished spec."""
        return MergeSpec(tuple(self._spaces.values()), dict(self._leaves))

