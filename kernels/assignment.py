"""Exact linear assignment (LAP) with pluggable solver backends.

`solve_assignment(score)` returns, for an (n, m) score matrix with n <= m, the column assigned to
every row such that the total `score[arange(n), col_for_row].sum()` is optimal (maximal by
default). Every backend is *exact*; they differ only in speed, in where they run, and in which of
several equally optimal assignments they return when there are ties.

Backends (`available_backends()`; `register_assignment_backend` adds more):

- ``"scipy"``: `scipy.optimize.linear_sum_assignment` on the host. Always available; the reference.
- ``"lapx"``: `lap.lapjvr` from the optional `lapx` package (imported lazily): 3-4x faster than
  scipy on correlation-like and 5-10x on random costs for n = 256-4096
  (bench/bench_assignment.py). Falls back to scipy, silently, when `lapx` is not installed.
- ``"optax"``: `optax.assignment.hungarian_algorithm`, a pure-JAX Hungarian algorithm that runs on
  device and inside `jit`; 3-10x slower than the scipy backend on CPU (bench), plus a jit
  compile per shape.
- ``"auto"``: ``"lapx"`` when installed and n >= 16, else ``"scipy"`` (see `_auto_backend`).

Inside `jit` (traced input) `solve_assignment` defers to `solve_assignment_jax`, which runs optax
in-graph or calls a host backend through `jax.pure_callback`.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BACKENDS",
    "assignment_score",
    "available_backends",
    "lapx_available",
    "register_assignment_backend",
    "solve_assignment",
    "solve_assignment_jax",
]

# A host backend takes a finite, C-contiguous float32/float64 cost matrix (n, m), n <= m, and
# returns the column of each row (n,) *minimising* the total cost. Callers negate for maximise.
HostBackend = Callable[[np.ndarray], np.ndarray]

# Below this n every solver takes microseconds and scipy (always imported) is as fast as lapx.
_AUTO_MIN_N = 16


# ------------------------------------------------------------------------------------------------
# Host backends
# ------------------------------------------------------------------------------------------------


def _solve_scipy(cost: np.ndarray) -> np.ndarray:
    """scipy's C++ Jonker-Volgenant; cost (n, m) float -> col_for_row (n,) int."""
    from scipy.optimize import linear_sum_assignment

    # A float64, already negated cost is up to 2.3x faster than maximize=True on float32 (scipy
    # otherwise converts and negates internally, in a slower path): perf_anchors.md §2.1.
    _, col = linear_sum_assignment(np.ascontiguousarray(cost, dtype=np.float64))
    return col.astype(np.intp, copy=False)


@functools.cache
def _lapx_module():
    """The `lap` module of lapx, or None. Cached: the import is tried once per process."""
    try:
        import lap
    except ImportError:
        return None
    # The unrelated `lap` 0.5 distribution installs the same module name without lapjvr.
    return lap if hasattr(lap, "lapjvr") else None


def lapx_available() -> bool:
    """True when the optional `lapx` package (with `lap.lapjvr`) can be imported."""
    return _lapx_module() is not None


def _solve_lapx(cost: np.ndarray) -> np.ndarray:
    """lapx `lapjvr`; cost (n, m) float32/float64 -> col_for_row (n,) int. scipy if no lapx.

    Why lapjvr and not lapjvs: lapjvs' default float32 kernel returned a suboptimal assignment
    (relative gap 5e-11) on float64 costs differing by ~1e-7, and its float64 kernel is 2-7x
    slower than lapjvr on wide-range costs. lapjvr keeps float64 potentials and distances for
    square problems even with float32 costs, so float32 input is solved exactly without a
    float64 copy (the copy alone costs ~15-70 ms at n=4096).
    """
    lap = _lapx_module()
    if lap is None:
        return _solve_scipy(cost)
    n, m = cost.shape
    if n != m:
        # lapjvr's rectangular path works in the input precision: force float64 for exactness.
        cost = np.ascontiguousarray(cost, dtype=np.float64)
        rows, cols = lap.lapjvr(cost, extend_cost=True, return_cost=False)
    else:
        rows, cols = lap.lapjvr(cost, return_cost=False)
    if rows.shape[0] != n:
        raise RuntimeError(f"lapx.lapjvr assigned {rows.shape[0]} of {n} rows")
    col_for_row = np.empty(n, np.intp)
    col_for_row[rows] = cols
    return col_for_row


def _optax_col_for_row(cost: jax.Array) -> jax.Array:
    """optax's Hungarian algorithm (minimise); cost (n, m), n <= m -> col_for_row (n,) int.

    Traceable. optax returns (row, col) pairs: for square input the rows come as a permutation
    listed by column, so scatter them into the row-major `col_for_row`.
    """
    import optax

    rows, cols = optax.assignment.hungarian_algorithm(cost)
    return jnp.zeros(cost.shape[0], cols.dtype).at[rows].set(cols)


