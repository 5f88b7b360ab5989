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


# --- Host select (`kth_smallest_bits_np`): the same bits as the XLA select, on any input ------

_N = 20_000  # > 4 * _SAMPLE_SMALL: the sample/bracket path runs, not the small-array partition
_SAMPLE_SMALL = 256


def _adversarial(n: int) -> dict[str, np.ndarray]:
    """float32 arrays (n,) whose |x| stress the bracket: ties, one value, zeros, no ties."""
    rng = np.random.default_rng(n)
    stride = topk._odd_stride(n, _SAMPLE_SMALL)
    bf16_base = jnp.asarray(rng.standard_normal(n) * 0.02, jnp.bfloat16)
    bf16_ft = (bf16_base.astype(jnp.float32) + rng.standard_normal(n) * 1e-3).astype(
        jnp.bfloat16)
    plateau = np.zeros(n, np.float32)  # zeros, then one value over the middle ranks, then big
    plateau[n // 5:] = 0.5
    plateau[n - n // 5:] = rng.uniform(1, 2, n // 5)
    rng.shuffle(plateau)
    fooled = rng.uniform(1, 2, n).astype(np.float32)  # the sample sees only zeros
    fooled[::stride] = 0
    skewed = rng.uniform(1, 2, n).astype(np.float32)  # the sample sees only small values
    skewed[::stride] = rng.uniform(0, 1e-3, len(skewed[::stride]))
    return {
        "continuous": rng.standard_normal(n).astype(np.float32),
        "rounded (many ties, zeros)": np.round(rng.standard_normal(n), 2).astype(np.float32),
        "all equal": np.full(n, -0.25, np.float32),
        "all zero": np.zeros(n, np.float32),
        "mostly zero": np.where(rng.uniform(size=n) < 0.97, 0, rng.standard_normal(n)).astype(
            np.float32),
        "one value at the threshold": plateau,
        "bf16 fine-tune minus base": np.asarray(bf16_ft.astype(jnp.float32)
                                                - bf16_base.astype(jnp.float32)),
        "sorted": np.sort(rng.standard_normal(n)).astype(np.float32),
        "sample sees zeros only": fooled,
        "sample sees small values only": skewed,
    }


def _ranks(n: int) -> list[int]:
    return sorted({1, 2, 3, n // 100, n // 3, n // 2, n - int(n * 0.2), n - 2, n - 1, n})


@pytest.mark.parametrize("case", list(_adversarial(_N)))
def test_host_select_equals_xla_select_and_partition(case):
    x = _adversarial(_N)[case]
    bits = np.asarray(topk.abs_bits(jnp.asarray(x)))
    oracle = np.sort(np.abs(x))  # float order, independent of the bit trick
    select = jax.jit(topk.kth_smallest_bits)
    for kth in _ranks(_N):
        got = topk.kth_smallest_bits_np(bits, kth, sample=_SAMPLE_SMALL)
        assert isinstance(got, np.int32)
        assert got == select(bits, kth), (case, kth)
        assert _as_float(got) == oracle[kth - 1], (case, kth)


def test_host_select_default_sample_on_large_arrays():
    # Above 4 * _SAMPLE entries the default bracket runs; bf16-derived and continuous data.
    n = 4 * topk._SAMPLE + 12_345
    rng = np.random.default_rng(1)
    base = rng.standard_normal(n).astype(np.float32) * 0.02
    diff = ((base + rng.standard_normal(n).astype(np.float32) * 1e-3).astype(jnp.bfloat16)
            .astype(np.float32) - base.astype(jnp.bfloat16).astype(np.float32))
    for x in (diff, base):
        bits = np.asarray(topk.abs_bits(jnp.asarray(x)))
        for kth in (1, n // 10, n - int(n * 0.2), n - int(n * 0.01), n):
            assert topk.kth_smallest_bits_np(bits, kth) == np.partition(bits, kth - 1)[kth - 1]


def _partition_calls(monkeypatch) -> list:
    calls = []
    full = topk._partition
    monkeypatch.setattr(topk, "_partition",
                        lambda b, kth, scratch=None: calls.append(kth) or full(b, kth, scratch))
    return calls


def test_host_select_counts_ties_and_falls_back_when_the_sample_misleads(monkeypatch):
    # The two routes: a plateau of ties at the rank is decided by two counts (no partition);
    # a sample unlike the array sends the counts wide of the rank, and the partition answers.
    calls = _partition_calls(monkeypatch)
    cases = _adversarial(_N)
    for case in ("all equal", "one value at the threshold", "all zero"):
        bits = np.asarray(topk.abs_bits(jnp.asarray(cases[case])))
        for kth in (_N // 2, _N // 3):
            assert topk.kth_smallest_bits_np(bits, kth, sample=_SAMPLE_SMALL) == np.sort(bits)[
                kth - 1]
    assert calls == []
    for case in ("sample sees zeros only", "continuous"):
        bits = np.asarray(topk.abs_bits(jnp.asarray(cases[case])))
        kth = _N - int(_N * 0.2)
        assert topk.kth_smallest_bits_np(bits, kth, sample=_SAMPLE_SMALL) == np.sort(bits)[
            kth - 1]
    assert calls == [_N - int(_N * 0.2)] * 2
    # The sample sees one value v: ranks just outside v's run are answered by the partition.
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 2, _N).astype(np.float32)
    x[::topk._odd_stride(_N, _SAMPLE_SMALL)] = 1.0
    bits = np.asarray(topk.abs_bits(jnp.asarray(x)))
    below, at = int((x < 1).sum()), int((x <= 1).sum())
    calls.clear()
    for kth in (below, below + 1, at, at + 1):
        assert topk.kth_smallest_bits_np(bits, kth, sample=_SAMPLE_SMALL) == np.sort(bits)[
            kth - 1], kth
    assert calls == [below, at + 1]


def test_host_select_scratch_buffer():
    rng = np.random.default_rng(4)
    bits = np.asarray(topk.abs_bits(jnp.asarray(rng.standard_normal((50, 40)), jnp.float32)))
    keep = bits.copy()
    scratch = np.empty((50, 40), np.int32)
    for kth in (1, 1000, 2000):  # reused: each call overwrites it
        assert topk.kth_smallest_bits_np(bits, kth, scratch=scratch) == np.sort(bits.ravel())[
            kth - 1]
    np.testing.assert_array_equal(bits, keep)  # the input is never modified
    for bad in (np.empty(1999, np.int32), np.empty(2000, np.float32)):
        with pytest.raises(ValueError, match="scratch must be a writable int32 array of 2000"):
            topk.kth_smallest_bits_np(bits, 1, scratch=bad)


def test_host_select_input_errors():
    bits = np.asarray(topk.abs_bits(jnp.ones(5)))
    for kth in (0, 6):
        with pytest.raises(ValueError, match=r"kth must be in \[1, 5\]"):
            topk.kth_smallest_bits_np(bits, kth)
    with pytest.raises(ValueError, match="int32 bit patterns"):
        topk.kth_smallest_bits_np(np.ones(5, np.float32), 1)


def test_use_host_select(monkeypatch):
    monkeypatch.setattr(topk, "HOST_SELECT_MIN", 10)
    assert topk.use_host_select(np.ones(10)) and not topk.use_host_select(np.ones(9))
    assert jax.jit(lambda x: jnp.int32(topk.use_host_select(x)))(jnp.ones(10)) == 0  # traced


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_keep_topk_host_path_equals_xla_path(monkeypatch, density):
    x = jnp.asarray(_adversarial(_N)["bf16 fine-tune minus base"].reshape(100, 200))
    monkeypatch.setattr(topk, "HOST_SELECT_MIN", 1 << 40)
    xla = np.asarray(topk.keep_topk(x, density))
    monkeypatch.setattr(topk, "HOST_SELECT_MIN", 1)
    host = np.asarray(topk.keep_topk(x, density))
    np.testing.assert_array_equal(host.view(np.int32), xla.view(np.int32))
    thr = np.sort(np.abs(np.asarray(x)).ravel())[topk.topk_kth(x.size, density) - 1]
    np.testing.assert_array_equal(host, np.where(np.abs(x) >= thr, x, 0))


def _tiny_models(dtype):
    rng = np.random.default_rng(7)
    base = {"w": rng.standard_normal((30, 40)) * 0.02, "b": rng.standard_normal(40) * 0.02,
            "s": np.float32(0.1)}
    base = {k: jnp.asarray(v, dtype) for k, v in base.items()}
    fts = [{k: (v.astype(jnp.float32) + jnp.asarray(np.round(rng.standard_normal(np.shape(v))
                                                             * 1e-3, 4))).astype(dtype)
            for k, v in base.items()} for _ in range(3)]
    return base, fts


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_per_tensor_merges_identical_with_host_thresholds(monkeypatch, dtype):
    # TIES / trim / DARE-TIES with per-tensor trims: the host thresholds (forced on tiny leaves)
    # give the in-kernel select's outputs bit for bit, majority zero-sign re-run included.
    from mergejax.methods import dare, ties

    base, fts = _tiny_models(dtype)
    taus = [jax.tree.map(lambda f, b: f.astype(jnp.float32) - b.astype(jnp.float32), f, base)
            for f in fts]
    runs = {
        "ties mean majority": lambda: ties.ties(base, fts, density=0.3, scope="tensor"),
        "ties sum positive": lambda: ties.ties(base, fts, density=0.05, scope="tensor",
                                               disjoint="sum", zero_sign="positive"),
        "ties max": lambda: ties.ties(base, fts, density=0.5, scope="tensor", disjoint="max"),
        "trim_topk": lambda: ties.trim_topk(taus, 0.2, scope="tensor"),
        "dare ties": lambda: dare.dare(base, fts, key=jax.random.key(0), p=0.3, merge="ties",
                                       density=0.4, scope="tensor"),
    }
    for name, run in runs.items():
        monkeypatch.setattr(topk, "HOST_SELECT_MIN", 1 << 40)
        want = jax.tree.leaves(run())
        monkeypatch.setattr(topk, "HOST_SELECT_MIN", 1)
        got = jax.tree.leaves(run())
        for w, g in zip(want, got):  # bytes: -0.0 vs 0.0 or a 1-ulp change would show
            assert w.dtype == g.dtype
            np.testing.assert_array_equal(np.asarray(g).reshape(-1).view(np.uint8),
                                          np.asarray(w).reshape(-1).view(np.uint8), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tensor_thresholds_are_kth_smallest_bits_per_model(dtype):
    from mergejax.methods import task_vectors as tv

    rng = np.random.default_rng(11)
    base = jnp.asarray(rng.standard_normal((30, 40)), dtype)
    members = [jnp.asarray(rng.standard_normal((30, 40)), dtype) for _ in range(3)]
    for kth in (1, 7, topk.topk_kth(base.size, 0.2), base.size):
        got = tv.tensor_thresholds(base, members, kth)
        assert got.dtype == np.int32 and got.shape == (3,)
        for g, m in zip(got, members):
            a = np.abs(np.asarray(m, np.float32) - np.asarray(base, np.float32)).ravel()
            assert _as_float(g) == np.sort(a)[kth - 1], kth


# --- Streamed bracket select (`bracket`, `bracket_class`, `class_counts`, `bracket_pick`) -------


def _bracket_select(parts, kth, stride=topk.SAMPLE_STRIDE):
    """The streamed select as `task_vectors._bracketed_thresholds` runs it, on int32 parts."""
    n = sum(p.size for p in parts)
    sample = np.sort(np.concatenate([p.ravel()[::stride] for p in parts]))
    lo, hi = topk.bracket(sample, kth, n)
    assert lo <= hi
    counts, inside = np.zeros(3, np.int64), []
    for p in parts:
        c, index, _ = _class_counts(p, lo, hi)
        counts += c
        inside.append(p.ravel()[index])
    return topk.bracket_pick(counts, np.concatenate(inside), kth, lo, hi)


def _class_counts(bits, lo, hi):
    classes = np.asarray(topk.bracket_class(jnp.asarray(bits), jnp.int32(lo), jnp.int32(hi)))
    assert classes.dtype == np.int8 and classes.shape == np.shape(bits)
    return topk.class_counts(classes, lo, hi)


@pytest.mark.parametrize("case", list(_adversarial(_N)))
def test_bracket_select_over_parts_is_exact_or_none(case):
    bits = np.asarray(topk.abs_bits(jnp.asarray(_adversarial(_N)[case])))
    parts = [bits[:7000].reshape(70, 100), bits[7000:7003], bits[7003:]]
    oracle = np.sort(bits)
    answered = 0
    for kth in _ranks(_N):
        got = _bracket_select(parts, kth, stride=37)
        if got is not None:
            assert isinstance(got, np.int32) and got == oracle[kth - 1], (case, kth)
            answered += 1
    if not case.startswith("sample sees"):  # a typical sample's bracket holds every rank
        assert answered == len(_ranks(_N)), case


def test_bracket_pick_says_when_the_bracket_misses():
    # Every 37th entry (the sample) is 0, the rest is large: the bracket is [0, 0] and ranks
    # past the zeros are not in it.
    x = np.arange(1, 3701, dtype=np.int32)
    x[::37] = 0
    zeros = int((x == 0).sum())
    assert _bracket_select([x], zeros, stride=37) == 0
    assert _bracket_select([x], zeros + 1, stride=37) is None
    # The sample sees only v = 1000: ranks next to v's run are outside the bracket [v, v].
    y = np.arange(1, 3701, dtype=np.int32)
    y[::37] = 1000
    below, at = int((y < 1000).sum()), int((y <= 1000).sum())
    assert _bracket_select([y], below, stride=37) is None
    assert _bracket_select([y], below + 1, stride=37) == 1000
    assert _bracket_select([y], at, stride=37) == 1000
    assert _bracket_select([y], at + 1, stride=37) is None


@pytest.mark.parametrize("size", [5000, 3 * (1 << 20) + 17])  # one cache block, and several
def test_class_counts_open_ends_and_wide_brackets(size):
    rng = np.random.default_rng(8)
    x = rng.integers(0, 2**31 - 1, size, dtype=np.int32)
    x[::7] = x[3]  # a value with many ties
    i32 = np.iinfo(np.int32)
    for lo, hi in ((int(i32.min), int(i32.max)), (0, 0), (int(i32.min), int(x[5])),
                   (int(x[9]), int(i32.max)), (int(np.min(x)), int(np.max(x))),
                   (int(x[3]), int(x[3])),  # a plateau bracket, lo == hi, on a present value
                   (int(x[3]), int(x[3]) + 1), (int(x[3]) - 1, int(x[3]))):  # edges at ties
        counts, index, nonfinite = _class_counts(x.reshape(-1, 1) if size == 5000 else x,
                                                 lo, hi)
        np.testing.assert_array_equal(counts, [(x < lo).sum(), (x <= lo).sum(), (x <= hi).sum()])
        np.testing.assert_array_equal(index, np.flatnonzero((x > lo) & (x < hi)))
        assert nonfinite == bool(((x > hi) & (x >= topk.INF_BITS)).any())


@pytest.mark.parametrize("size", [5000, 3 * (1 << 20) + 17])
def test_class_counts_flags_nonfinite_above_a_finite_hi_with_counts_unchanged(size):
    # NaN/inf |tau| entries are class 5 (above hi, counted as before) when hi is finite, and
    # `class_counts` says so; a bracket reaching the non-finite bits cannot tell.
    rng = np.random.default_rng(13)
    v = rng.standard_normal(size).astype(np.float32)
    lo, hi = (int(b) for b in np.asarray(topk.abs_bits(jnp.asarray([0.5, 1.0]))))
    finite_bits = np.asarray(topk.abs_bits(jnp.asarray(v)))
    assert not _class_counts(finite_bits, lo, hi)[2]
    for bad in (np.nan, np.inf, -np.inf):
        w = v.copy()
        w[size // 2] = bad
        bits = np.asarray(topk.abs_bits(jnp.asarray(w)))
        classes = np.asarray(topk.bracket_class(jnp.asarray(bits), jnp.int32(lo), jnp.int32(hi)))
        assert classes[size // 2] == 5 and (classes == 5).sum() == 1
        counts, index, nonfinite = topk.class_counts(classes, lo, hi)
        assert nonfinite
        np.testing.assert_array_equal(
            counts, [(bits < lo).sum(), (bits <= lo).sum(), (bits <= hi).sum()])
        np.testing.assert_array_equal(index, np.flatnonzero((bits > lo) & (bits < hi)))
        assert not _class_counts(bits, lo, int(np.iinfo(np.int32).max))[2]  # open end: unknown


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_streamed_thresholds_bracket_equals_histograms(dtype):
    # The bracketed path (no prep, no reduce) gives the histogram path's bits (forced with an
    # identity `reduce`), on blocks of several sizes, ranks at both ends, and when the sample
    # misleads (every SAMPLE_STRIDE-th entry of each block zero: the histogram fallback).
    from mergejax.methods import task_vectors as tv

    rng = np.random.default_rng(9)
    shapes = [(700, 9), (1,), (3000,)]
    base = [jnp.asarray(rng.standard_normal(s) * 0.02, dtype) for s in shapes]
    ms = [[jnp.asarray(b.astype(jnp.float32) + rng.standard_normal(s) * 1e-3, dtype)
           for b, s in zip(base, shapes)] for _ in range(2)]
    fooled = [[m.ravel().at[::topk.SAMPLE_STRIDE].set(b.ravel()[::topk.SAMPLE_STRIDE])
               .reshape(m.shape) for b, m in zip(base, mt)] for mt in ms]
    n = sum(int(np.prod(s)) for s in shapes)
    for members in (ms, fooled):
        def blocks(members=members):
            return ((b, [m[i] for m in members]) for i, b in enumerate(base))

        a = np.concatenate([np.abs(np.asarray(m, np.float32) - np.asarray(b, np.float32)).ravel()
                            for b, m in zip(base, members[0])])
        for ranks in ([1, n], [n - int(n * 0.2), 0], [n // 2, 3]):
            got = tv.streamed_thresholds(blocks, ranks)
            want = tv.streamed_thresholds(blocks, ranks, reduce=lambda h: h)
            np.testing.assert_array_equal(got, want)
            if ranks[0]:
                assert _as_float(got[0]) == np.sort(a)[ranks[0] - 1]


def test_bracket_reads_inside_entries_as_xla_does_subnormals_included():
    # The entries inside a bracket get their bits from XLA on the gathered entries
    # (`_bits_at`), so they equal the full-array bits even where XLA:CPU and numpy differ
    # (subnormal inputs read as zero, subnormal differences flushed): thresholds in that range
    # equal the histogram path's.
    from mergejax.methods import task_vectors as tv

    rng = np.random.default_rng(12)
    tiny = np.array([1e-39, 3e-39, -2e-39, 0.0, 1.2e-38, -1.3e-38, 2e-38, 5e-38], np.float32)
    base = jnp.asarray(rng.choice(tiny, (50, 80)), jnp.bfloat16)
    member = jnp.asarray(rng.choice(tiny, (50, 80)), jnp.bfloat16)
    full = np.asarray(tv._abs_bits_of(base, (member,), None, 0, prep=None, t=0)).ravel()
    index = np.flatnonzero(rng.uniform(size=full.size) < 0.3)
    np.testing.assert_array_equal(tv._bits_at(base, member, index), full[index])
    f32 = lambda a: np.asarray(a, np.float32).ravel()  # noqa: E731
    assert not np.array_equal(np.abs(f32(member) - f32(base)).view(np.int32), full)  # numpy differs

    def blocks():
        return iter([(base, [member])])

    for rank in (1, 1000, 2000, 3999, 4000):
        got = tv.streamed_thresholds(blocks, [rank])
        assert got == tv.streamed_thresholds(blocks, [rank], reduce=lambda h: h)
        assert got[0] == np.sort(full)[rank - 1]
