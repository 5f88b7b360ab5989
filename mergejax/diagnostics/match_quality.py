"""How well a matching fits the features it merged, per feature space, from collected statistics.

For N models and a space of width n, the statistics hold the (N*n, N*n) covariance C and
correlation of every model's features at the space's tap (`mergejax.statistics.collect`); a
matching gives `(merge M (n_out, N*n), unmerge U (N*n, n_out))`. Merged feature c's *members*
are the endpoint features k with U[k, c] != 0. Per space:

- `matched_corr`: over merged features with at least two members, the mean correlation between
  two distinct members (MuDSC's sweep score, `mergejax.kernels.dual_space.matched_similarity`,
  here by matmuls: its einsum is slow at ViT widths; for a permutation of two models, the mean
  of corr(A_j, B_pi(j))).
- `within_model_share`: the share of those merged features whose members all come from one
  model (ZipIt! may merge features within a model; 0 for permutations).
- `merged_to_endpoint`: per model i, the mean over its (non-constant) features k of the
  correlation between f_k and its stand-in in the merged model, g_k = (U M f)_k: the merged
  feature f_k was mapped to, as a linear combination of the endpoints' features on the
  statistics' data (ignoring that the merged model's own inputs differ: a proxy, exact for the
  first merged layer). 1 when the merge keeps f_k; from C: corr = (C R^T)_kk /
  sqrt(C_kk (R C R^T)_kk), R = U M.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mergejax.kernels.statistics import Moments

_CONSTANT = 1e-12  # a feature (or stand-in) with variance at most this is constant: skipped


def members(unmerge: np.ndarray) -> np.ndarray:
    """(N*n, n_out) bool: endpoint feature k is a member of merged feature c."""
    return np.asarray(unmerge) != 0


def within_model_share(unmerge: np.ndarray, num_models: int) -> float:
    """Share of merged features with >= 2 members whose members all come from one model
    (0.0 if no feature has two members)."""
    m = members(unmerge)
    n = m.shape[0] // num_models
    size = m.sum(0)
    models_hit = np.stack([m[i * n:(i + 1) * n].any(0) for i in range(num_models)]).sum(0)
    merged = size >= 2
    if not merged.any():
        return 0.0
    return float(np.mean(models_hit[merged] == 1))


def merged_to_endpoint(cov: np.ndarray, merge: np.ndarray, unmerge: np.ndarray,
                       num_models: int) -> list[float]:
    """Per model, the mean correlation of its features with their merged stand-ins (module
    docstring); `cov` (N*n, N*n), merge (n_out, N*n), unmerge (N*n, n_out)."""
    c = np.asarray(cov, np.float64)
    r = np.asarray(unmerge, np.float64) @ np.asarray(merge, np.float64)  # (N*n, N*n)
    cross = np.einsum("kj,kj->k", c, r)  # cov(f_k, g_k)
    var_f = np.diagonal(c)
    var_g = np.einsum("kl,kl->k", r @ c, r)  # diag(R C R^T), as one matmul
    live = (var_f > _CONSTANT) & (var_g > _CONSTANT)
    corr = np.where(live, cross / np.sqrt(np.where(live, var_f * var_g, 1.0)), 0.0)
    n = len(c) // num_models
    out = []
    for i in range(num_models):
        block = slice(i * n, (i + 1) * n)
        out.append(float(corr[block][live[block]].mean()) if live[block].any() else 0.0)
    return out


def matched_corr(corr: np.ndarray, unmerge: np.ndarray) -> float:
    """MuDSC's score (`mergejax.kernels.dual_space.matched_similarity`) by matmuls: over merged
    features with >= 2 members, the mean correlation of two distinct members (0.0 if none)."""
    s = np.asarray(corr, np.float64)
    u = members(unmerge).astype(np.float64)
    size = u.sum(0)
    # u_c^T S u_c sums every ordered pair of members of c, plus the diagonal once per member
    pair_sum = np.einsum("kc,kc->c", u, s @ u) - u.T @ np.diagonal(s)
    keep = size >= 2
    if not keep.any():
        return 0.0
    return float(np.mean(pair_sum[keep] / (size[keep] * (size[keep] - 1))))


def space_quality(moments: Moments, merge: np.ndarray, unmerge: np.ndarray,
                  num_models: int) -> dict:
    """`{"matched_corr", "within_model_share", "merged_to_endpoint": [per model]}` of one
    space's matching (module docstring)."""
    return {"matched_corr": matched_corr(moments.corr, unmerge),
            "within_model_share": within_model_share(unmerge, num_models),
            "merged_to_endpoint": merged_to_endpoint(np.asarray(moments.cov), merge, unmerge,
                                                     num_models)}


def match_quality(statistics: Mapping[str, Moments], transforms: Mapping[str, tuple],
                  num_models: int) -> dict[str, dict]:
    """`{space: space_quality}` for every space that is both matched and observed, in the
    order of `transforms`."""
    return {s: space_quality(statistics[s], m, u, num_models)
            for s, (m, u) in transforms.items() if s in statistics}