_optax_col_for_row_jit = jax.jit(_optax_col_for_row)


def _solve_optax(cost: np.ndarray) -> np.ndarray:
    """optax Hungarian on the default device; cost (n, m) -> col_for_row (n,) int (host)."""
    # optax keeps its potentials in the default float dtype (float32): run float64 input under
    # x64 so the solve is as exact as the other backends on the same numbers.
    with jax.enable_x64(cost.dtype == np.float64):
        out = _optax_col_for_row_jit(jnp.asarray(cost))
        return np.asarray(out).astype(np.intp)


_BACKENDS: dict[str, HostBackend] = {
    "scipy": _solve_scipy,
    "lapx": _solve_lapx,
    "optax": _solve_optax,
}
# Read-only view of the registry: name -> host function (cost (n, m) -> col_for_row (n,)).
BACKENDS: Mapping[str, HostBackend] = types.MappingProxyType(_BACKENDS)


def available_backends() -> tuple[str, ...]:
    """Valid `backend=` names: ``"auto"`` plus the registry, sorted."""
    return ("auto", *sorted(_BACKENDS))


def register_assignment_backend(name: str, fn: HostBackend, *, overwrite: bool = False) -> None:
    """Add a host backend `fn(cost (n, m) float, minimise) -> col_for_row (n,) int` under `name`.

    The function must be exact: `solve_assignment` trusts its result without re-checking.
    """
    if name == "auto" or (name in _BACKENDS and not overwrite):
        raise ValueError(f"assignment backend {name!r} already exists")
    _BACKENDS[name] = fn


def _auto_backend(n: int) -> str:
    # lapjvr was never slower than scipy from n=16 on (raw calls at n=16-128; random, near-
    # permutation and tie-heavy costs up to 4096 in bench/bench_assignment.py). Below that both
    # take a few microseconds and scipy needs no extra import.
    return "lapx" if n >= _AUTO_MIN_N and lapx_available() else "scipy"


def _get_backend(backend: str, n: int) -> HostBackend:
    """Resolve a backend name (``"auto"`` depends on n) to its host function."""
    if backend == "auto":
        backend = _auto_backend(n)
    try:
        return _BACKENDS[backend]
    except (KeyError, TypeError):
        valid = ", ".join(repr(b) for b in available_backends())
        raise ValueError(f"unknown assignment backend {backend!r}; valid: {valid}") from None


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"solve_assignment: score must be a 2-D (n, m) matrix, got shape "
                         f"{tuple(shape)}")
    n, m = shape
    if n > m:
        raise ValueError(
            f"solve_assignment: score of shape {tuple(shape)} has more rows than columns; rows "
            "must be <= columns "
            "(every row gets a column): pass score.T and invert the result"
        )
    return n, m


def _host_cost(score, maximize: bool) -> np.ndarray:
    """Validated, C-contiguous float32/float64 cost (n, m) to *minimise*, from score (n, m)."""
    score = np.asarray(score)
    _check_shape(score.shape)
    # jnp.issubdtype also knows the ml_dtypes floats (bfloat16, ...), which numpy files as void.
    real = jnp.issubdtype(score.dtype, jnp.integer) or jnp.issubdtype(score.dtype, jnp.floating)
    if not (real or score.dtype == np.bool_):
        raise ValueError(f"solve_assignment: score must be real-valued, got dtype {score.dtype}")
    # float32/float64 are solved as given (negation is exact in both). Integers, bool, float16
    # and bfloat16 go to float64, which every solver handles natively and exactly (ints < 2^53).
    if score.dtype not in (np.float32, np.float64):
        score = score.astype(np.float64)
    finite = np.isfinite(score)
    if not finite.all():
        bad = int(score.size - np.count_nonzero(finite))
        first = [int(i) for i in np.unravel_index(int(np.argmin(finite.reshape(-1))),
                                                  score.shape)]
        raise ValueError(
            f"solve_assignment: score of shape {score.shape} contains NaN or inf ({bad} "
            f"non-finite entries, first at {first}); the assignment needs finite scores "
            "(e.g. np.nan_to_num the correlation first)"
        )
    if not maximize:
        return np.ascontiguousarray(score)
    return np.negative(score, out=_negation_buffer(score.shape, score.dtype))


_BUFFERS = threading.local()


