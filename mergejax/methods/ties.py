"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

from mergejax.methods import task_vectors as tv
from mergejax.methods.registry import register

SCOPES = ("global", "tensor")
TIES_LAMBDAS = tuple(round(0.8 + 0.1 * i, 1) for i in range(18))  # official grid 0.8..2.5


def check_ties_options(density, disjoint, zero_sign, scope, lam=1.0):
    """Validated (density, disjoint without a "dis-" prefix, lam) of the TIES options, or a
    ValueError naming the bad one (shared by dare and breadcrumbs, merge="ties")."""
    density = tv.check_range("density", density, 0, 1, lo_open=True)
    disjoint = disjoint[len("dis-"):] if str(disjoint).startswith("dis-") else disjoint
    tv.check_choice("disjoint", disjoint, tv.DISJOINT)
    tv.check_choice("zero_sign", zero_sign, tv.ZERO_SIGN)
    tv.check_choice("scope", scope, SCOPES)
    return density, disjoint, tv.check_range("lam", lam)


def trim_topk(task_vectors: Sequence, density: float = 0.2, *, scope: str = "global") -> list:
    """Top-`density` magnitude trim of each task vector (TIES step 1), as trees.

    Exactly tall_masks' `topk_values_mask` (K read by `density_from_k`): per task, keep the
    entries with |tau| >= the (d - int(d * density))-th smallest |tau|; ties at the threshold
    are kept; density = 1 keeps all. `scope="global"` ranks over the whole flattened model (TIES
    official code, tall_masks, fusion_bench); `"tensor"` per leaf (mergekit's granularity).
    """
    density, _, _ = check_ties_options(density, "mean", "majority", scope)
    m = tv.prepare(None, task_vectors, method="trim_topk")
    return [tv.merge_leaves(one, combine="sum", trim=scope, density=density)
            for one in m.each()]


def ties_merge_task_vectors(task_vectors: Sequence, *, density: float = 0.2,
                            disjoint: str = "mean", zero_sign: str = "majority",
                            scope: str = "global") -> object:
    """The TIES merged task vector (no scaling) from task-vector trees.

    Equals tall_masks' `ties_merging(flat_task_checks, reset_thresh=K, merge_func="dis-...")`
    with density = `density_from_k(K)`; see `ties` for the options.
    """
    density, disjoint, _ = check_ties_options(density, disjoint, zero_sign, scope)
    m = tv.prepare(None, task_vectors, method="ties")
    return tv.merge_leaves(m, combine="ties-" + disjoint, trim=scope, density=density,
                           zero_sign=zero_sign)


@register("ties", "weight_space",
          search={"lam": TIES_LAMBDAS},
          checks={"lam": "finite", "density": "(0, 1]", "scope": SCOPES,
                  "disjoint": (*tv.DISJOINT, *(f"dis-{d}" for d in tv.DISJOINT)),
                  "zero_sign": tv.ZERO_SIGN})
def ties(base, finetuned, *, key=None, lam: float = 1.0, density: float = 0.2,
         disjoint: str = "mean", zero_sign: str = "majority", scope: str = "global"):
    """TIES-Merging: theta_0 + lam * disjoint_merge(elect(trim(tau_1..tau_T))).

    Args:
      base: pre-trained tree theta_0; finetuned: T trees of the same structure and shapes.
      lam: final scale (official grid 0.8..2.5; the paper's default is 1).
      density: keep fraction of the magnitude trim, in (0, 1] (the paper's k=20% is 0.2; 1
        disables trimming). Threshold semantics of tall_masks `topk_values_mask` (ties kept).
      disjoint: "mean" (paper, official, tall_masks: mean of the agreeing non-zero entries),
        "sum" (fusion_bench's default, tall_masks' multi-task vector), "max" (signed max |.|).
      zero_sign: sign elected where the trimmed values sum to exactly 0: "majority" = the sign
        of the sum of all elected signs over the whole model (official code / tall_masks
        `resolve_zero_signs`), "positive" = +1 (mergekit `get_mask`).
      scope: "global" = top-k over the whole flattened model per task (paper, official code,
        tall_masks, fusion_bench), "tensor" = per leaf (mergekit; the zero-sign majority is
        still taken over the whole model).

    Unlike mergekit, no per-model weights: mergekit multiplies tau by its weight before the
    sign election (mergekit#474), which is not the paper's Algorithm 1.
    Streams leaf by leaf (two passes for the exact global thresholds, one merge pass).
    """
    del key
    density, disjoint, lam = check_ties_options(density, disjoint, zero_sign, scope, lam)
    m = tv.prepare(base, finetuned, method="ties")
    return tv.merge_leaves(m, combine="ties-" + disjoint, trim=scope, density=density,
                           zero_sign=zero_sign, lam=lam)
