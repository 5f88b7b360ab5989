"""Post-merge repair: BatchNorm reset (and REPAIR, which for BatchNorm nets is exactly a reset).

ZipIt! and REPAIR recompute BatchNorm running statistics of a merged model on a few batches of
training data: a cumulative (equal-weight per example) average of each batch's statistics in
train mode, like torch's momentum=None.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import numpy as np

from mergejax.models import Model, Variables


@functools.lru_cache(maxsize=16)
def _batch_stats_fn(model: Model):
    # Momentum 0 makes the "running" statistics after one train-mode call equal the batch's own.
    exact = model.with_bn_momentum(0.0)
    return jax.jit(lambda v, x: exact.apply_train(v, x)[1]["batch_stats"])


def reset_batch_stats(model: Model, variables: Variables, batches: Iterable[np.ndarray]
                      ) -> Variables:
    """`variables` with BatchNorm statistics recomputed over `batches` of images (B, H, W, C).

    Each batch's mean and (biased) variance are averaged with weight proportional to its size.
    Models without BatchNorm are returned unchanged.
    """
    if "batch_stats" not in variables:
        return variables
    fn = _batch_stats_fn(model)
    total, count = None, 0
    for x in batches:
        stats = fn(variables, x)
        n = len(x)
        weighted = jax.tree.map(lambda s, n=n: np.asarray(s, np.float64) * n, stats)
        total = weighted if total is None else jax.tree.map(np.add, total, weighted)
        count += len(x)
    if total is None:
        raise ValueError("BatchNorm reset needs at least one batch of data")
    new_stats = jax.tree.map(lambda s: (s / count).astype(np.float32), total)
    return {**variables, "batch_stats": new_stats}