def _negation_buffer(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A reused output array for the negated score: a fresh (n, n) array costs page faults that
    take longer than the negation itself (24 ms vs ~5 ms at n=4096). One buffer per thread, of
    the last shape; solvers only read it, and it is rewritten on every call."""
    buf = getattr(_BUFFERS, "array", None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = _BUFFERS.array = np.empty(shape, dtype)
    return buf


def solve_assignment(score, maximize: bool = True, *, backend: str = "auto"):
    """Exact linear assignment: the column of every row, optimising the total score.

    Args:
      score: (n, m) real matrix, n <= m (numpy, jax array or tracer). Must be finite.
      maximize: maximise `sum_i score[i, col_for_row[i]]` (default) or minimise it.
      backend: ``"auto"``, ``"scipy"``, ``"lapx"``, ``"optax"`` or a registered name.

    Returns:
      col_for_row: (n,) int, distinct columns; row i is assigned column ``col_for_row[i]``.
      A numpy array for concrete input; a jax int array when `score` is traced (under `jit`
      this calls `solve_assignment_jax`, see there).

    Raises:
      ValueError: on a non-2-D or n > m score, NaN/inf entries, or an unknown backend name.
    """
    if isinstance(score, jax.core.Tracer):
        return solve_assignment_jax(score, maximize, backend=backend)
    shape = np.shape(score)
    n, m = _check_shape(shape)
    fn = _get_backend(backend, n)  # resolve first: an unknown name fails before any work
    cost = _host_cost(score, maximize)
    if n == 0:
        return np.zeros(0, np.intp)
    return fn(cost)


def solve_group_assignment(score, groups: int, maximize: bool = True, *,
                            backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact assignment that moves contiguous groups of features as wholes (MuDSC's head
    matching): an assignment inside every (row group, column group) pair, scored by its mean,
    then an assignment of groups on those scores.

    Args:
      score: (n, n) real matrix; rows and columns are `groups` contiguous groups of n / groups.
      groups: g >= 1, a divisor of n.
      maximize: maximise (default) or minimise.

    Returns:
      (group_col (g,), col_for_row (n,)): row group j is paired with column group
      `group_col[j]`, and row r with column `col_for_row[r]`, inside its paired group.
    """
    score = np.asarray(score, np.float64)
    n = score.shape[0]
    if score.ndim != 2 or score.shape[1] != n or groups < 1 or n % groups:
        raise ValueError(f"solve_group_assignment: score must be square (n, n) with n divisible "
                         f"by groups={groups}, got shape {score.shape}")
    og = n // groups
    # [j, k, a, b]: feature a of row group j against feature b of column group k
    sub = score.reshape(groups, og, groups, og).transpose(0, 2, 1, 3)
    inner = np.empty((groups, groups, og), np.intp)
    pair = np.empty((groups, groups), np.float64)
    for j in range(groups):
        for k in range(groups):
            c = solve_assignment(sub[j, k], maximize=maximize, backend=backend)
            inner[j, k] = c
            pair[j, k] = sub[j, k][np.arange(og), c].mean()
    group_col = np.asarray(solve_assignment(pair, maximize=maximize, backend=backend), np.intp)
    col = (group_col[:, None] * og + inner[np.arange(groups), group_col]).reshape(-1)
    return group_col, col


def solve_assignment_jax(score, maximize: bool = True, *, backend: str = "optax") -> jax.Array:
    """Jittable exact linear assignment; works on device and under `jit` / `vmap`.

    Args:
      score: (n, m) real matrix, n <= m (static shape).
      maximize: maximise (default) or minimise the total score.
      backend: ``"optax"`` (default) runs optax's Hungarian algorithm in the graph, on whatever
        device `score` lives on. Any other name (``"auto"``, ``"lapx"``, ``"scipy"``) copies the
        matrix to the host via `jax.pure_callback`; on CPU that is 3-10x faster for n >= 1000.

    Returns:
      col_for_row: (n,) int32 jax array (int64 under x64).
      Traced values cannot raise, so with the optax backend a NaN/inf anywhere in `score`
      returns all -1 (the solver would otherwise loop on NaN); callback backends raise their
      ValueError from inside the callback.
    """
    score = jnp.asarray(score)
    n, m = _check_shape(score.shape)
    if not jnp.issubdtype(score.dtype, jnp.floating):
        score = score.astype(jnp.float32)
    cost = -score if maximize else score
    if backend == "optax":
        finite = jnp.isfinite(cost).all()
        # Zero out the matrix when anything is non-finite so the Hungarian loop terminates.
        out = _optax_col_for_row(jnp.where(finite, cost, jnp.zeros_like(cost)))
        return jnp.where(finite, out, -1)
    _get_backend(backend, n)  # fail early, at trace time, on an unknown name
    out_dtype = jax.dtypes.canonicalize_dtype(jnp.int64)  # int32 unless x64 is on

    def host(c):
        # Minimising the already negated cost: maximize=False.
        return solve_assignment(np.asarray(c), maximize=False, backend=backend).astype(out_dtype)

    return jax.pure_callback(
        host, jax.ShapeDtypeStruct((n,), out_dtype), cost, vmap_method="sequential"
    )


def assignment_score(score, col_for_row) -> float:
    """Total `sum_i score[i, col_for_row[i]]` in float64; score (n, m), col_for_row (n,).

    Gathers n entries: no (n, n) permutation matrix is built (Git Re-Basin's `eye(n)[perm]`).
    """
    score = np.asarray(score)
    col = np.asarray(col_for_row)
    return float(score[np.arange(col.shape[0]), col].astype(np.float64).sum())
