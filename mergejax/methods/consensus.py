"""Consensus merging (Wang et al., ICML 2024): keep only weights that at least k TALL masks
select, then task arithmetic / TIES on the multi-task vector."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mergejax.methods import task_vectors as tv
from mergejax.methods.registry import register
from mergejax.methods.tall_masks import mask_entries, multitask_vector, prepare_masks
from mergejax.methods.task_arithmetic import UNIT_LAMBDAS


def _count(b, fs, mtv, lams):
    c = jnp.zeros(b.shape, jnp.int32)
    for t, f in enumerate(fs):
        c = c + mask_entries(b, f, mtv, lams[t]).astype(jnp.int32)
    return c


@jax.jit
def _consensus_mask_leaf(b, fs, mtv, lams, k):
    return _count(b, fs, mtv, lams) >= k


@jax.jit
def consensus_leaf(b, fs, mtv, lams, k, lam):
    """One leaf of consensus merging: b + lam * [#{t: TALL mask_t} >= k] * mtv, in b's dtype.

    b: theta_0's leaf; fs: the T fine-tuned leaves; mtv: tau_MTL's leaf (`multitask_vector`,
    in b's dtype); lams: (T,) mask lambdas; k: int; lam: the scale (float32 scalar)."""
    dt = tv.compute_dtype(b.dtype)
    kept = jnp.where(_count(b, fs, mtv, lams) >= k, mtv.astype(dt), jnp.zeros((), dt))
    return (b.astype(dt) + lam.astype(dt) * kept).astype(b.dtype)


def _check_k(k):
    if isinstance(k, bool) or not float(k).is_integer() or k < 0:
        raise ValueError(f"k must be an integer >= 0 (number of agreeing task masks), got {k!r}")
    return int(k)


def consensus_mask(base, finetuned, merged_tv, *, mask_lam=0.6, k: int = 2):
    """Boolean tree: weights selected by at least `k` of the T TALL masks built with
    `mask_lam` (scalar or per task) against `merged_tv`. k = 0 keeps all, k > T none."""
    k = _check_k(k)
    m, mt, lams = prepare_masks(base, finetuned, merged_tv, mask_lam, "mask_lam")
    return m.unflatten(tv.stream(lambda i: _consensus_mask_leaf(*m.leaf(i), mt[i], lams, k),
                                 m.num_leaves))


@register("consensus", "weight_space",
          search={"lam": UNIT_LAMBDAS},
          checks={"lam": "finite", "k": "int [0, inf)", "mask_lam": "[0, inf)",
                  "merged": ("sum", "ties"), "density": "(0, 1]"})
def consensus(base, finetuned, *, key=None, lam: float = 0.3, k: int = 2, mask_lam=0.6,
              merged: str = "sum", density: float = 0.2):
    """Consensus merging: theta_0 + lam * (m_cons * tau_MTL), m_cons = [#TALL masks >= k].

    Args:
      lam: scale alpha (tall_masks tunes it on {0.1, ..., 1.0}; default 0.3 as TA).
      k: minimum number of agreeing task masks (tall_masks `prun_thre_k`, default 2: drops
        "catastrophic" weights no task uses and "selfish" ones only one task uses). k = 0 is
        plain TA / TIES with tau_MTL, k > T gives theta_0.
      mask_lam: the TALL lambda_t of the masks (scalar or per task; tall_masks reuses the
        per-task values chosen for TALL masks, fusion_bench's default is 0.6).
      merged, density: tau_MTL = "sum" of task vectors (Consensus-TA) or "ties" =
        TIES(density, disjoint sum) (Consensus-TIES), as in `tall_masks`.
    Memory: the inputs plus tau_MTL plus the output; the T masks are never stored.
    """
    del key
    k = _check_k(k)
    lam = tv.check_range("lam", lam)
    mtv = multitask_vector(base, finetuned, merged=merged, density=density)
    m, mt, lams = prepare_masks(base, finetuned, mtv, mask_lam, "mask_lam")
    lam_j = jnp.float32(lam)
    return m.unflatten(tv.stream(
        lambda i: consensus_leaf(*m.leaf(i), mt[i], lams, k, lam_j), m.num_leaves))
