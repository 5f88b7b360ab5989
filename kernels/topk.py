"""Exact magnitude top-k on the float bit pattern: a two-pass radix select, never a sort.

The int32 bit pattern of |x| as float32 is monotone in |x| (sign bit 0), so the k-th smallest
|x| is found by counting: a histogram of the high 15 magnitude bits picks the bin holding it,
a histogram of the low 16 bits inside that bin picks the value. Two passes over the data
whatever its size: XLA:CPU sorts 25M floats in ~9 s, the two histogram passes take ~0.1 s.

Top-k semantics are those of tall_masks' `topk_values_mask` (nik-dim/tall_masks,
`src/utils/ties_utils.py`): with `n` entries and keep fraction `density`, the threshold is the
`(n - int(n * density))`-th smallest |value| (1-based, `topk_kth`) and every entry with
|value| >= threshold is kept, so ties at the threshold are all kept; `density >= 1` keeps
everything.

The histogram pieces (`high_histogram`, `low_histogram`, `first_reaching`, `join_bits`) are
public so that a caller can run the same select over data that never sits in one array (the
weight-space methods sum per-leaf histograms over a whole model, streamed leaf by leaf).

On the host, `kth_smallest_bits_np` returns the same bit pattern for concrete arrays, 5-10x
faster from ~1M entries on (XLA:CPU runs its scatter-add histograms single-threaded, ~10 ns per
entry; bench/bench_topk.py): numpy's SIMD `np.partition` on the int32 patterns, or, when a
strided sample shows a plateau of ties at the rank (bf16 task vectors), two exact counts that
confirm the tied value. Callers switch to it at `HOST_SELECT_MIN` entries outside `jit`
(`use_host_select`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from .checks import check_count, check_dtype, check_finite_array, check_number, is_traced

__all__ = [
    "HI_BINS", "HI_BITS", "HOST_SELECT_MIN", "INF_BITS", "LO_BINS", "SAMPLE_STRIDE", "abs_bits",
    "bracket", "bracket_class", "bracket_pick", "class_counts", "first_reaching",
    "high_histogram", "join_bits", "keep_topk", "kth_smallest_bits", "kth_smallest_bits_np",
    "low_histogram", "topk_kth", "use_host_select",
]

# The 31 magnitude bits of a float32 split into a 15-bit high and a 16-bit low part.
HI_BITS = 16
HI_BINS = 1 << 15
LO_BINS = 1 << 16
_LO_MASK = LO_BINS - 1

# Entries from which concrete arrays are selected on the host (`kth_smallest_bits_np`); read at
# call time, so tests can lower it. Below it the XLA select's fixed cost is as low (~1 ms).
HOST_SELECT_MIN = 1 << 18
# Host select: the sample that looks for a plateau of ties at the rank, and the cache block
# of the two counts that confirm it (256 KB of int32: the second count reads it from L2).
_SAMPLE = 1 << 16
_BLOCK = 1 << 16
# `class_counts`' cache block: 1 MB of int8 classes plus its mask.
_CLASS_BLOCK = 1 << 20


def topk_kth(n: int, density: float) -> int:
    """1-based rank (ascending |value|) of the top-`density` threshold among `n` entries.

    tall_masks `topk_values_mask`: kth = n - int(n * density); 0 means keep everything
    (density >= 1, which that function short-circuits). When int(n * density) == 0 the threshold
    is the maximum, so at least the largest entry (and its ties) survive, as in the reference.
    """
    n = check_count("topk_kth", "n", n, lo=0)
    check_number("topk_kth", "density", density, lo=0.0)
    if density >= 1:
        return 0
    return n - int(n * density)


def abs_bits(x):
    """int32 bit pattern of |x| as float32, same shape as `x`: monotone in |x| for finite
    values (sign bit 0). Any float dtype (bf16/fp16 are widened exactly, float64 rounded)."""
    return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)


def high_histogram(bits):
    """(HI_BINS,) int32 counts of the high parts `bits >> HI_BITS` of an int32 array (any
    shape) of non-negative bit patterns (`abs_bits`)."""
    return jnp.bincount((bits >> HI_BITS).ravel(), length=HI_BINS)


def low_histogram(bits, h):
    """(LO_BINS,) int32 counts of the low 16 bits of the entries of `bits` (any shape) whose
    high part is `h` (a scalar, may be traced); other entries are not counted."""
    bits = bits.ravel()
    idx = jnp.where((bits >> HI_BITS) == h, bits & _LO_MASK, LO_BINS)  # others: dropped bin
    return jnp.bincount(idx, length=LO_BINS + 1)[:LO_BINS]


def kth_smallest_bits(bits, kth):
    """Bit pattern (int32 scalar) of the `kth` smallest (1-based) entry of `bits`.

    Args:
      bits: int32 array, any shape (flattened), of non-negative bit patterns (`abs_bits`).
      kth: rank in [1, bits.size]; may be traced (a Python int is range-checked).

    Exact, ties included: two histogram passes (32K + 64K bins, ~0.1 ms for tiny tensors).
    """
    if not jnp.issubdtype(bits.dtype, jnp.integer):
        raise ValueError(f"kth_smallest_bits: bits must be int32 bit patterns (abs_bits), got "
                         f"dtype {bits.dtype}")
    bits = bits.ravel()
    n = bits.shape[0]
    if isinstance(kth, int) and not 1 <= kth <= n:
        raise ValueError(f"kth must be in [1, {n}], got {kth}")
    c = jnp.cumsum(high_histogram(bits))
    h = jnp.sum(c < kth).astype(jnp.int32)
    below = jnp.where(h > 0, c[jnp.maximum(h - 1, 0)], 0)
    c_lo = jnp.cumsum(low_histogram(bits, h))
    lo = jnp.sum(c_lo < kth - below).astype(jnp.int32)
    return (h << HI_BITS) | lo


def use_host_select(x) -> bool:
    """True when `kth_smallest_bits_np` should select over `x` (any array): concrete (not a
    tracer) and at least `HOST_SELECT_MIN` entries."""
    return not is_traced(x) and np.size(x) >= HOST_SELECT_MIN


def _odd_stride(n: int, sample: int) -> int:
    # An odd stride visits every column of a power-of-two-wide matrix instead of aliasing onto
    # a few (weights are row-major with such widths); the sample only needs to be typical.
    return max(1, n // sample) | 1


def kth_smallest_bits_np(bits, kth: int, *, sample: int = _SAMPLE,
                         scratch: np.ndarray | None = None) -> np.int32:
    """`kth_smallest_bits` on the host: the same int32 bit pattern, exact, deterministic.

    Args:
      bits: int32 array (numpy or a concrete jax array, any shape, flattened; not modified).
        Non-negative patterns (`abs_bits`) as for `kth_smallest_bits`; any int32 works here.
      kth: 1-based rank in [1, bits.size].
      sample: size of the strided sample that looks for ties at the rank (tests lower it).
      scratch: optional writable int32 buffer of bits.size entries, overwritten: the partition
        runs in it instead of a fresh copy (a caller selecting over several arrays of one size
        saves the page faults of a new 4-bytes-per-entry buffer each time, ~40% of the cost).

    `np.partition` of the int32 patterns (they sort as the magnitudes; numpy's SIMD select
    runs ~2x faster on int32 than on float32). First, when the array is large, a sorted
    strided sample checks for a plateau: if one value v fills the sample well past both sides
    of the estimated rank (the ties of bf16 task vectors), two counts per cache block confirm
    #(< v) < kth <= #(<= v) and v is the answer without any copy; if they do not, the partition
    runs. The sample only chooses the route, never the result.
    """
    b = np.ascontiguousarray(bits).ravel()
    if b.dtype != np.int32:
        raise ValueError(f"kth_smallest_bits_np: bits must be int32 bit patterns (abs_bits), "
                         f"got dtype {b.dtype}")
    n = b.size
    kth = check_count("kth_smallest_bits_np", "kth", kth, lo=0)
    if not 1 <= kth <= n:
        raise ValueError(f"kth must be in [1, {n}], got {kth}")
    check_count("kth_smallest_bits_np", "sample", sample)
    if scratch is not None and (scratch.dtype != np.int32 or scratch.size != n
                                or not scratch.flags.writeable):
        raise ValueError(f"kth_smallest_bits_np: scratch must be a writable int32 array of "
                         f"{n} entries, got {scratch.dtype} with {scratch.size}")
    if n > 16 * sample:  # below, the sample costs more than the partition it might save
        s = np.sort(b[::_odd_stride(n, sample)])
        p = (kth - 1) * len(s) // n
        v = s[p]
        # v's run in the sample must reach isqrt(len) positions (>= 2 standard deviations of
        # a sample quantile's rank) beyond p on both sides: then the counts almost surely hit
        margin = math.isqrt(len(s))
        first, end = np.searchsorted(s, v, "left"), np.searchsorted(s, v, "right")
        if first + margin <= p < end - margin and _count_hit(b, kth, int(v)):
            return np.int32(v)
    return _partition(b, kth, scratch)


def _count_hit(b: np.ndarray, kth: int, v: int) -> bool:
    """#(b < v) < kth <= #(b <= v): v is the kth smallest. Two counts per cache block, so the
    second reads the block from cache."""
    below = at = 0
    for i in range(0, b.size, _BLOCK):
        blk = b[i:i + _BLOCK]
        below += np.count_nonzero(blk < v)
        at += np.count_nonzero(blk <= v)
    return below < kth <= at


def _partition(b: np.ndarray, kth: int, scratch: np.ndarray | None = None) -> np.int32:
    """The kth smallest (1-based) of `b` by `np.partition`, in `scratch` if given (a copy)."""
    if scratch is None:
        return np.partition(b, kth - 1)[kth - 1]
    out = scratch.reshape(-1)
    np.copyto(out, b)
    out.partition(kth - 1)
    return out[kth - 1]


# The streamed select (`bracket`, `bracket_class` + `class_counts`, `bracket_pick`) over
# arrays that never sit in one buffer: every SAMPLE_STRIDE-th entry of each block (prime: no
# aliasing with row widths) forms the sample; ~0.2% of the entries, so its sort costs ~1% of a
# pass.
SAMPLE_STRIDE = 509
# abs_bits of +inf; NaNs lie above it. A bracket whose hi is below it classifies every
# non-finite entry above hi, so `bracket_class` can mark them at no extra pass.
INF_BITS = 0x7F800000


def bracket(sample: np.ndarray, kth: int, n: int) -> tuple[int, int]:
    """(lo, hi) bit patterns whose ranks likely enclose the `kth` smallest of `n` entries.

    Args:
      sample: sorted int32 sample (m,) of the n entries (evenly spread, e.g. strided), m >= 1.
      kth: 1-based rank in [1, n].
    The sample entries 2 sqrt(m) positions either side of the estimated rank: a sample
    quantile's rank scatters by at most sqrt(m) / 2 positions (binomial at the median), so the
    bracket holds the answer unless the sample is atypical (`bracket_pick` then says so). An
    open lower end is the int32 minimum; an open upper end is the largest finite magnitude
    (`INF_BITS` - 1: it holds every finite value, and `bracket_class` still marks NaN/inf
    entries above it). lo == hi when one value fills the bracket (ties).
    """
    m = len(sample)
    p, margin = (kth - 1) * m // n, 2 * math.isqrt(m)
    lo = int(sample[p - margin]) if p >= margin else int(np.iinfo(np.int32).min)
    hi = int(sample[p + margin]) if p + margin < m else INF_BITS - 1
    return min(lo, hi), hi


def bracket_class(bits, lo, hi):
    """int8 class of every entry of `bits` (int32 patterns, any shape; traced) against the
    bracket (lo, hi), lo <= hi: (bits >= lo) + (bits > lo) + (bits >= hi) + (bits > hi), so 0
    below lo, 1 at lo, 2 strictly inside, 3 at hi, 4 above hi; where lo == hi an entry at
    lo is 2. Entries above hi that are NaN or inf (bits >= `INF_BITS`) are 5 instead of 4, so
    counting the classes also tells whether the |tau| were finite (`class_counts`). One byte
    per entry: the class array is a quarter of the bits' size, so forming it on the device
    costs a quarter of their memory traffic (`class_counts` reads it)."""
    one = lambda c: c.astype(jnp.int8)  # noqa: E731
    return (one(bits >= lo) + one(bits > lo) + one(bits >= hi) + one(bits > hi)
            + one((bits > hi) & (bits >= INF_BITS)))


def class_counts(classes: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass over `bracket_class` output (int8, any shape) for the bracket (lo, hi).

    Returns ((3,) int64 counts [#(< lo), #(<= lo), #(<= hi)], the flat indices of the entries
    strictly between lo and hi (int64; empty when lo == hi), and whether an entry was marked
    non-finite (class 5: only entries above hi are marked, so with hi >= `INF_BITS` False
    proves nothing)). Additive over the blocks of a larger array (sum the counts, or the
    flags; the caller reads the inside entries' values). Cache-blocked with one reused mask,
    so no array of the block's size is allocated.
    """
    c = np.ascontiguousarray(classes).ravel().view(np.int8)
    plateau = lo == hi
    below = at_lo = above = 0
    nonfinite = False
    inside = []
    mask = np.empty(min(_CLASS_BLOCK, c.size), bool)
    for i in range(0, c.size, _CLASS_BLOCK):
        blk = c[i:i + _CLASS_BLOCK]
        k = mask[:len(blk)]
        # class 0 is the only zero: one SIMD count of the int8s, no compare
        below_blk = len(blk) - np.count_nonzero(blk)
        above_blk = np.count_nonzero(np.greater(blk, 3, out=k))  # classes 4 and 5
        below += below_blk
        above += above_blk
        # a max of the cache-resident block: ~1/4 of this loop's time
        nonfinite = nonfinite or (above_blk > 0 and int(blk.max()) > 4)
        if plateau:  # classes 0, 2, 4 only: everything not above is at most lo
            at_lo += len(blk) - above_blk
            continue
        at_lo += below_blk + np.count_nonzero(np.equal(blk, 1, out=k))
        hit = np.flatnonzero(np.equal(blk, 2, out=k))
        if hit.size:
            inside.append(hit + i)
    counts = np.array([below, at_lo, c.size - above], np.int64)
    return counts, (np.concatenate(inside) if inside else np.zeros(0, np.int64)), nonfinite


