"""Plain weight averaging: the baseline of both families."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mergejax.methods.registry import register
from mergejax.specs import identity_transforms


@register("average", "weight_space", checks={"weights": "[0, inf)"})
def average(base, finetuned: Sequence, *, key=None, weights: Sequence[float] | None = None):
    """The (weighted) mean of the fine-tuned trees; `base` is not used."""
    del base, key
    w = np.ones(len(finetuned)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    return jax.tree.map(lambda *leaves: sum(wi * np.asarray(leaf, np.float32)
                                            for wi, leaf in zip(w, leaves)).astype(np.float32),
                        *finetuned)


@register("average", "matching", needs="none")
def average_transforms(spec, endpoints, statistics, *, key=None, spaces):
    """Identity matching: every feature of every model averaged with its same-index twin."""
    del statistics, key
    return identity_transforms(spec, len(endpoints), spaces)
