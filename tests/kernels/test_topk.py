"""Radix top-k select (`mergejax.kernels.topk`): exact against np.partition, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.kernels import topk


def _as_float(bits) -> np.float32:
    return np.float32(np.array(bits, np.int32).view(np.float32))


@pytest.mark.parametrize("n", [100, 5000, 70_000])
def test_kth_smallest_bits_exact_with_ties(n):
    # Radix select on the bit pattern: exact, including ties and zeros, at any size.
    rng = np.random.default_rng(n)
    x = np.round(rng.standard_normal(n), 2).astype(np.float32)  # many ties and zeros
    a = np.abs(x)
    bits = np.asarray(topk.abs_bits(x))
    select = jax.jit(topk.kth_smallest_bits)
    for kth in sorted({1, 2, n // 3, n - int(n * 0.2), n - 1, n}):
        assert _as_float(select(bits, kth)) == np.partition(a, kth - 1)[kth - 1], kth


def test_kth_out_of_range_is_an_error():
    bits = topk.abs_bits(jnp.ones(5))
    for kth in (0, 6):
        with pytest.raises(ValueError, match=r"kth must be in \[1, 5\]"):
            topk.kth_smallest_bits(bits, kth)


def test_abs_bits_is_monotone_in_magnitude():
    x = np.array([-3.0, -0.5, 0.0, 0.25, 1e-30, 7.0], np.float32)
    bits = np.asarray(topk.abs_bits(jnp.asarray(x)))
    assert bits.shape == x.shape and bits.dtype == np.int32
    assert (np.argsort(bits, kind="stable") == np.argsort(np.abs(x), kind="stable")).all()


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_keep_topk_is_tall_masks_topk_values_mask(density):
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((40, 25)), 1).astype(np.float32)
    got = np.asarray(topk.keep_topk(jnp.asarray(x), density))
    kth = topk.topk_kth(x.size, density)
    if kth == 0:
        np.testing.assert_array_equal(got, x)
        return
    thr = np.partition(np.abs(x).ravel(), kth - 1)[kth - 1]
    np.testing.assert_array_equal(got, np.where(np.abs(x) >= thr, x, 0))
    assert (got != 0).sum() >= int(x.size * density)  # ties at the threshold are all kept


def test_topk_kth():
    assert topk.topk_kth(10, 1.0) == 0 and topk.topk_kth(10, 2.0) == 0
    assert topk.topk_kth(10, 0.2) == 8
    assert topk.topk_kth(10, 0.01) == 10  # int(0.1) = 0 keeps the maximum (and its ties)


def test_histogram_pieces_select_over_several_arrays():
    # The streamed form: histograms summed over arrays select as if they were one array.
    rng = np.random.default_rng(5)
    parts = [np.round(rng.standard_normal(s), 2).astype(np.float32) for s in (300, 7, 4000)]
    joined = np.abs(np.concatenate(parts))
    ranks = np.array([1, 500, joined.size])
    bits = [topk.abs_bits(jnp.asarray(p)) for p in parts]
    hi = sum(np.asarray(topk.high_histogram(b), np.int64) for b in bits)
    assert hi.shape == (topk.HI_BINS,)
    h, rank = topk.first_reaching(np.stack([hi] * len(ranks)), ranks)
    lo = np.stack([sum(np.asarray(topk.low_histogram(b, int(ht)), np.int64) for b in bits)
                   for ht in h])
    assert lo.shape == (len(ranks), topk.LO_BINS)
    low, _ = topk.first_reaching(lo, rank)
    got = topk.join_bits(h, low)
    for g, r in zip(got, ranks):
        assert _as_float(g) == np.partition(joined, r - 1)[r - 1]