def bracket_pick(counts: np.ndarray, inside: np.ndarray, kth: int, lo: int,
                 hi: int) -> np.int32 | None:
    """The `kth` smallest (1-based) from `class_counts` summed over all blocks and the bit
    patterns of the entries inside the bracket (int32), or None when the bracket does not hold
    it (then select another way: the answer is exact or absent)."""
    below, at_lo, at_hi = (int(c) for c in counts)
    if below < kth <= at_lo:
        return np.int32(lo)
    if at_lo < kth <= at_lo + len(inside):
        return np.partition(inside, kth - at_lo - 1)[kth - at_lo - 1]
    if at_lo + len(inside) < kth <= at_hi:
        return np.int32(hi)
    return None


def keep_topk(x, density: float):
    """`x` (any shape, float) with all but its top-`density` |x| entries set to 0.

    tall_masks semantics at the granularity of this one array: entries with |x| >= the
    `topk_kth(x.size, density)`-th smallest |x| are kept (ties too); density >= 1 returns x.
    `x` must be floating and (when concrete) finite; `density` finite and >= 0.
    """
    check_dtype("keep_topk", "x", x)
    check_finite_array("keep_topk", "x", x)
    kth = topk_kth(x.size, density)
    if kth == 0:
        return x
    b = abs_bits(x)
    thr = kth_smallest_bits_np(b, kth) if use_host_select(x) else kth_smallest_bits(b, kth)
    return jnp.where(b >= thr, x, jnp.zeros_like(x))


def first_reaching(hists: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host side of a batched select: per row, the bin holding the `rank`-th smallest entry.

    Args:
      hists: (T, B) integer histograms (int64 when summed over more than 2^31 entries).
      rank: (T,) 1-based ranks, each at most the row's total.

    Returns:
      (bin (T,), rank inside that bin (T,)): the first bin whose cumulative count reaches
      `rank`, and `rank` minus the entries in the bins before it.
    """
    c = np.cumsum(hists, axis=1, dtype=np.int64)
    b = (c < rank[:, None]).sum(axis=1)
    below = np.where(b > 0, c[np.arange(len(b)), np.maximum(b - 1, 0)], 0)
    return b, rank - below


def join_bits(h: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """int32 bit patterns from high bins `h` and low bins `lo` (numpy, same shape)."""
    return ((np.asarray(h, np.int64) << HI_BITS) | lo).astype(np.int32)
