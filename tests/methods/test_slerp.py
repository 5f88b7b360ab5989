"""SLERP between two models: endpoints, lerp fallback, symmetry, norms, the base option."""

import jax
import numpy as np
import pytest

from mergejax import methods
from mergejax.methods.slerp import slerp


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    a = {"w": rng.standard_normal((8, 6)).astype(np.float32),
         "b": rng.standard_normal(5).astype(np.float32)}
    b = {"w": rng.standard_normal((8, 6)).astype(np.float32),
         "b": rng.standard_normal(5).astype(np.float32)}
    return a, b


def np_slerp(t, v0, v1, thr=0.9995, eps=1e-8):
    """mergekit's slerp formula in float64."""
    v0, v1 = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    dot = np.sum((v0 / n0 if n0 > eps else v0) * (v1 / n1 if n1 > eps else v1))
    if abs(dot) > thr:
        return (1 - t) * v0 + t * v1
    om = np.arccos(dot)
    return np.sin((1 - t) * om) / np.sin(om) * v0 + np.sin(t * om) / np.sin(om) * v1


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_endpoints_are_exact():
    a, b = _pair()
    for x, y in zip(_leaves(slerp(None, [a, b], t=0.0)), _leaves(a)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(_leaves(slerp(None, [a, b], t=1.0)), _leaves(b)):
        np.testing.assert_array_equal(x, y)
    # ... also on the lerp branch (parallel tensors).
    c = jax.tree.map(lambda x: 3 * x, a)
    for x, y in zip(_leaves(slerp(None, [a, c], t=1.0)), _leaves(c)):
        np.testing.assert_array_equal(x, y)


def test_matches_mergekit_formula_per_tensor():
    a, b = _pair(1)
    for t in (0.2, 0.5, 0.9):
        out = slerp(None, [a, b], t=t)
        for k in a:
            np.testing.assert_allclose(out[k], np_slerp(t, a[k], b[k]), rtol=1e-5, atol=1e-6)


def test_parallel_and_antiparallel_inputs_use_lerp():
    a, _ = _pair(2)
    for factor in (2.0, -0.5):
        b = {k: (factor * v).astype(np.float32) for k, v in a.items()}
        out = slerp(None, [a, b], t=0.3)
        for k in a:
            np.testing.assert_allclose(out[k], 0.7 * a[k] + 0.3 * b[k], rtol=1e-6, atol=1e-7)


def test_symmetry():
    a, b = _pair(3)
    for t in (0.1, 0.35, 0.5):
        for x, y in zip(_leaves(slerp(None, [a, b], t=t)),
                        _leaves(slerp(None, [b, a], t=1 - t))):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_equal_norms_are_preserved():
    a, b = _pair(4)
    b = jax.tree.map(lambda x, y: (x * np.linalg.norm(y) / np.linalg.norm(x)).astype(np.float32),
                     b, a)
    for t in (0.25, 0.5, 0.8):
        out = slerp(None, [a, b], t=t)
        for k in a:
            np.testing.assert_allclose(np.linalg.norm(out[k]), np.linalg.norm(a[k]), rtol=1e-5)
            # A lerp would shrink the norm: SLERP really took the spherical path.
            assert np.linalg.norm(0.5 * a[k] + 0.5 * b[k]) < 0.95 * np.linalg.norm(a[k])


def test_zero_tensor_gives_no_nan():
    a, b = _pair(5)
    a["b"] = np.zeros(5, np.float32)
    out = slerp(None, [a, b], t=0.5)
    assert all(np.isfinite(x).all() for x in _leaves(out))


def test_base_is_ignored_unless_of_task_vectors():
    a, b = _pair(6)
    base1, base2 = _pair(7)
    ref = slerp(None, [a, b], t=0.4)
    for x, y in zip(_leaves(slerp(base1, [a, b], t=0.4)), _leaves(ref)):
        np.testing.assert_array_equal(x, y)
    out = slerp(base2, [a, b], t=0.4, of_task_vectors=True)
    for k in a:
        expect = base2[k] + np_slerp(0.4, a[k] - base2[k], b[k] - base2[k])
        np.testing.assert_allclose(out[k], expect, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out["w"], ref["w"])


def test_bad_inputs():
    a, b = _pair()
    for t in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
            slerp(None, [a, b], t=t)
    with pytest.raises(ValueError, match="exactly 2 models"):
        slerp(None, [a, b, a], t=0.5)
    with pytest.raises(ValueError, match="exactly 2 models"):
        slerp(None, [a], t=0.5)
    with pytest.raises(ValueError, match="'w'.*shape"):
        slerp(None, [a, {"w": b["w"][:4], "b": b["b"]}])
    with pytest.raises(ValueError, match="needs the base"):
        slerp(None, [a, b], of_task_vectors=True)
    with pytest.raises(ValueError, match="'b'"):
        slerp({"w": a["w"]}, [a, b])


def test_registered():
    m = methods.get("slerp")
    assert m.hparams["t"] == 0.5
    assert min(m.search["t"]) > 0 and max(m.search["t"]) < 1
