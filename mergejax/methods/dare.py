"""DARE (Yu et al. 2023, "Language Models are Super Mario"): drop and rescale task vectors."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mergejax.methods import task_vectors as tv
from mergejax.methods.registry import register
from mergejax.methods.task_arithmetic import UNIT_LAMBDAS
from mergejax.methods.ties import check_ties_options

RESCALES = ("inverse", "l1", "none")
MERGES = ("task_arithmetic", "ties")
_L1_EPS = 1e-7  # mergekit `rescaled_masked_tensor`: no rescale when either norm is below it


@dataclasses.dataclass(frozen=True)
class DareDrop:
    """Per-leaf DARE drop; aux = (per-model keys (T,), drop rate p, rescale mode), all traced,
    so one compiled kernel per leaf shape serves every p and rescale mode.

    The leaf's key is fold_in(key of model t, leaf index), so a leaf's mask depends only on
    its model's key and its position, never on the other models or on call order.
    """

    def __call__(self, xs, aux, i):
        keys, p, mode = aux
        # One vmapped draw for all models: a single RNG in the graph compiles much faster
        # than T unrolled ones.
        keeps = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, i), 1.0 - p,
                                                        xs[0].shape))(keys)
        return [self._one(x, keeps[t], p, mode) for t, x in enumerate(xs)]

    @staticmethod
    def _one(x, keep, p, mode):
        zero = jnp.zeros_like(x)
        masked = jnp.where(keep, x, zero)
        # "inverse": official MergeLM divides by (1 - p); p = 1 leaves the all-zero result.
        inverse = jnp.where(p < 1, masked / jnp.where(p < 1, 1 - p, 1).astype(x.dtype), zero)
        # "l1": mergekit `rescaled_masked_tensor`, skipped when either norm is tiny.
        before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(masked))
        ok = (before >= _L1_EPS) & (after >= _L1_EPS)
        l1 = jnp.where(ok, masked * (before / jnp.where(ok, after, 1)), masked)
        return jnp.where(mode == 1, inverse, jnp.where(mode == 2, l1, masked))


def _aux(keys, p, rescale):
    return keys, jnp.float32(p), jnp.int32({"none": 0, "inverse": 1, "l1": 2}[rescale])


def _check(p, rescale, merge):
    p = tv.check_range("p (drop rate)", p, 0, 1)
    tv.check_choice("rescale", rescale, RESCALES)
    tv.check_choice("merge", merge, MERGES)
    return p


def dare_drop(task_vectors: Sequence, *, p: float, key, rescale: str = "inverse",
              key_from: str = "index") -> list:
    """DARE applied to task-vector trees: each entry dropped with probability p, survivors
    rescaled ("inverse": by 1/(1-p), the paper, MergeLM, fusion_bench; "l1": to the tensor's
    original L1 norm, mergekit `rescaled_masked_tensor`; "none"). p = 1 gives zeros (no NaN).
    Keys as in `dare`. Returns a list of T trees."""
    p = _check(p, rescale, "task_arithmetic")
    m = tv.prepare(None, task_vectors, method="dare")
    keys = tv.model_keys(key, m, key_from)
    return [tv.merge_leaves(one, prep=DareDrop(), aux=_aux(keys[t:t + 1], p, rescale))
            for t, one in enumerate(m.each())]


@register("dare", "weight_space",
          search={"p": (0.3, 0.5, 0.7, 0.9), "lam": UNIT_LAMBDAS},
          checks={"p": "[0, 1]", "lam": "finite", "rescale": RESCALES, "merge": MERGES,
                  "density": "(0, 1]", "key_from": ("index", "content"),
                  "disjoint": (*tv.DISJOINT, *(f"dis-{d}" for d in tv.DISJOINT)),
                  "zero_sign": tv.ZERO_SIGN, "scope": ("global", "tensor")})
def dare(base, finetuned, *, key=None, p: float = 0.5, lam: float = 0.3,
         rescale: str = "inverse", merge: str = "task_arithmetic", density: float = 1.0,
         disjoint: str = "mean", zero_sign: str = "majority", scope: str = "global",
         key_from: str = "index"):
    """DARE: drop each task-vector entry with probability p, rescale, then merge.

    Args:
      base, finetuned: theta_0 and T trees of the same structure.
      key: explicit JAX PRNG key (required), or a list of T keys, one per model. The same
        key(s) give the same masks. Per-model keys are fold_in(key, t) (`key_from="index"`) or
        fold_in(key, crc32 of the model's weights) (`"content"`: the merge no longer depends on
        the order of `finetuned`).
      p: drop rate in [0, 1] (fusion_bench default 0.5; the paper goes up to 0.9).
        mergekit's `density` is 1 - p.
      lam: final scale. rescale: "inverse" = 1/(1-p) (paper, default), "l1" = mergekit's
        match of the tensor's L1 norm, "none".
      merge: "task_arithmetic" (theta_0 + lam * sum tau'_t; mergekit `dare_linear`) or "ties"
        (TIES sign election + disjoint merge on the dropped vectors, with TIES' `density`
        trim, default 1 = none, `disjoint`, `zero_sign`, `scope`; the paper's DARE+TIES.
        mergekit `dare_ties` is disjoint="sum", zero_sign="positive").
    """
    p = _check(p, rescale, merge)
    lam = tv.check_range("lam", lam)
    m = tv.prepare(base, finetuned, method="dare")
    keys = tv.model_keys(key, m, key_from)
    prep, aux = DareDrop(), _aux(keys, p, rescale)
    if merge == "task_arithmetic":
        return tv.merge_leaves(m, combine="sum", lam=lam, prep=prep, aux=aux)
    density, disjoint, _ = check_ties_options(density, disjoint, zero_sign, scope)
    return tv.merge_leaves(m, combine="ties-" + disjoint, trim=scope, density=density,
                           zero_sign=zero_sign, lam=lam, prep=prep, aux=aux)
