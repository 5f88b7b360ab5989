"""Test oracle: a plain numpy transcription of ZipIt!'s greedy matching loop.

This follows the published algorithm step by step (permutation_family.md §1.2): a flat argmax over
the whole remaining similarity matrix, then the chosen pair is merged and one row and one column
are *deleted*, so every step costs O(O^2). It is deliberately naive: it is the ground truth that
`mergejax.kernels.zip_match` (masked, static shapes, lazy row maxima) is compared against, and the
"naive loop" of `bench/bench_zip_match.py`. It is test/bench code only, not part of the library.

Because it deletes rows and columns exactly like the reference, the two quirks of the reference
(alpha <= 0 blocks by *position* in the shrinking matrix; an all -inf matrix drops a feature)
come out of it naturally. `rule="paper"` blocks by model of origin instead and, when every
similarity is -inf, merges the first two remaining features rather than dropping one.
"""

from __future__ import annotations

import numpy as np


def zipit_oracle(
    corr: np.ndarray,
    alpha: float = 0.3,
    beta: float = 0.125,
    num_models: int = 2,
    reduction: float | None = None,
    rule: str = "reference",
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy ZipIt! matching by flat argmax and row/column deletion.

    Args:
      corr: (O, O) correlation matrix, O = num_models * n.
      alpha, beta: ZipIt!'s a and b.
      num_models: N; model m owns features m*n:(m+1)*n.
      reduction: r, default 1 - 1/N; merged width n_out = int(O * (1 - r) + 1e-4).
      rule: "reference" or "paper" (see module docstring).

    Returns:
      merge (n_out, O) float32 and unmerge (O, n_out) float32.
    """
    sims = np.array(corr, dtype=np.float32, copy=True)
    big_o = sims.shape[0]
    if reduction is None:
        reduction = 1.0 - 1.0 / num_models
    n_out = int(big_o * (1 - reduction) + 1e-4)
    n = big_o // num_models
    perm = np.eye(big_o, dtype=np.float32)  # columns = current merged features
    np.fill_diagonal(sims, -np.inf)
    origin = np.arange(big_o) // n  # model of origin of each remaining feature
    to_remove = big_o - n_out
    budget = np.full(num_models, int((to_remove // num_models) * beta + 1e-4), dtype=np.int64)
    a32 = np.float32(alpha)

    while perm.shape[1] > n_out:
        live = sims.shape[1]
        flat = int(np.argmax(sims))  # first maximum in row-major order
        r, c = divmod(flat, live)
        if rule == "paper" and not np.isfinite(sims.reshape(-1)[flat]):
            r, c = 0, 1  # nothing allowed is left: merge the first two features, drop none
        i, j = min(r, c), max(r, c)
        oi, oj = origin[i], origin[j]

        perm[:, i] += perm[:, j]
        perm = np.delete(perm, j, axis=1)

        # merged column, then (after deleting column j) merged row
        sims[:, i] = np.minimum(sims[:, i], sims[:, j])
        if alpha <= 0:
            for o in (oi, oj):
                if rule == "paper":
                    sims[origin == o, i] = -np.inf
                else:  # reference: by position among the current rows (j still present)
                    sims[o * n:(o + 1) * n, i] = -np.inf
        else:
            sims[:, i] *= a32
        sims = np.delete(sims, j, axis=1)
        origin_cols = np.delete(origin, j)
        sims[i, :] = np.minimum(sims[i, :], sims[j, :])
        if alpha <= 0:
            for o in (oi, oj):
                if rule == "paper":
                    sims[i, origin_cols == o] = -np.inf
                else:  # reference: by position among the columns left after deleting j
                    sims[i, o * n:(o + 1) * n] = -np.inf
        else:
            sims[i, :] *= a32
        sims = np.delete(sims, j, axis=0)
        origin = origin_cols

        if oi == oj:
            # the reference reads the origin after the deletion; equal to oi unless i == j
            o = origin[i]
            budget[o] -= 1
            if budget[o] <= 0:
                sel = origin == o
                sims[np.ix_(sel, sel)] = -np.inf

    unmerge = perm
    merge = (perm / (perm.sum(axis=0, keepdims=True) + np.float32(1e-5))).T
    return merge.astype(np.float32), unmerge.astype(np.float32)
