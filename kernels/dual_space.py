"""MuDSC (Xu et al., CVPR 2024): weight-space similarity, dual-space combination, group matching.

MuDSC matches features on a mix of two similarities of the N models' concatenated features:

    S = fix_rate * S_weight + (1 - fix_rate) * S_act                         (N*n, N*n)

`S_act` is the activation correlation (the statistics ZipIt! uses). `S_weight` correlates the
features' *weight vectors*: for a space p, feature k of model i is described by the rows along p
of every weight leaf that has p on an axis, flattened and concatenated. Before flattening, every
*other* merged axis of the leaf is mapped into the merged basis with the neighbouring space's
current matrices, so that rows of different models are comparable:

- a neighbour q on a *consumed* (input) axis gets N * M_i(q)     (n_out, n)  [MuDSC: merge ×N]
- a neighbour q on a *produced* (output) axis gets U_i(q)^T      (n_out, n)

(the reverse of how `apply_merge` applies them; M_i, U_i are model i's blocks of (merge,
unmerge)). For a permutation P_i both are P_i itself (N * M_i = U_i^T up to ZipIt's 1e-5), so with
permute matching S_weight correlates exactly the vectors Git Re-Basin compares, W_a[p] against
W_b[p] with all other axes already permuted. Neighbours without matrices yet (or unmerged, past a
partial-zip cut) are left as they are: Git Re-Basin's identity start. These rows and their
similarities are computed with host numpy (see `weight_rows` for why).

Group matching moves contiguous groups of channels (attention heads, GroupNorm groups) as wholes:
groups of model i are paired with model 0's groups first (LAP inside every group pair, scored by
mean matched similarity; LAP over groups on that score), then features are matched only inside
each paired set.

The spec is duck-typed like `kernels/weight_matching.py`: `.spaces` (items with `.name`,
`.width`) and `.leaves` (`{path: [axis objects with .axis, .space, .produces]}`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .assignment import solve_group_assignment
from .checks import check_dtype, check_finite_array, check_number, is_traced
from .transforms import merge_from_unmerge
from .zip_match import zip_match

__all__ = [
    "combine_similarity",
    "cosine_rows",
    "group_permute_match",
    "group_zip_match",
    "matched_similarity",
    "pearson_rows",
    "stack_models",
    "weight_rows",
    "weight_similarity",
]

Transform = tuple[Any, Any]


# ------------------------------------------------------------------------------------------------
# Weight-space similarity
# ------------------------------------------------------------------------------------------------


def stack_models(params: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """N flat `{path: array}` dicts -> `{path: (N, ...) float32}` (the input of `weight_rows`).

    Stacking once per merge keeps the per-space work to one batched product per leaf.
    """
    if not params:
        raise ValueError("need at least one model")
    paths = set(params[0])
    for i, p in enumerate(params[1:], start=1):
        if set(p) != paths:
            raise ValueError(f"model {i} has other leaves than model 0: "
                             f"{sorted(set(p) ^ paths)}")
    out = {}
    for path in sorted(paths):
        shapes = {np.shape(p[path]) for p in params}
        if len(shapes) != 1:
            raise ValueError(f"leaf {path}: shapes differ between models, {sorted(shapes)}")
        out[path] = np.stack([np.asarray(p[path], np.float32) for p in params])
    return out


def _neighbour_blocks(transform: Transform, width: int, num_models: int, produces: bool):
    """Per-model (N, n_out, n) matrices for a neighbour axis (see module docstring)."""
    merge, unmerge = (np.asarray(t, np.float32) for t in transform)
    big = num_models * width
    if merge.ndim != 2 or merge.shape[1] != big or unmerge.shape != merge.shape[::-1]:
        raise ValueError(f"expected merge (n_out, {big}) and unmerge ({big}, n_out), got "
                         f"{merge.shape} and {unmerge.shape}")
    n_out = merge.shape[0]
    if produces:  # U_i^T: (N*n, n_out) -> (N, n, n_out) -> (N, n_out, n)
        return unmerge.reshape(num_models, width, n_out).transpose(0, 2, 1)
    # N * M_i: (n_out, N*n) -> (n_out, N, n) -> (N, n_out, n); ×N as MuDSC's `merge * N`
    return num_models * merge.reshape(n_out, num_models, width).transpose(1, 0, 2)


def _along(leaf: np.ndarray, mats: np.ndarray, axis: int) -> np.ndarray:
    """Applies model i's `mats[i]` (n_new, n_old) to axis `axis` (>= 1) of `leaf[i]` (N, ...)."""
    moved = np.moveaxis(leaf, axis, 1)  # (N, n_old, ...)
    # contiguous: numpy's batched matmul falls back to a ~25x slower non-BLAS loop otherwise
    flat = np.ascontiguousarray(moved.reshape(moved.shape[0], moved.shape[1], -1))
    out = np.matmul(np.ascontiguousarray(mats), flat)
    out = out.reshape(moved.shape[0], mats.shape[1], *moved.shape[2:])
    return np.moveaxis(out, 1, axis)


