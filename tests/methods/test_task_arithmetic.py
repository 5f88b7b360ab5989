"""Task arithmetic, and the input validation every weight-space method shares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import methods
from mergejax.methods import task_vectors as tv
from mergejax.methods.task_arithmetic import task_arithmetic


def _trees(n_models=3, seed=0):
    rng = np.random.default_rng(seed)
    base = {"dense": {"kernel": rng.standard_normal((5, 4)).astype(np.float32),
                      "bias": rng.standard_normal(4).astype(np.float32)},
            "blocks": [{"scale": rng.standard_normal(3).astype(np.float32)}]}
    fts = [jax.tree.map(lambda x: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                        base) for _ in range(n_models)]
    return base, fts


def _close(a, b, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_matches_numpy_formula_exactly():
    base, fts = _trees()
    out = task_arithmetic(base, fts, lam=0.3)
    expect = jax.tree.map(lambda b, *f: b + np.float32(0.3) * (((f[0] - b) + (f[1] - b))
                                                               + (f[2] - b)), base, *fts)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(expect)):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_lam_zero_is_base_and_one_model_lam_one_is_that_model():
    base, fts = _trees()
    for x, y in zip(jax.tree.leaves(task_arithmetic(base, fts, lam=0.0)), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), y)
    _close(task_arithmetic(base, fts[:1], lam=1.0), fts[0])


def test_linear_in_lambda_and_weights():
    base, fts = _trees()
    d = lambda out: jax.tree.map(lambda o, b: np.asarray(o) - b, out, base)  # noqa: E731
    one = d(task_arithmetic(base, fts, lam=1.0))
    _close(d(task_arithmetic(base, fts, lam=0.5)), jax.tree.map(lambda x: 0.5 * x, one))
    _close(d(task_arithmetic(base, fts, lam=1.0, weights=[2.0, 0.0, 0.0])),
           jax.tree.map(lambda f, b: 2 * (f - b), fts[0], base))
    with pytest.raises(ValueError, match="one value per model"):
        task_arithmetic(base, fts, weights=[1.0, 2.0])


def test_order_invariance():
    base, fts = _trees()
    _close(task_arithmetic(base, fts, lam=0.4), task_arithmetic(base, fts[::-1], lam=0.4))


def test_dtype_is_preserved_and_jax_inputs_work():
    base, fts = _trees()
    b16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base)
    f16 = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), f) for f in fts]
    out = task_arithmetic(b16, f16, lam=0.3)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_task_vectors_helper():
    base, fts = _trees(2)
    taus = tv.task_vectors(base, fts)
    assert len(taus) == 2
    _close(taus[1], jax.tree.map(lambda f, b: f - b, fts[1], base), atol=0)


def test_bad_inputs_name_the_leaf():
    base, fts = _trees(2)
    missing = jax.tree.map(lambda x: x, fts[1])
    del missing["dense"]["bias"]
    with pytest.raises(ValueError, match="dense/bias"):
        task_arithmetic(base, [fts[0], missing])
    renamed = {"dense": {"kernel": fts[1]["dense"]["kernel"], "b": fts[1]["dense"]["bias"]},
               "blocks": fts[1]["blocks"]}
    with pytest.raises(ValueError, match="model 1 differs from the base at leaf 'dense/bias'"):
        task_arithmetic(base, [fts[0], renamed])
    shaped = jax.tree.map(lambda x: x, fts[0])
    shaped["blocks"][0]["scale"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"'blocks/0/scale' has shape \(4,\)"):
        task_arithmetic(base, [shaped])
    for bad in (np.nan, np.inf):
        broken = jax.tree.map(lambda x: x.copy(), fts[0])
        broken["dense"]["kernel"][2, 1] = bad
        with pytest.raises(ValueError, match="'dense/kernel' of model 0 has non-finite"):
            task_arithmetic(base, [broken])
    bad_base = jax.tree.map(lambda x: x.copy(), base)
    bad_base["dense"]["bias"][0] = np.nan
    with pytest.raises(ValueError, match="'dense/bias' of the base"):
        task_arithmetic(bad_base, fts)
    ints = jax.tree.map(lambda x: x.astype(np.int32), fts[0])
    with pytest.raises(ValueError, match="non-floating"):
        task_arithmetic(base, [ints])
    with pytest.raises(ValueError, match="list or tuple"):
        task_arithmetic(base, fts[0])
    with pytest.raises(ValueError, match="at least one"):
        task_arithmetic(base, [])
    with pytest.raises(ValueError, match="lam"):
        task_arithmetic(base, fts, lam=float("nan"))


def test_registered():
    m = methods.get("task_arithmetic")
    assert m.hparams == {"lam": 0.3, "weights": None}
    assert m.search["lam"] == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert m.fn("weight_space") is task_arithmetic


MINE = ("task_arithmetic", "ties", "dare", "slerp", "breadcrumbs", "tall_masks", "consensus")


@pytest.mark.parametrize("name", MINE)
def test_registered_defaults_run_through_the_registry_without_touching_inputs(name):
    base, fts = _trees(2)
    before = jax.tree.map(np.copy, (base, fts))
    method = methods.get(name)
    out = method.fn("weight_space")(base, fts, key=jax.random.key(0), **method.hparams)
    outs = out if isinstance(out, list) else [out]
    assert len(outs) == (2 if name == "tall_masks" else 1)
    for o in outs:
        assert jax.tree.structure(o) == jax.tree.structure(base)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(o))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves((base, fts))):
        np.testing.assert_array_equal(x, y)
    for grid in method.search.values():
        assert len(grid) >= 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_entry_anywhere(dtype, bad):
    """The max-|x| check agrees with numpy's isfinite for NaN of either sign and +-inf, at the
    first, a middle and the last position, and passes empty and finite arrays (incl. the
    largest finite value)."""
    dt = jnp.dtype(dtype)
    x = np.linspace(-3, 3, 1001).astype(dt)
    x[7] = jnp.finfo(dt).max
    assert bool(tv.all_finite(x)) and bool(tv.all_finite(np.zeros((0, 4), dt)))
    for pos in (0, 500, 1000):
        y = x.copy()
        y[pos] = bad
        assert not np.isfinite(y.astype(np.float32)).all()
        assert not bool(tv.all_finite(y)), (pos, y[pos])


def test_inputs_checked_by_caller_skips_only_the_input_check_and_only_inside():
    """Inside the block a NaN input reaches the (NaN) result instead of raising; outside, and
    after an exception inside, the check is back."""
    base = {"w": np.zeros(4, np.float32)}
    bad = {"w": np.array([0.0, np.nan, 1.0, 2.0], np.float32)}
    with tv.inputs_checked_by_caller():
        out = task_arithmetic(base, [bad], lam=1.0)
    assert np.isnan(np.asarray(out["w"])[1]) and not bool(tv.all_finite(out["w"]))
    with pytest.raises(RuntimeError), tv.inputs_checked_by_caller():
        raise RuntimeError("inside")
    with pytest.raises(ValueError, match="non-finite"):
        task_arithmetic(base, [bad], lam=1.0)
