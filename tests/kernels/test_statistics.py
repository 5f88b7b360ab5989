"""Streamed, sharded feature statistics (kernels/statistics.py, kernels/sharding.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax.kernels import sharding, statistics
from mergejax.kernels.statistics import FeatureStats, feature_statistics


def ref_stats(x):
    """float64 oracle over all rows of x (..., d): mean, np.cov(bias=True), ZipIt correlation."""
    rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    cov = np.cov(rows, rowvar=False, bias=True)
    sd = np.sqrt(np.diag(cov))
    return rows.mean(0), cov, cov / np.maximum(np.outer(sd, sd), 1e-7)


def data(shape, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    # Correlated features, so the off-diagonal blocks are not just noise.
    mix = rng.standard_normal((shape[-1], shape[-1])) / np.sqrt(shape[-1])
    x = rng.standard_normal(shape) @ (np.eye(shape[-1]) + mix) + offset
    return x.astype(np.float32)


def run(batches, mesh=None, **kw):
    return feature_statistics(batches, mesh, **kw)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices; see tests/conftest.py")
    return sharding.data_mesh()


def test_data_mesh_shape():
    assert sharding.data_mesh().shape == {"data": jax.device_count()}
    assert sharding.data_mesh(jax.devices()[:1]).shape == {"data": 1}


def test_cpu_collectives_only_for_several_local_cpu_devices(mesh):
    # the one predicate behind every wait of a sharded CPU program (combined, distributed.wait,
    # the FS-Merge fit loop): several devices of this process on XLA:CPU
    assert sharding.cpu_collectives(mesh)
    assert not sharding.cpu_collectives(sharding.data_mesh(jax.devices()[:1]))
    assert not sharding.cpu_collectives(None)


@pytest.mark.parametrize("one_call_bytes", [0, statistics._ONE_CALL_BYTES],
                         ids=["chunk-loop", "one-call"])
def test_large_offset_matches_float64(one_call_bytes, monkeypatch):
    # 1000 + N(0, 1): float32 E[xx^T] - mu mu^T cancels ~6 digits and is off by O(0.1).
    # 0 bytes forces the chunk loop; by default these updates (< 4 MiB) are one Gram call each.
    monkeypatch.setattr(statistics, "_ONE_CALL_BYTES", one_call_bytes)
    c = statistics._CHUNK  # rows per Gram call inside a chunked update
    # the update reads the setting when it traces: a row count of its own gives a fresh trace
    x = data((3 * c + 42 + (one_call_bytes == 0), 48), offset=1000.0)
    # First update: 2 full row chunks (the loop) + a tail; second: 1 chunk + a tail.
    mean, cov, corr = run(np.split(x, [2 * c + 37]), name="offset")
    m_ref, c_ref, r_ref = ref_stats(x)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-7, atol=0)
    assert np.abs(np.asarray(cov) - c_ref).max() < 1e-4 * np.abs(c_ref).max()
    np.testing.assert_allclose(corr, r_ref, atol=1e-5)
    # The naive formula in float32 really fails here (so the tolerance above is meaningful).
    mu = x.mean(0, dtype=np.float32)
    naive = (x.T @ x) / np.float32(len(x)) - np.outer(mu, mu)
    assert np.abs(naive - c_ref).max() > 1e-2


def test_streaming_equals_one_shot_and_pairwise():
    x = data((1000, 20), seed=1, offset=5.0)
    cuts = [0, 1, 8, 9, 200, 513, 600, 1000]  # uneven sizes, incl. a single-row batch
    parts = [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    one = run([x])
    for got in (run(parts), run(parts, pairwise=True)):
        np.testing.assert_allclose(got.mean, one.mean, rtol=1e-6)
        np.testing.assert_allclose(got.cov, one.cov, atol=1e-5)
        np.testing.assert_allclose(got.corr, one.corr, atol=1e-5)
    np.testing.assert_allclose(one.cov, ref_stats(x)[1], atol=1e-5)


def test_sharded_matches_single_device(mesh):
    # B = 13 and 21 are not divisible by 8: padded with masked rows inside the jit.
    x = data((34, 6, 24), seed=2, offset=3.0)
    parts = [x[:13], x[13:]]
    one = run(parts)
    eight = run(parts, mesh)
    for a, b in zip(eight, one):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(eight.cov, ref_stats(x)[1], atol=1e-5)


def test_conv_features_every_position_is_a_row(mesh):
    x = data((5, 4, 3, 16), seed=3)  # NHWC, B=5 < 8 devices
    for m in (None, mesh):
        mean, cov, corr = run([x[:2], x[2:]], m)
        m_ref, c_ref, r_ref = ref_stats(x)
        np.testing.assert_allclose(mean, m_ref, atol=1e-6)
        np.testing.assert_allclose(cov, c_ref, atol=1e-5)
        np.testing.assert_allclose(corr, r_ref, atol=1e-5)


def test_concatenated_models(mesh):
    a, b = data((11, 4, 4, 8), seed=4), data((11, 4, 4, 12), seed=5, offset=2.0)
    joint = np.concatenate([a, b], axis=-1)
    for m in (None, mesh):
        got = run([(a[:6], b[:6]), [a[6:], b[6:]]], m)
        np.testing.assert_allclose(got.cov, ref_stats(joint)[1], atol=1e-5)
        assert got.cov.shape == (20, 20)


def test_blocked_gram_path():
    # d >= 768 uses the upper block-triangle Gram; check the mirrored assembly against float64.
    x = data((64, 800), seed=6, offset=10.0)
    assert statistics._num_blocks(800) > 1
    _, cov, _ = run([x[:30], x[30:]])
    np.testing.assert_allclose(cov, ref_stats(x)[1], atol=2e-5)
    np.testing.assert_array_equal(cov, np.asarray(cov).T)


@pytest.mark.parametrize("widths, models_per_block", [
    ((5, 3, 800), [[0], [1], [2], [2], [2]]),  # the 800 cut in 3
    ((60, 64, 7), [[0, 1], [2]]),  # 60 and 64 joined (`_JOINED_WIDTHS`)
])
@pytest.mark.parametrize("one_call_bytes", [0, 4 << 20])
def test_models_as_gram_blocks(monkeypatch, widths, models_per_block, one_call_bytes):
    # Three models whose Gram blocks are models, parts of one or two joined; the upper products
    # mirrored into one matrix. 1500 examples of 3 rows go through the chunk loop (2 chunks and
    # a tail for 808 features), 400 in one call; every fifth example masked out.
    monkeypatch.setattr(statistics, "_ONE_CALL_BYTES", one_call_bytes)
    blocks = statistics._column_blocks(widths)
    assert [[m for m, _, _ in blk] for blk in blocks] == models_per_block
    joint = data((400 if one_call_bytes else 1500, 3, sum(widths)), seed=17, offset=5.0)
    xs = np.split(joint, np.cumsum(widths)[:-1], axis=-1)
    keep = np.arange(len(joint)) % 5 != 2
    got = FeatureStats.init(sum(widths)).update(xs, mask=keep).finalize(widths=list(widths))
    mean, cov, corr = ref_stats(joint[keep])
    np.testing.assert_allclose(got.mean, mean, atol=1e-5)
    np.testing.assert_allclose(got.cov, cov, atol=2e-5)
    np.testing.assert_allclose(got.corr, corr, atol=2e-5)
    np.testing.assert_array_equal(got.cov, np.asarray(got.cov).T)


@pytest.mark.parametrize("one_call_bytes", [0, 4 << 20])
def test_parts_fold_as_one_row_set(monkeypatch, one_call_bytes):
    # Three row parts of one batch of 50 examples (7, 3 and 5 rows per example), two models:
    # `fold_parts` gives the statistics of the parts' rows concatenated, masked examples dropped
    # from every part. 4 MiB: all parts in one chunk; 0: each part its own chunk loop.
    monkeypatch.setattr(statistics, "_ONE_CALL_BYTES", one_call_bytes)
    widths = (6, 9)
    parts = [data((50, r, sum(widths)), seed=20 + r, offset=3.0 * r)
             for r in (7, 3, 5)]
    keep = np.arange(len(parts[0])) % 4 != 1
    split = [np.split(p, [widths[0]], axis=-1) for p in parts]
    got = jax.jit(lambda s, ps, m: s.fold_parts(ps, m))(FeatureStats.init(15), split, keep)
    rows = np.concatenate([p[keep].reshape(-1, 15) for p in parts])
    mean, cov, corr = ref_stats(rows)
    m = got.finalize()
    assert int(got.count) == len(rows)
    np.testing.assert_allclose(m.mean, mean, atol=1e-5)
    np.testing.assert_allclose(m.cov, cov, atol=2e-5)
    np.testing.assert_allclose(m.corr, corr, atol=2e-5)
    with pytest.raises(ValueError, match="same models, widths"):
        FeatureStats.init(15).fold_parts([split[0], [parts[1][..., :5], parts[1][..., 5:]]])


def test_constant_features_have_zero_correlation(mesh):
    x = data((40, 6), seed=7, offset=1000.0)
    x[:, 1] = 0.0  # dead ReLU unit
    x[:, 4] = 0.1  # constant, not exactly representable: roundoff must not leak into corr
    for m in (None, mesh):
        mean, cov, corr = (np.asarray(a) for a in run([x[:17], x[17:]], m))
        assert np.isfinite(corr).all() and np.isfinite(cov).all()
        for j in (1, 4):
            assert not cov[j].any() and not cov[:, j].any()
            assert not corr[j].any() and not corr[:, j].any()
        live = [0, 2, 3, 5]
        np.testing.assert_allclose(np.diag(corr)[live], 1.0, atol=1e-6)
        np.testing.assert_allclose(corr[np.ix_(live, live)], ref_stats(x)[2][np.ix_(live, live)],
                                   atol=1e-5)
        assert np.abs(corr).max() <= 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises_with_tap_name(mesh, bad):
    a, b = data((9, 3, 4), seed=8), data((9, 3, 5), seed=9)
    b[4, 1, 2] = bad
    for m in (None, mesh):
        with pytest.raises(ValueError, match=r"'layer3\.conv1'.*1 of 9.*model 1, ch 2"):
            run([(a, b)], m, name="layer3.conv1")


def test_no_recompile_for_same_shapes():
    x = data((32, 10), seed=10)
    run([x[:16], x[16:]])  # warm the cache
    size = statistics._update._cache_size()
    run([x[16:], x[:16], x[8:24]])
    assert statistics._update._cache_size() == size


def test_explicit_mask_and_pad_batch(mesh):
    x = data((13, 7), seed=11)
    padded, mask = sharding.pad_batch(x, 8)
    assert padded.shape == (16, 7) and mask.sum() == 13
    with pytest.raises(ValueError, match="pad_batch"):
        sharding.shard_batch(x, mesh)
    xs, ms = sharding.shard_batch((padded, mask), mesh)
    assert xs.sharding == NamedSharding(mesh, P("data"))
    got = FeatureStats.init(7, mesh).update(xs, mesh, mask=ms).finalize()
    np.testing.assert_allclose(got.cov, ref_stats(x)[1], atol=1e-5)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_fresh_states_never_share_buffers(mesh, on_mesh):
    # `init` is one cached program per (dim, mesh); `update` donates its state. A second empty
    # state made before the first is updated must stay empty (no buffer shared between calls).
    m = mesh if on_mesh else None
    first, second = FeatureStats.init(6, m), FeatureStats.init(6, m)
    x = data((16, 6), seed=13)
    got = first.update(x, m).finalize()
    np.testing.assert_allclose(got.cov, ref_stats(x)[1], atol=1e-5)
    assert second.partial == on_mesh
    if on_mesh:
        assert second.m2.sharding == NamedSharding(mesh, P("data"))
        assert second.count.shape == (sharding.data_size(mesh),)
    host = jax.tree.map(np.asarray, second)
    assert not host.count.any() and not host.m2.any() and not host.shift.any()
    assert np.isposinf(host.fmin).all() and np.isneginf(host.fmax).all() and host.finite.all()
    with pytest.raises(ValueError, match="no rows"):
        second.finalize(name="still empty")


def test_explicit_axis_mesh(mesh):
    explicit = jax.make_mesh((8,), ("data",))  # JAX 0.10 default: AxisType.Explicit
    x = data((12, 5), seed=12)
    got = run([x], explicit)
    np.testing.assert_allclose(got.cov, ref_stats(x)[1], atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="no rows"):
        FeatureStats.init(3).finalize(name="empty")
    with pytest.raises(ValueError, match="channels"):
        FeatureStats.init(3).update(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="leading shapes"):
        FeatureStats.init(5).update([np.zeros((2, 2)), np.zeros((3, 3))])


def test_many_tiny_batches_far_from_zero_stay_accurate():
    # Each merge adds delta delta^T n_a n_b / n with delta ~ std; if delta were the difference
    # of two float32 means of ~1e4 it would carry an error of eps * 1e4 ~ 1e-3 of the std
    # (the per-device partial states of a mesh are exactly such tiny states).
    x = data((256, 5), seed=13, offset=1e4)
    got = run([x[i:i + 2] for i in range(0, len(x), 2)])
    _, cov, corr = ref_stats(x)
    np.testing.assert_allclose(got.cov, cov, atol=2e-5 * np.abs(cov).max())
    np.testing.assert_allclose(got.corr, corr, atol=2e-5)