def weight_rows(spec, stacked: Mapping[str, np.ndarray], space: str,
                transforms: Mapping[str, Transform]) -> np.ndarray | None:
    """Each model's weight vectors of the features of `space`, in the neighbours' merged bases.

    Host numpy on purpose: the matchers run on the host anyway, and a network has dozens of
    distinct leaf shapes, each of which would cost a jit compile (seconds per merge for tiny
    models) while the products are plain BLAS calls either way.

    Args:
      spec: a merge spec (duck-typed, see module docstring).
      stacked: `{path: (N, ...)}` leaves of N models (`stack_models`); pass only the leaves that
        should count (MuDSC leaves out BatchNorm running statistics: give `params/` leaves).
        Leaves not in `spec.leaves` are ignored.
      space: the space p whose features are described.
      transforms: current `{space: (merge (n_out, N*n), unmerge (N*n, n_out))}` of any spaces;
        those on other axes of p's leaves are applied (p's own entry is ignored).

    Returns:
      rows (N*n, D) float32, model i's features at rows i*n:(i+1)*n; None if no leaf has p.
    """
    widths = {s.name: s.width for s in spec.spaces}
    n = widths[space]
    per_leaf = []
    num_models = None
    for path in sorted(stacked):
        axes = tuple(spec.leaves.get(path, ()))
        row = [a for a in axes if a.space == space]
        if not row:
            continue
        leaf = np.asarray(stacked[path], np.float32)
        num_models = leaf.shape[0]
        for a in axes:
            if a.space != space and a.space in transforms:
                mats = _neighbour_blocks(transforms[a.space], widths[a.space], num_models,
                                         a.produces)
                leaf = _along(leaf, mats, a.axis + 1)  # +1: the model axis
        leaf = np.moveaxis(leaf, row[0].axis + 1, 1)
        per_leaf.append(leaf.reshape(num_models, n, -1))
    if not per_leaf:
        return None
    rows = np.concatenate(per_leaf, axis=-1)  # (N, n, D)
    return rows.reshape(num_models * n, -1)


def pearson_rows(rows) -> np.ndarray:
    """Pearson correlation between the rows (N*n, D) -> (N*n, N*n) float32.

    As MuDSC's `_correlation`: biased moments over the D entries of each row, divided by
    max(std_i * std_j, 1e-7), so a constant row correlates 0 with everything (never NaN).
    Rows are centred before the product (no E[xy] - E[x]E[y] cancellation in float32).
    """
    rows = np.asarray(rows, np.float32)
    rows = rows - rows.mean(axis=1, keepdims=True)
    cov = (rows @ rows.T) / np.float32(rows.shape[1])
    std = np.sqrt(np.maximum(np.diagonal(cov), 0.0))
    return (cov / np.maximum(np.outer(std, std), np.float32(1e-7))).astype(np.float32)


def cosine_rows(rows) -> np.ndarray:
    """Cosine similarity between the rows (N*n, D) -> (N*n, N*n) float32 (MuDSC `use_cos`).

    Norms are clamped at 1e-8 as in MuDSC's `_cossim`: an all-zero row gives 0.
    """
    rows = np.asarray(rows, np.float32)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-8))
    return (rows @ rows.T).astype(np.float32)


def weight_similarity(spec, stacked: Mapping[str, np.ndarray], space: str,
                      transforms: Mapping[str, Transform], *, use_cos: bool = False
                      ) -> np.ndarray | None:
    """S_weight of `space`: Pearson (or cosine) similarity of `weight_rows`.

    Args: as `weight_rows`; `use_cos` selects cosine similarity instead of Pearson.

    Returns:
      (N*n, N*n) float32 numpy, or None when no leaf has `space` on an axis.
    """
    rows = weight_rows(spec, stacked, space, transforms)
    if rows is None:
        return None
    return cosine_rows(rows) if use_cos else pearson_rows(rows)


