"""TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging
and Compression"): one binary mask per task over a multi-task vector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.methods import task_vectors as tv
from mergejax.methods.registry import register

MERGED = ("sum", "ties")
MASK_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)  # tall_masks' per-task grid


def multitask_vector(base, finetuned, *, merged: str = "sum", density: float = 0.2):
    """tau_MTL, the multi-task vector the masks are built against (no scaling).

    "sum": sum_t tau_t (tall_masks' TA variant, alpha = 1, no trimming); "ties":
    TIES(density=0.2, disjoint sum, majority zero sign, global trim), tall_masks' `use_ties`.
    With `base=None`, `finetuned` holds task vectors.
    """
    tv.check_choice("merged", merged, MERGED)
    m = tv.prepare(base, finetuned, method="tall_masks")
    if merged == "sum":
        return tv.merge_leaves(m, combine="sum", add_base=False)
    density = tv.check_range("density", density, 0, 1, lo_open=True)
    return tv.merge_leaves(m, combine="ties-sum", trim="global", density=density,
                           zero_sign="majority", add_base=False)


def mask_entries(b, f, mtv, lam):
    """TALL mask of one leaf (boolean, b's shape) from base b, fine-tuned f, tau_MTL mtv and
    the task's lambda (a scalar array)."""
    # tall_masks `generate_task_masks`, same float32 operations in the same order:
    # |theta_0 - theta_t| > |theta_0 + tau_MTL - theta_t| * lambda_t (strict).
    dt = tv.compute_dtype(b.dtype)
    b, f, mtv = b.astype(dt), f.astype(dt), mtv.astype(dt)
    return jnp.abs(b - f) > jnp.abs(b + mtv - f) * lam.astype(dt)


@jax.jit
def _mask_leaf(b, f, mtv, lam):
    return mask_entries(b, f, mtv, lam)


@jax.jit
def _reconstruct_leaf(b, f, mtv, lam):
    dt = tv.compute_dtype(b.dtype)
    return jnp.where(mask_entries(b, f, mtv, lam), b.astype(dt) + mtv.astype(dt),
                     b.astype(dt)).astype(b.dtype)


@jax.jit
def _apply_mask_leaf(b, m, mtv):
    dt = tv.compute_dtype(b.dtype)
    return jnp.where(m, b.astype(dt) + mtv.astype(dt), b.astype(dt)).astype(b.dtype)


def prepare_masks(base, finetuned, merged_tv, lam, name="lam"):
    """(validated models, tau_MTL leaves, per-task lambdas (T,)) for building TALL masks;
    `name` is the lambda's name in error messages."""
    m = tv.prepare(base, finetuned, method="tall_masks")
    if merged_tv is None:
        raise ValueError("tall_masks: merged_tv (tau_MTL) is required")
    mt = tv.prepare(base, [merged_tv], method="tall_masks (merged_tv)").models[0]
    lams = jnp.asarray(tv.per_task(name, lam, m.num_models, 0))
    return m, mt, lams


def task_masks(base, finetuned, merged_tv, *, lam=0.6) -> list:
    """The T TALL masks as boolean trees: m_t = |tau_t| > lam_t * |tau_MTL - tau_t|, computed
    exactly as tall_masks does, from the weights: |theta_0 - theta_t| > |theta_0 + tau_MTL -
    theta_t| * lam_t. `lam` is a scalar >= 0 or one value per task."""
    m, mt, lams = prepare_masks(base, finetuned, merged_tv, lam)
    return [m.unflatten(tv.stream(
        lambda i, t=t: _mask_leaf(m.base[i], m.models[t][i], mt[i], lams[t]), m.num_leaves))
        for t in range(m.num_models)]


def packed_task_masks(base, finetuned, *, lam=0.6, merged: str = "sum",
                      density: float = 0.2) -> tuple[np.ndarray, object]:
    """The paper's compressed form: (packed masks (T, ceil(D/8)) uint8, tau_MTL).

    One bit per weight (`pack_masks`; leaves concatenated in `jax.tree` flatten order). Task
    t's model is `reconstruct(base, tau_MTL, unpack_masks(packed, base)[t])`; storage is
    theta_0 + tau_MTL + T*D/8 bytes instead of T models.
    """
    mtv = multitask_vector(base, finetuned, merged=merged, density=density)
    m, mt, lams = prepare_masks(base, finetuned, mtv, lam)
    rows = []
    for t in range(m.num_models):  # one task at a time: D bytes of bool at once
        leaves = tv.stream(
            lambda i, t=t: _mask_leaf(m.base[i], m.models[t][i], mt[i], lams[t]), m.num_leaves)
        rows.append(tv.pack_masks([leaves])[0])
    return np.stack(rows), mtv


def reconstruct(base, merged_tv, mask):
    """theta_0 + mask * tau_MTL (TALL reconstruction of one task, at scale 1)."""
    m = tv.prepare(base, [merged_tv], method="reconstruct")
    k = tv.prepare(base, [mask], method="reconstruct (mask)", check_finite=False,
                   floating_models=False)
    return m.unflatten(tv.stream(
        lambda i: _apply_mask_leaf(m.base[i], k.models[0][i], m.models[0][i]), m.num_leaves))


@register("tall_masks", "weight_space",
          search={"lam": MASK_LAMBDAS}, per_task_search=True,
          checks={"lam": "[0, inf)", "merged": MERGED, "density": "(0, 1]"})
def tall_masks(base, finetuned, *, key=None, lam=0.6, merged: str = "sum",
               density: float = 0.2) -> list:
    """TALL masks: one reconstructed model per task, theta_0 + m_t * tau_MTL.

    Args:
      base, finetuned: theta_0 and T trees of the same structure.
      lam: mask threshold lambda_t >= 0, a scalar or one per task. The paper picks it per task
        from {0.2, ..., 0.6} on that task's validation accuracy of its reconstruction
        (`per_task_search`); 0.6 is fusion_bench's single default.
      merged: tau_MTL = "sum" of the task vectors (default) or "ties" = TIES(density, disjoint
        sum) as tall_masks' `use_ties`. density: that TIES trim (tall_masks' k = 20 -> 0.2).

    Returns a list of T trees (task t's model). Masks are strict (tau_t = 0 is never
    selected). For the compressed storage see `packed_task_masks`.
    """
    del key
    mtv = multitask_vector(base, finetuned, merged=merged, density=density)
    m, mt, lams = prepare_masks(base, finetuned, mtv, lam)
    return [m.unflatten(tv.stream(
        lambda i, t=t: _reconstruct_leaf(m.base[i], m.models[t][i], mt[i], lams[t]),
        m.num_leaves)) for t in range(m.num_models)]

