"""Exact whole-model magnitude thresholds from tensors streamed one at a time (TIES' global trim).

The TIES paper (and tall_masks, mergejax's `ties(scope="global")`) keeps, per model, the top
`density` fraction of |tau| over the *whole* flattened task vector. Out of core this is a radix
select over the float bit pattern (`mergejax.kernels.topk`): one streaming sweep sums the
per-tensor histograms of the high 15 magnitude bits, a second the histograms of the low 16 bits
inside the bin that holds the k-th value, which gives the exact threshold (never an
approximation); the merge pass then applies it (`trim_to_base`). Counts are summed on the host
in int64, so models beyond 2^31 entries are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.kernels import topk
from mergejax.methods.task_vectors import tau

# (base tensor, [member tensors]) of every tensor of the document, in any order
Tensors = Callable[[], Iterable[tuple[np.ndarray, Sequence[np.ndarray]]]]


@jax.jit
def _high(base, members):
    return jnp.stack([topk.high_histogram(topk.abs_bits(tau(base, m))) for m in members])


@jax.jit
def _low(base, members, h):
    return jnp.stack([topk.low_histogram(topk.abs_bits(tau(base, m)), h[t])
                      for t, m in enumerate(members)])


def _summed(parts: Iterable) -> np.ndarray:
    """int64 sum of int32 device histograms, fetched two at a time (async dispatch in between,
    at most two waiting in memory)."""
    total, pending = 0, []
    for p in parts:
        pending.append(p)
        if len(pending) == 2:
            total = total + sum(np.asarray(x, np.int64) for x in jax.device_get(pending))
            pending = []
    if pending:
        total = total + sum(np.asarray(x, np.int64) for x in jax.device_get(pending))
    return total


def global_thresholds(tensors: Tensors, densities: Sequence[float], total: int) -> np.ndarray:
    """(T,) int32 bit patterns: model t keeps `abs_bits(tau_t) >= thr[t]` over all tensors.

    Args:
      tensors: called twice; each call yields (base, members) numpy tensors of every tensor
        (tau_t = member_t - base in float32 or wider, `mergejax.methods.task_vectors.tau`).
      densities: (T,) keep fraction per model in (0, 1]; 1 keeps all (threshold 0).
      total: number of entries of one model's task vector (all tensors).
    Semantics of `mergejax.kernels.topk.topk_kth`: the (n - int(n d))-th smallest |tau| is the
    threshold and ties at it are kept, as `ties(scope="global")`.
    """
    rank = np.array([topk.topk_kth(total, d) for d in densities], np.int64)
    if not rank.any():
        return np.zeros(len(rank), np.int32)
    hist = _summed(_high(b, tuple(ms)) for b, ms in tensors())
    h, inside = topk.first_reaching(hist, np.maximum(rank, 1))
    hj = jnp.asarray(h, jnp.int32)
    hist = _summed(_low(b, tuple(ms), hj) for b, ms in tensors())
    lo, _ = topk.first_reaching(hist, inside)
    return np.where(rank > 0, topk.join_bits(h, lo), 0).astype(np.int32)


@jax.jit
def trim_to_base(base, member, thr):
    """`member` where its task-vector entry is kept (`abs_bits(tau) >= thr`), else `base`.

    The trimmed model: its task vector is exactly tau where kept and 0 elsewhere (x - x = 0), so
    a merge with density 1 on it equals the merge with the trim applied to tau. Same shape and
    dtype as `member`."""
    return jnp.where(topk.abs_bits(tau(base, member)) >= thr, member,
                     base.astype(member.dtype))