def combine_similarity(s_weight, s_act, fix_rate: float) -> np.ndarray:
    """MuDSC's dual-space similarity `fix_rate * s_weight + (1 - fix_rate) * s_act`.

    Args:
      s_weight, s_act: (N*n, N*n) similarities; either may be None (missing) and is then
        skipped, whatever fix_rate says. fix_rate 0 (1) returns s_act (s_weight) unchanged, so
        the end points are exactly the single-space matchers' inputs.
      fix_rate: the weight share in [0, 1] (the paper's balance factor).

    Returns:
      (N*n, N*n) float32 numpy.
    """
    check_number("combine_similarity", "fix_rate", fix_rate, lo=0.0, hi=1.0)
    if s_weight is None and s_act is None:
        raise ValueError("need a weight or an activation similarity")
    if s_act is None or fix_rate == 1.0:
        return np.asarray(s_weight if s_weight is not None else s_act, np.float32)
    if s_weight is None or fix_rate == 0.0:
        return np.asarray(s_act, np.float32)
    return (np.float32(fix_rate) * np.asarray(s_weight, np.float32)
            + np.float32(1.0 - fix_rate) * np.asarray(s_act, np.float32))


def matched_similarity(corr, unmerge) -> float:
    """Mean similarity of the matched features: MuDSC's sweep score.

    Args:
      corr: (O, O) similarity of the N models' features.
      unmerge: (O, n_out) 0/1 cluster matrix of a matcher.

    Returns:
      Over merged features with >= 2 members, the mean of the mean similarity between two
      distinct members, averaged (0.0 if nothing was matched). For permutations of N = 2 models
      this is the mean of corr[r, col[r]], MuDSC's `permute_weight` score.
    """
    s = np.asarray(corr, np.float64)
    u = np.asarray(unmerge, np.float64)
    size = u.sum(axis=0)
    # u_c^T S u_c counts every ordered pair of members of c, plus the diagonal once per member
    pair_sum = np.einsum("kc,kl,lc->c", u, s, u) - np.einsum("kc,k->c", u, np.diagonal(s))
    keep = size >= 2
    if not keep.any():
        return 0.0
    return float(np.mean(pair_sum[keep] / (size[keep] * (size[keep] - 1))))


# ------------------------------------------------------------------------------------------------
# Group matching
# ------------------------------------------------------------------------------------------------


def _check_groups(fn: str, corr, groups: int, num_models: int, *,
                  integer_ok: bool) -> tuple[int, int]:
    """(n, Og) for a (N*n, N*n) similarity with `groups` groups per model; checks dtype and
    values too (ValueError naming `fn` and the argument)."""
    shape = tuple(np.shape(corr))
    if (isinstance(num_models, bool) or not isinstance(num_models, int | np.integer)
            or num_models < 1):
        raise ValueError(f"{fn}: num_models must be a positive int, got {num_models!r}")
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] % num_models or not shape[0]:
        raise ValueError(f"{fn}: corr must be square (N*n, N*n) with N = {num_models} and "
                         f"n >= 1; got {shape}")
    n = shape[0] // num_models
    if (isinstance(groups, bool) or not isinstance(groups, int | np.integer) or groups < 1
            or n % groups):
        raise ValueError(f"{fn}: groups={groups!r} must be a positive divisor of the width {n}")
    check_dtype(fn, "corr", corr, integer_ok=integer_ok)
    if is_traced(corr):
        raise ValueError(f"{fn}: corr must be a concrete array (numpy or jax), not traced "
                         "(this matcher runs on the host)")
    check_finite_array(fn, "corr", corr)
    return n, n // groups


def _pair_groups(block: np.ndarray, groups: int, backend: str):
    """Pairs model 0's groups with another model's, MuDSC's head matching.

    Args:
      block: (n, n) similarity of model 0's features (rows) to model i's (columns).
      groups: g; each model's features are g contiguous groups of Og = n / g.

    Returns:
      group_col (g,): model i's group paired with model 0's group j;
      col (n,): model i's feature matched to model 0's feature r, inside the paired groups.
    """
    return solve_group_assignment(block, groups, maximize=True, backend=backend)


