"""Plain weight averaging: the baseline of both families."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergejax.methods import task_vectors as tv
from mergejax.methods.registry import register
from mergejax.specs import identity_transforms


@register("average", "weight_space", checks={"weights": "[0, inf)"})
def average(base, finetuned: Sequence, *, key=None, weights: Sequence[float] | None = None):
    """The (weighted) mean sum_t w_t theta_t / sum_t w_t of the fine-tuned trees; `base` is not
    used.

    Computed leaf by leaf in one fused float32 kernel (`task_vectors.merge_leaves`; wider
    inputs keep their dtype), returned in the models' dtypes: a mean of bf16 models is bf16,
    as every other weight-space method returns. One read of every input and one write: a
    numpy float64 sum moved ~12x more bytes (measured 5x slower on bf16 tensors,
    bench/RESULTS.md "Out-of-core recipes").
    """
    del base, key
    m = tv.prepare(None, finetuned, method="average")
    w = tv.per_task("weights", np.ones(m.num_models) if weights is None else weights,
                    m.num_models, lo=0.0)
    if not w.sum() > 0:
        raise ValueError("average: the weights sum to 0; give at least one positive weight")
    return tv.merge_leaves(m, combine="sum", lam=1.0, weights=w / w.sum())


@register("average", "matching", needs="none")
def average_transforms(spec, endpoints, statistics, *, key=None, spaces):
    """Identity matching: every feature of every model averaged with its same-index twin."""
    del statistics, key
    return identity_transforms(spec, len(endpoints), spaces)
