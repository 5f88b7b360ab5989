"""Model Breadcrumbs (Davari & Belilovsky 2023): drop the largest and the smallest task-vector
entries, then task arithmetic."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from mergejax.kernels import topk
from mergejax.methods import task_vectors as tv
from mergejax.methods.registry import register
from mergejax.methods.task_arithmetic import UNIT_LAMBDAS
from mergejax.methods.ties import check_ties_options

SCOPES = ("row", "tensor")
MERGES = ("task_arithmetic", "ties")


@dataclasses.dataclass(frozen=True)
class BreadcrumbsMask:
    """Per-leaf Breadcrumbs mask (static: density, gamma, scope); see `breadcrumbs`."""

    density: float
    gamma: float
    scope: str

    def __call__(self, xs, aux, i):
        one = self._row if self.scope == "row" else self._tensor
        return [one(x, jnp.zeros_like(x)) for x in xs]

    def _row(self, x, zero):
        # rezazzr/breadcrumbs TaskVectorMiddleKeep (remove_first=True): per row of the last
        # axis remove the top int(n*gamma) |x|, then keep the top int(n*density) of the rest.
        if x.ndim == 0:  # the official code leaves scalars untouched
            return x
        n = x.shape[-1]
        n_rm, n_keep = int(n * self.gamma), int(n * self.density)
        if n_keep == 0:
            return zero
        a = jnp.abs(x.astype(jnp.float32))
        k = min(n_rm + n_keep, n)
        # Rows are short, so lax.top_k is cheap here (it is not for whole-model top-k).
        vals = lax.top_k(a.reshape(-1, n), k)[0].reshape(*x.shape[:-1], k)
        keep = jnp.ones(x.shape, bool)
        if n_rm > 0:  # guard: n_rm = 0 removes nothing
            keep = keep & (a < vals[..., n_rm - 1:n_rm])
        if n_rm + n_keep < n:
            keep = keep & (a >= vals[..., k - 1:k])
        return jnp.where(keep, x, zero)

    def _tensor(self, x, zero):
        # mergekit `magnitude_outliers`: keep the entries ranked [n_bot, n - n_top) by |x|
        # (ascending), n_top = int(gamma*n) shrunk when the bottom cut would go negative.
        if self.density >= 1:
            return x
        n = x.size
        target, n_top = int(self.density * n), int(self.gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        if target == 0:
            return zero
        b = topk.abs_bits(x)
        keep = jnp.ones(x.shape, bool)
        if n_bot > 0:
            keep = keep & (b >= topk.kth_smallest_bits(b, n_bot + 1))
        if n_top > 0:  # mergekit's slice [n_bot:-n_top] is empty for n_top = 0: not here
            keep = keep & (b < topk.kth_smallest_bits(b, n - n_top + 1))
        return jnp.where(keep, x, zero)


def _check(density, gamma, scope, merge):
    density = tv.check_range("density", density, 0, 1, lo_open=True)
    gamma = tv.check_range("gamma", gamma, 0, 1, hi_open=True)
    tv.check_choice("scope", scope, SCOPES)
    tv.check_choice("merge", merge, MERGES)
    return density, gamma


def breadcrumbs_mask(task_vectors: Sequence, *, density: float = 0.1, gamma: float = 0.01,
                     scope: str = "row") -> list:
    """The Breadcrumbs-sparsified task vectors (trees), see `breadcrumbs`."""
    density, gamma = _check(density, gamma, scope, "task_arithmetic")
    m = tv.prepare(None, task_vectors, method="breadcrumbs")
    prep = BreadcrumbsMask(density, gamma, scope)
    return [tv.merge_leaves(one, prep=prep) for one in m.each()]


@register("breadcrumbs", "weight_space",
          search={"lam": UNIT_LAMBDAS, "density": (0.05, 0.1, 0.15, 0.2)},
          checks={"lam": "finite", "density": "(0, 1]", "gamma": "[0, 1)", "scope": SCOPES,
                  "merge": MERGES, "weights": "finite",
                  "disjoint": (*tv.DISJOINT, *(f"dis-{d}" for d in tv.DISJOINT)),
                  "zero_sign": tv.ZERO_SIGN})
def breadcrumbs(base, finetuned, *, key=None, lam: float = 1.0, density: float = 0.1,
                gamma: float = 0.01, scope: str = "row", merge: str = "task_arithmetic",
                weights: Sequence[float] | None = None, disjoint: str = "mean",
                zero_sign: str = "majority"):
    """Model Breadcrumbs: theta_0 + lam * sum_t mask_t(tau_t).

    Args:
      lam: scale (paper's alpha; reported optimum alpha=1, beta=0.1, gamma=0.01 on ViT-B/32).
      density: fraction of entries kept, in (0, 1] (official code's `top_k_keep`, "beta").
      gamma: fraction of the largest-|tau| entries removed, in [0, 1) (`top_k_remove`).
      scope: "row" (paper / official code `TaskVectorMiddleKeep`): per row of the **last
        axis** of each leaf, remove the top int(n*gamma) |tau|, then keep the top
        int(n*density) of the rest (0-d leaves untouched). The official code ran on PyTorch
        layouts, whose last axis of a Linear weight (out, in) is the input axis; a Flax Dense
        kernel is (in, out), so its rows here are per input unit. "tensor" (mergekit
        `magnitude_outliers`): per leaf, keep int(density*n) entries below the top
        int(gamma*n), the top cut shrinking if density + gamma > 1; density = 1 is the
        identity. Exact selection keeps / removes all entries tied at a threshold (the
        references break ties arbitrarily through topk / sort).
      merge: "task_arithmetic" (paper; `weights` optional, unnormalised) or "ties" (mergekit
        `breadcrumbs_ties`: TIES sign election + disjoint merge, mergekit uses
        disjoint="sum", zero_sign="positive").
    gamma = 0 keeps exactly the top-`density` entries per row / tensor (mergekit's
    `[n_bot:-0]` slice would have zeroed the tensor).
    """
    del key
    density, gamma = _check(density, gamma, scope, merge)
    lam = tv.check_range("lam", lam)
    m = tv.prepare(base, finetuned, method="breadcrumbs")
    prep = BreadcrumbsMask(density, gamma, scope)
    if merge == "task_arithmetic":
        return tv.merge_leaves(m, combine="sum", lam=lam, weights=weights, prep=prep)
    _, disjoint, _ = check_ties_options(1.0, disjoint, zero_sign, "global")
    return tv.merge_leaves(m, combine="ties-" + disjoint, zero_sign=zero_sign, lam=lam,
                           prep=prep)