def group_permute_match(corr, *, groups: int, num_models: int = 2, backend: str = "scipy"):
    """MuDSC's `group_permute_weight`: permute every model onto model 0, groups as wholes.

    For each model i >= 1: an LAP inside every (group of model 0, group of model i) pair scored
    by the mean matched similarity, an LAP over groups on that g x g score, composed into one
    feature permutation that maps each of model 0's groups onto one whole group of model i.
    Cost O(g^2 Og^3 + g^3) per model. With groups=1 this is `permute_match` exactly.

    Args:
      corr: (N*n, N*n) similarity of the N = `num_models` models' features; only the blocks
        corr[:n, i*n:(i+1)*n] are read (finite). numpy or jax (not traced).
      groups: g, a divisor of n; each model's features are g contiguous groups.
      num_models: N.
      backend: assignment backend (scipy by default, as `permute_match`).

    Returns:
      merge (n, N*n), unmerge (N*n, n) in corr's float dtype (float32 for integers); numpy for
      numpy input, jax for jax input. U_0 = I; U_i[col_i[r], r] = 1 with col_i[j*Og:(j+1)*Og]
      inside one group of model i.
    """
    n, _ = _check_groups("group_permute_match", corr, groups, num_models, integer_ok=True)
    xp = jnp if isinstance(corr, jax.Array) else np
    host = np.asarray(corr)
    dtype = host.dtype if np.issubdtype(host.dtype, np.floating) else np.float32
    eye = np.eye(n, dtype=dtype)
    blocks = [eye]
    for i in range(1, num_models):
        _, col = _pair_groups(host[:n, i * n:(i + 1) * n], int(groups), backend)
        blocks.append(eye[col].T)  # 1 at (col[r], r): model i's feature col[r] -> merged r
    unmerge = xp.asarray(np.concatenate(blocks, axis=0))
    return merge_from_unmerge(unmerge), unmerge


def group_zip_match(corr, *, groups: int, alpha: float = 0.5, beta: float = 1.0,
                    num_models: int = 2, reduction: float | None = None,
                    rule: str = "reference"):
    """MuDSC's group zip (`default_group_fusion_weight`): ZipIt inside paired group sets.

    Groups are paired as in `group_permute_match` (every model i >= 1 against model 0); then
    `zip_match` runs on each paired set alone (its N*Og features, in model order), so a merged
    feature only mixes features of one set. Columns come set by set in model 0's group order, so
    merged group j is the contiguous block j*Og_out:(j+1)*Og_out. With groups=1 this is
    `zip_match` exactly.

    Args:
      corr: (N*n, N*n) similarity, floating dtype, all finite (ValueError naming the count and
        first position otherwise). numpy or jax (not traced).
      groups: g, a divisor of n.
      alpha, beta, rule: as `zip_match`; the same-model budget is per set (MuDSC keeps one
        budget per model plus one per group; with beta = 1 the group budget, which equals the
        per-set budget, is the binding one).
      num_models: N.
      reduction: as `zip_match`, per set: Og_out = int(N*Og*(1 - r) + 1e-4); default 1 - 1/N.

    Returns:
      merge (g*Og_out, N*n) float32, unmerge (N*n, g*Og_out) float32 0/1 (numpy for numpy
      input, jax for jax input).
    """
    fn = "group_zip_match"
    n, og = _check_groups(fn, corr, groups, num_models, integer_ok=False)
    check_number(fn, "alpha", alpha)
    check_number(fn, "beta", beta, lo=0.0)
    if reduction is not None:
        check_number(fn, "reduction", reduction, lo=0.0, hi=1.0)
    if rule not in ("reference", "paper"):
        raise ValueError(f"{fn}: rule must be 'reference' or 'paper', got {rule!r}")
    xp = jnp if isinstance(corr, jax.Array) else np
    host = np.asarray(corr, np.float32)
    # sets[j][m]: model m's group paired with model 0's group j
    sets = np.empty((groups, num_models), np.intp)
    sets[:, 0] = np.arange(groups)
    for i in range(1, num_models):
        sets[:, i], _ = _pair_groups(host[:n, i * n:(i + 1) * n], int(groups), "scipy")
    cols = []
    rows = []
    for j in range(groups):
        # model order inside the set keeps the reference's row-major tie-breaking
        idx = np.concatenate([m * n + sets[j, m] * og + np.arange(og)
                              for m in range(num_models)])
        _, u = zip_match(host[np.ix_(idx, idx)], alpha=alpha, beta=beta, reduction=reduction,
                         num_models=num_models, rule=rule)
        rows.append(idx)
        cols.append(np.asarray(u))
    og_out = cols[0].shape[1]
    unmerge = np.zeros((num_models * n, groups * og_out), np.float32)
    for j, (idx, u) in enumerate(zip(rows, cols)):
        unmerge[idx, j * og_out:(j + 1) * og_out] = u
    unmerge = xp.asarray(unmerge)
    return merge_from_unmerge(unmerge), unmerge
