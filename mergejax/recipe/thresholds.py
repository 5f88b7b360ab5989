"""Exact whole-model magnitude thresholds from tensors streamed one at a time (TIES' global trim).

The TIES paper (and tall_masks, mergejax's `ties(scope="global")`) keeps, per model, the top
`density` fraction of |tau| over the *whole* flattened task vector. Out of core this is the
select of `mergejax.methods.task_vectors.streamed_thresholds` (the one implementation, shared
with the in-memory `ties`) gives the exact threshold, never an approximation: in one process
a bracket from a sample (out of core, a few rows of every tensor) and one streaming sweep of
counts; the radix histograms, two sweeps summed over processes, otherwise. The merge pass then
applies it (trimmed inside the TIES kernel, `execute.ties_block`, or `trim_to_base`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.kernels import topk
from mergejax.methods.task_vectors import Blocks, checked_thresholds, streamed_thresholds, tau


def global_thresholds(tensors: Blocks, densities: Sequence[float], total: int, *,
                      reduce=None, sample: tuple[Blocks, int] | None = None) -> np.ndarray:
    """(T,) int32 bit patterns: model t keeps `abs_bits(tau_t) >= thr[t]` over all tensors.

    Args:
      tensors: called twice (four times if a sampled bracket misses); each call yields
        (base, members) tensors (numpy or device arrays) of every tensor or row block of one
        (tau_t = member_t - base in float32 or wider, `mergejax.methods.task_vectors.tau`).
      densities: (T,) keep fraction per model in (0, 1]; 1 keeps all (threshold 0).
      total: number of entries of one model's task vector (all tensors).
      reduce: combines the histograms of processes that each stream a part of the tensors
        (`mergejax.kernels.processes.process_sum`); `total` stays the whole model's.
      sample: (factory of blocks of a few rows of every tensor, stride within them) for the
        bracket's sample pass (one process), instead of a sweep over all the data.
    Semantics of `mergejax.kernels.topk.topk_kth`: the (n - int(n d))-th smallest |tau| is the
    threshold and ties at it are kept, as `ties(scope="global")`.
    """
    return streamed_thresholds(tensors, [topk.topk_kth(total, d) for d in densities],
                               reduce=reduce,
                               sample=None if sample is None else (*sample, total))


def checked_global_thresholds(tensors: Blocks, densities: Sequence[float], total: int, *,
                              sample: tuple[Blocks, int] | None = None
                              ) -> tuple[np.ndarray, bool]:
    """`global_thresholds` in one process, and True when its passes proved every base and
    member entry finite (`mergejax.methods.task_vectors.checked_thresholds`): the TIES merge
    of the same tensors may then skip its input check (`execute.ties_block`)."""
    return checked_thresholds(tensors, [topk.topk_kth(total, d) for d in densities],
                              sample=None if sample is None else (*sample, total))


@jax.jit
def trim_to_base(base, member, thr):
    """`member` where its task-vector entry is kept (`abs_bits(tau) >= thr`), else `base`.

    The trimmed model: its task vector is exactly tau where kept and 0 elsewhere (x - x = 0), so
    a merge with density 1 on it equals the merge with the trim applied to tau. Same shape and
    dtype as `member`."""
    return jnp.where(topk.abs_bits(tau(base, member)) >= thr, member,
                     base.astype(member.dtype))
