"""`apply_merge`: one function applies permutations, ZipIt! pairs and MuDSC matches alike.

For N models and a feature space of width n, a transform is `(merge (n_out, N*n),
unmerge (N*n, n_out))`; block i of each (`merge[:, i*n:(i+1)*n]`, `unmerge[i*n:(i+1)*n]`)
belongs to model i. A leaf that produces merged spaces becomes

    W* = sum_i  M_i  (on produced axes)  W_i  U_i (on consumed axes)

(ZipIt! Eq. 8; for a permutation P of one model, `(P, P.T)` gives the permuted model). Leaves
that produce no merged space are tails and stay per model, `W_i U_i`. A leaf that produces a
merged space while consuming an unmerged one means the cut runs through a residual stream: an
error, since no merged model computes that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.specs.spec import MergeSpec, flatten, unflatten

Transform = tuple[Any, Any]


def _along(leaf, matrix, axis: int):
    """Applies `matrix` (n_new, n_old) to axis `axis` of `leaf`.

    Concrete arrays are contracted on the host in float64 (exact to float32 rounding, and no
    XLA compile per leaf shape: a first merge would otherwise spend seconds compiling a
    70 ms operation); traced ones (a merge inside jit or grad) with jnp at highest precision.
    """
    if isinstance(leaf, jax.core.Tracer) or isinstance(matrix, jax.core.Tracer):
        moved = jnp.moveaxis(leaf, axis, 0)
        out = jnp.tensordot(matrix, moved, axes=1, precision="highest")
        return jnp.moveaxis(out, 0, axis)
    moved = np.moveaxis(np.asarray(leaf, np.float64), axis, 0)
    out = np.tensordot(np.asarray(matrix, np.float64), moved, axes=1)
    return np.moveaxis(out, 0, axis)


def _concrete(x):
    """`x` as a numpy array unless it is traced."""
    return x if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _blocks(transforms: Mapping[str, Transform], num_models: int, spec: MergeSpec):
    """Per space, the per-model (M_i (n_out, n), U_i^T (n_out, n)) blocks, validated."""
    blocks = {}
    for name, (merge, unmerge) in transforms.items():
        n = spec.space(name).width
        if not isinstance(merge, jax.core.Tracer) and not isinstance(unmerge, jax.core.Tracer):
            merge, unmerge = np.asarray(merge, np.float32), np.asarray(unmerge, np.float32)
        bad = merge.ndim != 2 or merge.shape[1] != num_models * n
        if bad or unmerge.shape != merge.shape[::-1]:
            raise ValueError(
                f"space {name!r}: expected merge (n_out, {num_models * n}) and unmerge "
                f"({num_models * n}, n_out) for {num_models} models of width {n}, got "
                f"{tuple(merge.shape)} and {tuple(unmerge.shape)}")
        blocks[name] = [(merge[:, i * n:(i + 1) * n], unmerge[i * n:(i + 1) * n].T)
                        for i in range(num_models)]
    return blocks


def apply_merge(spec: MergeSpec, variables: Sequence[Mapping[str, Any]],
                transforms: Mapping[str, Transform], *, tails: str = "per_model"
                ) -> list[dict[str, Any]]:
    """Merges N models' variables through `transforms` (`{space: (merge, unmerge)}`).

    Spaces absent from `transforms` stay unmerged (partial zipping: give the spaces up to the
    cut, e.g. `spec.prefix("stream1")`).

    Args:
      spec: the architecture's merge spec.
      variables: N variable trees of that architecture.
      transforms: per merged space, merge (n_out, N*n) and unmerge (N*n, n_out).
      tails: "per_model" keeps each model's tail (its head, and every layer past the cut);
        "average" averages the tails (models whose heads share one label space).

    Returns:
      N variable trees (model i's tail on the shared merged trunk); with tails="average" all
      N are the same tree.
    """
    if tails not in ("per_model", "average"):
        raise ValueError(f"tails must be 'per_model' or 'average', got {tails!r}")
    n_models = len(variables)
    for i, v in enumerate(variables):
        try:
            spec.check(v, label=f"model {i}")
        except ValueError as e:
            raise ValueError(
                f"{e}. Every matching method here (average, permute, weight_matching, zipit, "
                f"mudsc) needs models of one architecture and width; none accepts models of "
                f"different widths yet") from None
    flats = [flatten(v) for v in variables]
    blocks = _blocks(transforms, n_models, spec)
    outs: list[dict[str, Any]] = [{} for _ in range(n_models)]
    for path, axes in spec.leaves.items():
        produced = [a for a in axes if a.produces]
        merged = [a.space in blocks for a in produced]
        if produced and all(merged):
            unmerged_in = [a.space for a in axes if not a.produces and a.space not in blocks]
            if unmerged_in:
                raise ValueError(f"leaf {path} produces merged space(s) but consumes unmerged "
                                 f"{unmerged_in}: the merge cut runs through a shared space")
            total = 0.0
            for i in range(n_models):
                leaf = _concrete(flats[i][path])
                for a in axes:
                    m_i, u_i_t = blocks[a.space][i]
                    leaf = _along(leaf, m_i if a.produces else u_i_t, a.axis)
                total = total + leaf
            for out in outs:
                out[path] = total
        elif any(merged):
            raise ValueError(f"leaf {path} produces both merged and unmerged spaces")
        else:
            per_model = []
            for i in range(n_models):
                leaf = _concrete(flats[i][path])
                for a in axes:
                    if a.space in blocks:  # consumed merged space: unmerge into model i's basis
                        leaf = _along(leaf, blocks[a.space][i][1], a.axis)
                per_model.append(leaf)
            if tails == "average":
                per_model = [sum(per_model) / n_models] * n_models
            for out, leaf in zip(outs, per_model):
                out[path] = leaf
    dtypes = {k: v.dtype if hasattr(v, "dtype") else np.result_type(v) for k, v in flats[0].items()}
    return [unflatten({k: v if isinstance(v, jax.core.Tracer) else np.asarray(v, dtypes[k])
                       for k, v in out.items()}) for out in outs]


def identity_transforms(spec: MergeSpec, num_models: int, spaces: Sequence[str] | None = None
                        ) -> dict[str, Transform]:
    """Plain averaging as transforms: U = [I; ...; I], M = U.T / N, for `spaces` (default all)."""
    out = {}
    for name in spaces if spaces is not None else spec.space_names:
        n = spec.space(name).width
        unmerge = np.tile(np.eye(n, dtype=np.float32), (num_models, 1))
        out[name] = (unmerge.T / num_models, unmerge)
    return out


def permutation_transforms(perms: Mapping[str, np.ndarray]) -> dict[str, Transform]:
    """One model's permutations as transforms: `perm[k]` = old index of new feature k."""
    out = {}
    for name, perm in perms.items():
        p = np.eye(len(perm), dtype=np.float32)[np.asarray(perm)]  # (new, old)
        out[name] = (p, p.T)
    return out
