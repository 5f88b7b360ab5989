"""What FS-Merge learns for each leaf of a merge spec: the SuperNet's layout.

Every leaf of the spec falls in one role (module = the leaf path without its last part):

- `Linear`: a `kernel` that produces a space (a dense or conv layer of the trunk), with its
  module's `bias`. It gets its *own* merge matrix M (on the produced axis) and, if it reads a
  merged space, its own unmerge matrix U (on the consumed axis): per layer, not per space.
- `Tail`: a `kernel` that produces no space (the task head). It keeps one copy per endpoint and
  gets its own U (merged features -> endpoint i's features), folded into endpoint i's head.
- `Norm`: LayerNorm / BatchNorm `scale` and `bias` of a module without a kernel: learned
  directly in merged width.
- `Vector`: any other leaf producing a space (a ViT's class token and position embeddings): its
  own M.
- `Stat`: BatchNorm running statistics: merged with the init's M of their space, not learned
  (fitting runs BatchNorm in train mode; recompute them after the merge).
- leaves on no space (the head's bias): kept per endpoint.

Plans are tuples of frozen dataclasses: hashable, so compiled steps are cached on them.
"""

from __future__ import annotations

import dataclasses

from mergejax.specs import MergeSpec


@dataclasses.dataclass(frozen=True)
class Linear:
    """A trunk layer: `kernel` (+ `bias`), producing `out_space` on `out_axis`, reading
    `in_space` on `in_axis` (None for the raw input)."""

    name: str
    kernel: str
    bias: str | None
    out_space: str
    out_axis: int
    in_space: str | None
    in_axis: int | None


@dataclasses.dataclass(frozen=True)
class Tail:
    """A per-endpoint layer reading merged space `in_space` on `in_axis` of its `kernel`."""

    name: str
    kernel: str
    in_space: str
    in_axis: int


@dataclasses.dataclass(frozen=True)
class Along:
    """A leaf `path` whose axis `axis` lies in `space` (norms, vectors, running stats)."""

    path: str
    space: str
    axis: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """The SuperNet layout of a spec, with per-space widths `(d, d_merged)` and head groups."""

    linears: tuple[Linear, ...]
    tails: tuple[Tail, ...]
    norms: tuple[Along, ...]
    vectors: tuple[Along, ...]
    stats: tuple[Along, ...]
    per_model: tuple[str, ...]  # leaves on no space (tails' biases): kept per endpoint
    spaces: tuple[tuple[str, int, int, int], ...]  # (name, d, d_merged, groups)

    def width(self, space: str) -> tuple[int, int]:
        """(endpoint width d, merged width d') of `space`."""
        for name, d, d_new, _ in self.spaces:
            if name == space:
                return d, d_new
        raise KeyError(f"no space {space!r} in the plan; spaces: {[s[0] for s in self.spaces]}")

    def consumer(self, space: str) -> str | None:
        """Name of the first layer (trunk or tail, in spec order) that reads `space`."""
        for layer in (*self.linears, *self.tails):
            if layer.in_space == space:
                return layer.name
        return None

    @property
    def m_owners(self) -> tuple[tuple[str, str], ...]:
        """(name, produced space) of everything with its own M: trunk layers and vectors."""
        return (tuple((x.name, x.out_space) for x in self.linears)
                + tuple((x.path, x.space) for x in self.vectors))

    @property
    def u_layers(self) -> tuple[Linear | Tail, ...]:
        """Layers with an unmerge matrix: trunk layers reading a space, and the tails."""
        return tuple(x for x in self.linears if x.in_space is not None) + self.tails


def make_plan(spec: MergeSpec, merged: MergeSpec) -> Plan:
    """The plan of `spec` (the endpoints') merging into `merged` (the same spaces and leaves at
    the merged widths). Raises ValueError naming a leaf no role fits."""
    if spec.space_names != merged.space_names or set(spec.leaves) != set(merged.leaves):
        raise ValueError("the merged model's spec must have the endpoints' spaces and leaves; "
                         f"spaces {spec.space_names} vs {merged.space_names}")
    linears, tails, norms, vectors, stats, per_model = [], [], [], [], [], []
    for path, axes in spec.leaves.items():
        module, _, name = path.rpartition("/")
        produced = [a for a in axes if a.produces]
        consumed = [a for a in axes if not a.produces]
        if name == "bias" and f"{module}/kernel" in spec.leaves:
            continue  # folded with its kernel
        if not axes:
            per_model.append(path)
        elif path.startswith("batch_stats/"):
            stats.append(Along(path, produced[0].space, produced[0].axis))
        elif name == "kernel" and produced and len(produced) == 1 and len(consumed) <= 1:
            bias = f"{module}/bias" if f"{module}/bias" in spec.leaves else None
            c = consumed[0] if consumed else None
            linears.append(Linear(module, path, bias, produced[0].space, produced[0].axis,
                                  c.space if c else None, c.axis if c else None))
        elif name == "kernel" and not produced and len(consumed) == 1:
            tails.append(Tail(module, path, consumed[0].space, consumed[0].axis))
            if f"{module}/bias" in spec.leaves:
                per_model.append(f"{module}/bias")
        elif len(produced) == 1 and not consumed and f"{module}/kernel" not in spec.leaves:
            role = norms if name in ("scale", "bias") else vectors
            role.append(Along(path, produced[0].space, produced[0].axis))
        else:
            raise ValueError(f"FS-Merge: leaf {path} (axes {axes}) is neither a layer kernel, "
                             "a norm, a vector on one space nor a head")
    spaces = tuple((s.name, s.width, merged.space(s.name).width, s.groups) for s in spec.spaces)
    return Plan(tuple(linears), tuple(tails), tuple(norms), tuple(vectors), tuple(stats),
                tuple(per_model), spaces)
