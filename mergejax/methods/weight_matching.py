"""Git Re-Basin weight matching (Ainsworth et al., ICLR 2023): data-free permutation of every
model onto model 0 by coordinate ascent on the weights' inner product, then averaging."""

from __future__ import annotations

import numpy as np

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


@register("weight_matching", "matching", hparams=dict(max_iter=100))
def weight_matching(problem, *, max_iter: int = 100):
    """Per model i >= 1, Git Re-Basin permutations of the merged spaces aligning it to model 0."""
    spec = problem.spec
    params = [{k: v for k, v in flatten(e).items() if k.startswith("params/")}
              for e in problem.endpoints]
    seed = int(np.asarray(jax_key_data(problem.key)).ravel()[-1])
    perms = [match_weights(spec, params[0], p, max_iter=max_iter, seed=seed) for p in params[1:]]
    widths = {s: spec.space(s).width for s in problem.spaces}
    return perms_to_transforms(perms, widths)


def jax_key_data(key):
    """The raw bits of a PRNG key (new-style or legacy)."""
    import jax

    return jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) \
        else key
