"""Exact linear assignment: every backend reaches scipy's optimal total; API, jit and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from mergejax.kernels import assignment
from mergejax.kernels.assignment import (
    BACKENDS,
    assignment_score,
    available_backends,
    lapx_available,
    register_assignment_backend,
    solve_assignment,
    solve_assignment_jax,
)

HOST_FAST = ["scipy", "lapx", "auto"]


def make(kind: str, n: int, seed: int = 0, m: int | None = None) -> np.ndarray:
    """Score matrices (n, m) of the kinds the matchers meet; float32 unless noted."""
    rng = np.random.default_rng(seed)
    m = n if m is None else m
    if kind == "rand":
        return rng.random((n, m), dtype=np.float32)
    if kind == "near_perm":  # a permuted noisy copy: the correlation-like, easy case
        eye = np.eye(n, m, dtype=np.float32)[:, rng.permutation(m)]
        return (eye + 0.1 * rng.standard_normal((n, m))).astype(np.float32)
    if kind == "ties":  # integers in {0, 1, 2}: a huge number of optimal assignments
        return rng.integers(0, 3, (n, m)).astype(np.float32)
    if kind == "tiny_gap":  # float64 entries that differ only in the 10th significant digit
        return 1000.0 + 1e-7 * rng.random((n, m))
    raise ValueError(kind)


def scipy_total(score: np.ndarray, maximize: bool = True) -> float:
    s64 = np.asarray(score, dtype=np.float64)
    _, col = linear_sum_assignment(s64, maximize=maximize)
    return assignment_score(s64, col)


def check_optimal(score, col, maximize: bool = True):
    n, m = score.shape
    col = np.asarray(col)
    assert col.shape == (n,)
    assert np.issubdtype(col.dtype, np.integer)
    assert len(np.unique(col)) == n and col.min() >= 0 and col.max() < m
    ref = scipy_total(score, maximize)
    got = assignment_score(np.asarray(score, np.float64), col)
    assert abs(got - ref) <= 1e-6 * max(1.0, abs(ref)), (got, ref)


@pytest.mark.parametrize("backend", HOST_FAST)
@pytest.mark.parametrize(
    "kind,n",
    [
        ("rand", 1),
        ("rand", 2),
        ("rand", 7),
        ("rand", 64),
        ("rand", 513),
        ("rand", 2048),
        ("near_perm", 64),
        ("near_perm", 1000),
        ("near_perm", 2048),
        ("ties", 16),
        ("ties", 300),
        ("ties", 2048),
        ("tiny_gap", 200),
        ("tiny_gap", 1024),
    ],
)
def test_fast_backends_match_scipy_total(backend, kind, n):
    score = make(kind, n, seed=n)
    check_optimal(score, solve_assignment(score, backend=backend))


@pytest.mark.parametrize(
    "kind,n", [("rand", 7), ("rand", 256), ("near_perm", 512), ("ties", 32), ("tiny_gap", 64)]
)
def test_optax_matches_scipy_total(kind, n):
    score = make(kind, n, seed=n)
    check_optimal(score, solve_assignment(score, backend="optax"))


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("n,m", [(3, 5), (40, 64)])
def test_rectangular(backend, n, m):
    for kind in ("rand", "ties"):
        score = make(kind, n, seed=m, m=m)
        check_optimal(score, solve_assignment(score, backend=backend))
        check_optimal(score, solve_assignment(score, False, backend=backend), maximize=False)


@pytest.mark.parametrize("backend", available_backends())
def test_maximize_vs_minimize(backend):
    score = make("rand", 48, seed=1)
    col_max = solve_assignment(score, maximize=True, backend=backend)
    col_min = solve_assignment(score, maximize=False, backend=backend)
    check_optimal(score, col_max, maximize=True)
    check_optimal(score, col_min, maximize=False)
    assert assignment_score(score, col_min) < assignment_score(score, col_max)
    # Minimising a score is maximising its negation.
    col_neg = solve_assignment(-score, maximize=True, backend=backend)
    assert np.isclose(assignment_score(score, col_neg), assignment_score(score, col_min))


@pytest.mark.parametrize("backend", available_backends())
def test_recovers_known_permutation(backend):
    rng = np.random.default_rng(7)
    n = 200
    perm = rng.permutation(n)
    # Model 0's feature r is model 1's feature perm[r], seen through noise.
    score = np.eye(n, dtype=np.float32)[perm] + 0.05 * rng.standard_normal((n, n))
    score = score.astype(np.float32)
    np.testing.assert_array_equal(solve_assignment(score, backend=backend), perm)
    jitted = jax.jit(lambda s: solve_assignment(s, backend=backend))
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(score))), perm)


@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.bool_, np.float16, np.float64, jnp.bfloat16]
)
def test_input_dtypes(dtype):
    score = np.random.default_rng(3).integers(0, 5, (20, 20)).astype(dtype)
    for backend in available_backends():
        col = solve_assignment(score, backend=backend)
        check_optimal(np.asarray(score, np.float64), col)


def test_jax_array_input_and_empty():
    score = make("rand", 30)
    np.testing.assert_array_equal(
        solve_assignment(jnp.asarray(score)), solve_assignment(score, backend="scipy")
    )
    for backend in available_backends():
        assert solve_assignment(np.zeros((0, 0)), backend=backend).shape == (0,)


def test_jit_and_vmap():
    scores = np.stack([make("rand", 24, seed=s) for s in range(3)])
    for backend in ("optax", "lapx"):
        f = jax.jit(jax.vmap(lambda s, b=backend: solve_assignment_jax(s, backend=b)))
        out = np.asarray(f(jnp.asarray(scores)))
        assert out.shape == (3, 24) and out.dtype == np.int32
        for s, col in zip(scores, out):
            check_optimal(s, col)


def test_jit_optax_nonfinite_returns_minus_one():
    score = jnp.asarray(make("rand", 6)).at[2, 3].set(jnp.nan)
    out = jax.jit(lambda s: solve_assignment(s, backend="optax"))(score)
    np.testing.assert_array_equal(np.asarray(out), -np.ones(6))


@pytest.mark.parametrize(
    "score,match",
    [
        (np.ones((4, 3)), r"shape \(4, 3\) has more rows than columns"),
        (np.ones(3), r"2-D \(n, m\) matrix, got shape \(3,\)"),
        (np.ones((2, 2, 2)), r"got shape \(2, 2, 2\)"),
        (
            np.array([[1.0, np.nan], [0.0, 1.0]]),
            r"shape \(2, 2\) contains NaN or inf \(1 non-finite",
        ),
        (np.array([[np.inf, 0.0], [0.0, -np.inf]]), r"NaN or inf \(2 non-finite"),
        (np.ones((2, 2), np.complex64), "real-valued"),
    ],
)
@pytest.mark.parametrize("backend", available_backends())
def test_errors(score, match, backend):
    with pytest.raises(ValueError, match=match):
        solve_assignment(score, backend=backend)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown .* 'hungarian'; valid: 'auto', .*'scipy'"):
        solve_assignment(np.eye(3), backend="hungarian")
    with pytest.raises(ValueError, match="valid: 'auto'"):
        jax.jit(lambda s: solve_assignment_jax(s, backend="nope"))(jnp.eye(3))
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        solve_assignment_jax(jnp.ones((3, 2)))


def test_registry():
    assert set(BACKENDS) >= {"scipy", "lapx", "optax"}
    assert available_backends()[0] == "auto"
    with pytest.raises(ValueError, match="already exists"):
        register_assignment_backend("scipy", BACKENDS["scipy"])
    calls = []

    def greedy_wrapped(cost):
        calls.append(cost.shape)
        return BACKENDS["scipy"](cost)

    register_assignment_backend("test_custom", greedy_wrapped)
    try:
        check_optimal(make("rand", 9), solve_assignment(make("rand", 9), backend="test_custom"))
        assert calls == [(9, 9)]
    finally:
        del assignment._BACKENDS["test_custom"]


def test_auto_uses_lapx_when_present_and_falls_back(monkeypatch):
    assert assignment._auto_backend(8) == "scipy"  # tiny: scipy, no import needed
    if lapx_available():
        assert assignment._auto_backend(1024) == "lapx"
    # Without lapx: auto and an explicit "lapx" both fall back to scipy, without error.
    monkeypatch.setattr(assignment, "_lapx_module", lambda: None)
    assert not lapx_available()
    assert assignment._auto_backend(1024) == "scipy"
    score = make("near_perm", 64)
    np.testing.assert_array_equal(
        solve_assignment(score, backend="lapx"), solve_assignment(score, backend="scipy")
    )


def test_group_assignment_is_the_best_head_preserving_assignment():
    """Brute force over every group pairing and every within-group assignment (g=3, og=2)."""
    import itertools

    from mergejax.kernels import solve_group_assignment

    rng = np.random.default_rng(3)
    g, og = 3, 2
    score = rng.normal(size=(g * og, g * og))
    best, best_col = -np.inf, None
    for groups in itertools.permutations(range(g)):
        for inner in itertools.product(itertools.permutations(range(og)), repeat=g):
            col = np.array([groups[j] * og + inner[j][a] for j in range(g) for a in range(og)])
            value = score[np.arange(g * og), col].sum()
            if value > best:
                best, best_col = value, col
    group_col, col = solve_group_assignment(score, g)
    np.testing.assert_array_equal(col, best_col)
    np.testing.assert_array_equal(group_col, best_col[::og] // og)
    with pytest.raises(ValueError, match="divisible"):
        solve_group_assignment(score, 4)
