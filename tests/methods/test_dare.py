"""DARE: drop-and-rescale properties, determinism, merges."""

import jax
import numpy as np
import pytest
from helpers import random_trees

from mergejax import methods
from mergejax.methods.dare import dare, dare_drop
from mergejax.methods.task_arithmetic import task_arithmetic
from mergejax.methods.ties import ties

KEY = jax.random.key(0)


def _trees(n_models=3, seed=0):
    return random_trees({"w": (30, 20), "b": (25,)}, n_models, seed)


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_p_zero_is_identity():
    base, fts = _trees()
    taus = [jax.tree.map(lambda f, b: f - b, f, base) for f in fts]
    for rescale in ("inverse", "l1", "none"):
        _equal(dare_drop(taus, p=0.0, key=KEY, rescale=rescale), taus)
    _equal(dare(base, fts, key=KEY, p=0.0, lam=0.3), task_arithmetic(base, fts, lam=0.3))
    _equal(dare(base, fts, key=KEY, p=0.0, lam=1.0, merge="ties", density=0.5),
           ties(base, fts, lam=1.0, density=0.5))


def test_p_one_gives_zeros_without_nan():
    base, fts = _trees()
    taus = [jax.tree.map(lambda f, b: f - b, f, base) for f in fts]
    for rescale in ("inverse", "l1", "none"):
        for tree in dare_drop(taus, p=1.0, key=KEY, rescale=rescale):
            for x in jax.tree.leaves(tree):
                assert np.all(np.asarray(x) == 0)
    _equal(dare(base, fts, key=KEY, p=1.0), base)


def test_same_key_same_mask_other_key_other_mask():
    base, fts = _trees()
    a = dare(base, fts, key=jax.random.key(3), p=0.5)
    _equal(a, dare(base, fts, key=jax.random.key(3), p=0.5))
    b = dare(base, fts, key=jax.random.key(4), p=0.5)
    assert not np.array_equal(np.asarray(a["w"]), np.asarray(b["w"]))
    # Legacy uint32 keys work too.
    _equal(dare(base, fts, key=jax.random.PRNGKey(3), p=0.5),
           dare(base, fts, key=jax.random.PRNGKey(3), p=0.5))


def test_identical_leaves_get_different_masks():
    x = np.ones(2000, np.float32)
    (out,) = dare_drop([{"a": x, "b": x}], p=0.5, key=KEY)
    assert not np.array_equal(np.asarray(out["a"]), np.asarray(out["b"]))


def test_expectation_and_drop_rate():
    # Each entry is kept with probability 1 - p and rescaled by 1/(1 - p): E[DARE(tau)] = tau.
    vals = np.array([0.5, -2.0, 3.0, 0.0, 1e-3], np.float32)
    tau = np.tile(vals, 40_000)
    for p in (0.3, 0.9):
        (out,) = dare_drop([{"t": tau}], p=p, key=jax.random.key(7))
        out = np.asarray(out["t"]).reshape(-1, len(vals))
        kept = (out[:, :3] != 0).mean()
        assert abs(kept - (1 - p)) < 0.01
        se = np.abs(vals) * np.sqrt(p / (1 - p) / out.shape[0])
        assert np.all(np.abs(out.mean(0) - vals) <= 5 * se + 1e-9), (p, out.mean(0))
        np.testing.assert_allclose(np.unique(out[:, 0]), [0, vals[0] / np.float32(1 - p)],
                                   rtol=1e-6)


def test_l1_rescale_preserves_l1_norm_per_tensor():
    base, fts = _trees()
    taus = [jax.tree.map(lambda f, b: f - b, f, base) for f in fts]
    for t, tree in enumerate(dare_drop(taus, p=0.7, key=KEY, rescale="l1")):
        for name in ("w", "b"):
            np.testing.assert_allclose(np.abs(np.asarray(tree[name])).sum(),
                                       np.abs(taus[t][name]).sum(), rtol=1e-5)
    inv = dare_drop(taus, p=0.7, key=KEY, rescale="inverse")[0]["w"]
    l1 = dare_drop(taus, p=0.7, key=KEY, rescale="l1")[0]["w"]
    np.testing.assert_array_equal(np.asarray(inv) != 0, np.asarray(l1) != 0)  # same mask


def test_order_invariance_with_content_or_explicit_keys():
    base, fts = _trees()
    perm = [2, 0, 1]
    a = dare(base, fts, key=KEY, p=0.5, key_from="content")
    b = dare(base, [fts[i] for i in perm], key=KEY, p=0.5, key_from="content")
    _close(a, b)
    keys = [jax.random.key(10 + i) for i in range(3)]
    a = dare(base, fts, key=keys, p=0.5, merge="ties")
    b = dare(base, [fts[i] for i in perm], key=[keys[i] for i in perm], p=0.5, merge="ties")
    _close(a, b)
    # With index-derived keys the masks follow the position, so the result changes.
    a = dare(base, fts, key=KEY, p=0.5)
    b = dare(base, [fts[i] for i in perm], key=KEY, p=0.5)
    assert not np.allclose(np.asarray(a["w"]), np.asarray(b["w"]))


def test_dare_ties_is_ties_on_dropped_vectors():
    base, fts = _trees()
    taus = [jax.tree.map(lambda f, b: f - b, f, base) for f in fts]
    dropped = dare_drop(taus, p=0.4, key=KEY)
    from mergejax.methods.ties import ties_merge_task_vectors

    merged = ties_merge_task_vectors(dropped, density=0.5, disjoint="sum")
    out = dare(base, fts, key=KEY, p=0.4, merge="ties", density=0.5, disjoint="sum", lam=0.8)
    _close(out, jax.tree.map(lambda b, m: b + np.float32(0.8) * np.asarray(m), base, merged),
           atol=1e-5)


def test_bad_inputs():
    base, fts = _trees(2)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"drop rate\) must be in \[0, 1\]"):
            dare(base, fts, key=KEY, p=p)
    with pytest.raises(ValueError, match="explicit PRNG key"):
        dare(base, fts, key=None)
    with pytest.raises(ValueError, match="rescale"):
        dare(base, fts, key=KEY, rescale="l2")
    with pytest.raises(ValueError, match="merge"):
        dare(base, fts, key=KEY, merge="slerp")
    with pytest.raises(ValueError, match="2 keys for 2|got 1 keys"):
        dare(base, fts, key=[KEY])
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        dare(base, fts, key=KEY, merge="ties", density=0.0)


def test_registered():
    m = methods.get("dare")
    assert m.hparams["p"] == 0.5 and m.hparams["rescale"] == "inverse"
    assert set(m.search) == {"p", "lam"}
