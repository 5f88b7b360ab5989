"""Search objectives: one number from per-task validation scores (higher is better).

- `dynamic`: AutoMerge's dynamically weighted mean (`eval_function/CCT_eval_function.py`):
  w_i = (1/n)(1 + alpha |s_i - mean| / max_j |s_j - mean|), normalised to sum 1, score
  sum_i w_i s_i; tasks far from the mean (above or below) weigh more. When every task scores
  the same the weights are 0/0: the guard returns the plain mean (the limit of equal weights).
- `mean`: the plain mean of the task scores.
- `worst`: the lowest task score (a merge is as good as its worst task).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mergejax.registry import Registry

OBJECTIVES: Registry[Callable[[Sequence[float]], float]] = Registry("search objective")


@OBJECTIVES.decorator("dynamic")
def dynamic_weighted(scores: Sequence[float], alpha: float = 1.0) -> float:
    """AutoMerge's dynamically weighted mean of `scores` (module docstring)."""
    s = np.asarray(scores, np.float64)
    dev = np.abs(s - s.mean())
    if dev.max() == 0.0:  # all scores equal: 0/0 weights; equal weights are the limit
        return float(s.mean())
    w = (1.0 + alpha * dev / dev.max()) / len(s)
    return float(np.sum(w / w.sum() * s))


@OBJECTIVES.decorator("mean")
def mean(scores: Sequence[float]) -> float:
    """The plain mean of the task scores."""
    return float(np.mean(scores))


@OBJECTIVES.decorator("worst")
def worst(scores: Sequence[float]) -> float:
    """The lowest task score."""
    return float(np.min(scores))


def objective(name: str) -> Callable[[Sequence[float]], float]:
    """The objective registered as `name` (KeyError listing the valid ones)."""
    return OBJECTIVES.get(name)
