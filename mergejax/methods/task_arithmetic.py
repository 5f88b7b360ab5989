"""Task Arithmetic (Ilharco et al., ICLR 2023): theta_0 + lam * sum_t w_t tau_t."""

from __future__ import annotations

from collections.abc import Sequence

from mergejax.methods import task_vectors as tv
from mergejax.methods.registry import register

# tall_masks / Task-Arithmetic repo grid: linspace(0, 1, 11)[1:].
UNIT_LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 11))


@register("task_arithmetic", "weight_space",
          search={"lam": UNIT_LAMBDAS}, checks={"lam": "finite", "weights": "finite"})
def task_arithmetic(base, finetuned, *, key=None, lam: float = 0.3,
                    weights: Sequence[float] | None = None):
    """Task Arithmetic: theta_0 + lam * sum_t w_t (theta_t - theta_0).

    Args:
      base: pre-trained tree theta_0; finetuned: T trees of the same structure and shapes.
      lam: scaling coefficient, any finite value (negative = task negation). Default 0.3 as
        fusion_bench (mergekit's `lambda` defaults to 1); tuned on {0.1, ..., 1.0} as in the
        Task Arithmetic / tall_masks code.
      weights: optional per-model weights w_t (default 1), not normalised (mergekit
        `task_arithmetic` with `normalize: false`, its default).

    Returns the merged tree in the base's dtypes. Streams leaf by leaf (one fused kernel per
    leaf shape), so memory is the inputs plus the output.
    """
    del key
    lam = tv.check_range("lam", lam)
    m = tv.prepare(base, finetuned, method="task_arithmetic")
    return tv.merge_leaves(m, combine="sum", lam=lam, weights=weights)
