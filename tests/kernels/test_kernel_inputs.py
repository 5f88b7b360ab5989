"""Kernels never hang and never guess: every public kernel checks its inputs on entry and raises
a ValueError naming itself and the argument (values when concrete; under `jit` the static
arguments are still checked, and `zip_match` poisons its result instead of looping)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import kernels as K
from mergejax.kernels import topk


def _corr(n=8, value=None, at=(2, 5), dtype=np.float32):
    c = (np.eye(n) * 0.5).astype(dtype)
    if value is not None:
        c[at] = value
    return c


NAN, INF = float("nan"), float("inf")

BAD = [
    # zip_match
    ("zip-nan", lambda: K.zip_match(_corr(8, NAN)), ["zip_match", "corr", "1 non-finite",
                                                    "[2, 5]"]),
    ("zip-inf", lambda: K.zip_match(_corr(8, INF)), ["zip_match", "corr", "[2, 5]"]),
    ("zip-all-nan", lambda: K.zip_match(np.full((6, 6), NAN, np.float32)),
     ["zip_match", "corr", "36 non-finite"]),
    ("zip-jax-nan", lambda: K.zip_match(jnp.asarray(_corr(8, NAN))), ["zip_match", "corr"]),
    ("zip-alpha-nan", lambda: K.zip_match(_corr(), alpha=NAN), ["zip_match", "alpha", "finite"]),
    ("zip-alpha-inf", lambda: K.zip_match(_corr(), alpha=-INF), ["zip_match", "alpha"]),
    ("zip-alpha-str", lambda: K.zip_match(_corr(), alpha="0.5"), ["zip_match", "alpha"]),
    ("zip-beta-neg", lambda: K.zip_match(_corr(), beta=-1e9), ["zip_match", "beta", ">= 0"]),
    ("zip-beta-nan", lambda: K.zip_match(_corr(), beta=NAN), ["zip_match", "beta"]),
    ("zip-num-models-0", lambda: K.zip_match(_corr(), num_models=0), ["zip_match",
                                                                      "num_models"]),
    ("zip-num-models-float", lambda: K.zip_match(_corr(), num_models=2.0), ["num_models"]),
    ("zip-non-square", lambda: K.zip_match(np.ones((4, 6), np.float32)), ["corr", "square"]),
    ("zip-3d", lambda: K.zip_match(np.ones((2, 2, 2), np.float32)), ["corr", "square"]),
    ("zip-empty", lambda: K.zip_match(np.zeros((0, 0), np.float32)), ["corr", "n >= 1"]),
    ("zip-int", lambda: K.zip_match(np.eye(8, dtype=np.int32)), ["corr", "floating", "int32"]),
    ("zip-bool", lambda: K.zip_match(np.eye(8, dtype=bool)), ["corr", "floating", "bool"]),
    ("zip-complex", lambda: K.zip_match(_corr(dtype=np.complex64)), ["corr", "complex64"]),
    ("zip-reduction", lambda: K.zip_match(_corr(), reduction=NAN), ["reduction"]),
    # permute / group matchers / assignment
    ("permute-nan", lambda: K.permute_match(_corr(8, NAN, at=(6, 1))), ["permute_match", "corr",
                                                                        "[6, 1]"]),
    ("permute-complex", lambda: K.permute_match(_corr(dtype=np.complex64)), ["permute_match",
                                                                             "corr"]),
    ("permute-num-models-0", lambda: K.permute_match(_corr(), num_models=0), ["num_models"]),
    ("group-zip-nan", lambda: K.group_zip_match(_corr(8, NAN), groups=2), ["group_zip_match",
                                                                          "corr"]),
    ("group-zip-beta", lambda: K.group_zip_match(_corr(), groups=2, beta=-1.0), ["beta"]),
    ("group-zip-int", lambda: K.group_zip_match(np.eye(8, dtype=np.int64), groups=2),
     ["group_zip_match", "corr", "int64"]),
    ("group-permute-inf", lambda: K.group_permute_match(_corr(8, -INF), groups=2),
     ["group_permute_match", "corr"]),
    ("group-zero-groups", lambda: K.group_permute_match(_corr(), groups=0), ["groups"]),
    ("assignment-nan", lambda: K.solve_assignment(_corr(4, NAN, at=(1, 2))),
     ["solve_assignment", "score", "[1, 2]"]),
    ("combine-fix-rate", lambda: K.combine_similarity(_corr(), _corr(), NAN), ["fix_rate"]),
    # helpers
    ("unmerge-nan", lambda: K.merge_from_unmerge(np.full((4, 2), NAN, np.float32)),
     ["merge_from_unmerge", "unmerge"]),
    ("unmerge-1d", lambda: K.merge_from_unmerge(np.ones(4, np.float32)), ["unmerge", "2-D"]),
    ("topk-nan", lambda: topk.keep_topk(np.array([1.0, NAN], np.float32), 0.5),
     ["keep_topk", "x"]),
    ("topk-int", lambda: topk.keep_topk(np.arange(4), 0.5), ["keep_topk", "x", "floating"]),
    ("topk-density-nan", lambda: topk.keep_topk(np.ones(4, np.float32), NAN), ["density"]),
    ("topk-density-neg", lambda: topk.topk_kth(10, -0.5), ["topk_kth", "density"]),
    ("kth-bits-float", lambda: topk.kth_smallest_bits(jnp.ones(4), 1), ["kth_smallest_bits",
                                                                        "bits"]),
    ("corr-from-cov-inf", lambda: K.covariance_to_correlation(np.full((3, 3), INF, np.float32)),
     ["covariance_to_correlation", "cov"]),
    ("corr-from-cov-shape", lambda: K.covariance_to_correlation(np.ones((3, 2), np.float32)),
     ["cov", "square"]),
    # statistics accumulator
    ("stats-dim-0", lambda: K.FeatureStats.init(0), ["FeatureStats.init", "dim"]),
    ("stats-int-features", lambda: K.FeatureStats.init(4).update(np.ones((2, 4), np.int32)),
     ["FeatureStats.update", "features", "int32"]),
]


@pytest.mark.parametrize("call,culprits", [pytest.param(c, w, id=i) for i, c, w in BAD])
def test_bad_input_names_the_argument(call, culprits):
    with pytest.raises(ValueError) as info:
        call()
    for c in culprits:
        assert c in str(info.value), (c, str(info.value))


def test_weight_matching_checks_leaves_and_arguments():
    from types import SimpleNamespace as NS

    spec = NS(spaces=[NS(name="h", width=3)],
              leaves={"w1": [NS(axis=1, space="h")], "w2": [NS(axis=0, space="h")]})
    a = {"w1": np.ones((2, 3), np.float32), "w2": np.ones((3, 2), np.float32)}
    b = {**a, "w2": np.full((3, 2), NAN, np.float32)}
    with pytest.raises(ValueError, match=r"weight_matching: params_b\['w2'\] has 6 non-finite"):
        K.weight_matching(spec, a, b)
    with pytest.raises(ValueError, match="max_iter"):
        K.weight_matching(spec, a, a, max_iter=-1)
    with pytest.raises(ValueError, match=r"init_perm\['h'\] is not a permutation"):
        K.weight_matching(spec, a, a, init_perm={"h": [0, 0, 1]})


def test_neg_inf_is_a_similarity_not_an_error():
    """-inf marks pairs that may never merge (the reference's own blocking): accepted."""
    corr = np.full((4, 4), -np.inf, np.float32)
    np.fill_diagonal(corr, 1.0)
    _, unmerge = K.zip_match(corr, num_models=2)
    assert np.isfinite(np.asarray(unmerge)).all()


def test_huge_beta_does_not_overflow():
    corr = np.random.default_rng(0).uniform(-1, 1, (8, 8)).astype(np.float32)
    big = K.zip_match(corr, beta=1e12)
    ref = K.zip_match(corr, beta=10.0)  # a budget already never exhausted
    for x, y in zip(big, ref):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_under_jit_static_checks_stay_readable_and_values_poison_the_result():
    corr = jnp.asarray(_corr(8))
    with pytest.raises(ValueError, match="zip_match: beta must be >= 0"):
        jax.jit(lambda c: K.zip_match(c, beta=-1.0))(corr)
    with pytest.raises(ValueError, match="zip_match: num_models"):
        jax.jit(lambda c: K.zip_match(c, num_models=0))(corr)
    # traced values cannot raise: the matching is skipped and the result is all NaN
    for c, alpha in ((_corr(8, NAN), 0.5), (_corr(8, INF), 0.5), (_corr(8), NAN)):
        m, u = jax.jit(lambda c, a: K.zip_match(c, alpha=a))(jnp.asarray(c), jnp.float32(alpha))
        assert np.isnan(np.asarray(u)).all() and np.isnan(np.asarray(m)).all()
    # and finite traced input gives the same result as the eager call
    rng = np.random.default_rng(1)
    ok = rng.uniform(-1, 1, (8, 8)).astype(np.float32)
    got = jax.jit(lambda c: K.zip_match(c))(jnp.asarray(ok))
    want = K.zip_match(ok)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("corr_expr", [
    "np.eye(8, dtype=np.float32) + np.where(np.arange(64).reshape(8, 8) == 13, np.nan, 0)",
    "np.full((8, 8), np.nan, np.float32)",
])
def test_nan_zip_match_finishes(corr_expr):
    """The old kernel looped forever on a NaN (ignoring SIGINT): run it in a subprocess with a
    timeout, eagerly and under jit, so a regression fails here instead of hanging the suite."""
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from mergejax.kernels import zip_match
        corr = ({corr_expr}).astype(np.float32)
        try:
            zip_match(corr)
            print("NO ERROR")
        except ValueError as e:
            print("RAISED", e)
        m, u = jax.jit(lambda c: zip_match(c))(corr)
        print("JIT-NAN", bool(np.isnan(np.asarray(u)).all()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert "RAISED zip_match: corr has" in r.stdout and "JIT-NAN True" in r.stdout, r.stdout
