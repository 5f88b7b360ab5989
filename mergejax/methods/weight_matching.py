"""Git Re-Basin weight matching (Ainsworth et al., ICLR 2023): data-free permutation of every
model onto model 0 by coordinate ascent on the weights' inner product, then averaging."""

from __future__ import annotations

import numpy as np

from mergejax.kernels.keys import seed_from_key
from mergejax.kernels.weight_matching import weight_matching as match_weights
from mergejax.methods.registry import register
from mergejax.specs import flatten


def perms_to_transforms(perms_per_model, widths):
    """Per space, `(merge, unmerge)` that averages model 0 with the permuted others.

    `perms_per_model[i][space]` (n,) aligns model i+1 to model 0.
    """
    out = {}
    for space, n in widths.items():
        blocks = [np.eye(n, dtype=np.float32)]
        for perms in perms_per_model:
            blocks.append(np.eye(n, dtype=np.float32)[perms[space]].T)  # U_i = P_i^T
        unmerge = np.concatenate(blocks)
        out[space] = (unmerge.T / len(blocks), unmerge)
    return out


@register("weight_matching", "matching", needs="weights", checks={"max_iter": "int [1, inf)"})
def weight_matching(spec, endpoints, statistics, *, key=None, spaces, max_iter: int = 100,
                    group_heads: bool = True):
    """Per model i >= 1, Git Re-Basin permutations of `spaces` aligning it to model 0.

    Data-free: `statistics` is not read. `key` seeds the order of the coordinate sweeps.
    `group_heads` permutes spaces with `groups > 1` (attention heads) head by head.
    Returns `{space: (merge (n, N*n), unmerge (N*n, n))}` averaging the aligned models.
    """
    del statistics
    params = [{k: v for k, v in flatten(e).items() if k.startswith("params/")}
              for e in endpoints]
    seed = seed_from_key(key)
    perms = [match_weights(spec, params[0], p, max_iter=max_iter, seed=seed,
                           group_heads=group_heads) for p in params[1:]]
    widths = {s: spec.space(s).width for s in spaces}
    return perms_to_transforms(perms, widths)
