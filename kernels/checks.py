"""Input checks shared by the public kernels: a bad input raises a ValueError naming the kernel
and the argument, before any work (and before any loop that a NaN could keep from ending).

Static arguments (Python numbers, shapes, dtypes) are always checked. Array *values* are checked
when they are concrete (numpy, or a committed jax array); under `jax.jit` the argument is a
tracer and its values are unknown at trace time, so they are not checked here: kernels that loop
on their input (`zip_match`) additionally guard themselves inside the compiled code (see
there), and library code calls the kernels on concrete arrays. The checks are host reductions
of O(size) at most.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_count",
    "check_finite_array",
    "check_number",
    "check_square",
    "is_traced",
]


def is_traced(x) -> bool:
    """True when `x` is a tracer (inside `jit`, `vmap`, ...): its values are not known."""
    return isinstance(x, jax.core.Tracer)


def check_number(fn: str, name: str, value, *, lo: float | None = None, lo_open: bool = False,
                 hi: float | None = None) -> None:
    """ValueError unless `value` is a real finite number in the range (lo: inclusive unless
    `lo_open`; hi: inclusive). A tracer passes (its value is unknown)."""
    if is_traced(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray | jax.Array):
        raise ValueError(f"{fn}: {name} must be a real number, got {value!r}")
    if np.ndim(value) != 0:
        raise ValueError(f"{fn}: {name} must be a scalar, got shape {np.shape(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{fn}: {name} must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{fn}: {name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{fn}: {name} must be <= {hi}, got {v}")


def check_count(fn: str, name: str, value, *, lo: int = 1) -> int:
    """`value` as an int, ValueError unless it is an integer >= lo (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{fn}: {name} must be an integer >= {lo}, got {value!r}")
    if value < lo:
        raise ValueError(f"{fn}: {name} must be an integer >= {lo}, got {value}")
    return int(value)


def _dtype(x):
    return getattr(x, "dtype", None) or np.asarray(x).dtype


def check_dtype(fn: str, name: str, x, *, integer_ok: bool = False) -> None:
    """ValueError unless `x` has a floating dtype (also integers if `integer_ok`)."""
    dt = _dtype(x)
    ok = jnp.issubdtype(dt, jnp.floating) or (integer_ok and jnp.issubdtype(dt, jnp.integer))
    if not ok:
        want = "a real (floating or integer)" if integer_ok else "a floating"
        raise ValueError(f"{fn}: {name} must have {want} dtype, got {dt}")


def check_finite_array(fn: str, name: str, x, *, allow_neg_inf: bool = False) -> None:
    """ValueError naming `name`, the count and the first position of its NaN/inf values
    (-inf allowed if `allow_neg_inf`). A tracer passes (see the module docstring)."""
    if is_traced(x):
        return
    a = np.asarray(x)
    if a.dtype.kind not in "fc" and a.dtype.name not in ("bfloat16",):
        return  # integers and bools are always finite
    if a.dtype.kind == "c":
        bad = ~np.isfinite(a)
    else:
        a = a.astype(np.float32, copy=False) if a.dtype.itemsize < 4 else a
        if a.size == 0:
            return
        # fast path, two vectorised reductions (NaN propagates through max/min): all good?
        hi = a.max()
        if not np.isnan(hi) and hi != np.inf and (allow_neg_inf or np.isfinite(a.min())):
            return
        bad = np.isnan(a) | (a == np.inf) if allow_neg_inf else ~np.isfinite(a)
    count = int(np.count_nonzero(bad))
    if count:
        first = [int(i) for i in np.unravel_index(int(np.argmax(bad.reshape(-1))), a.shape)]
        kinds = "NaN or +inf" if allow_neg_inf else "NaN or inf"
        raise ValueError(f"{fn}: {name} has {count} non-finite ({kinds}) value"
                         f"{'s' * (count != 1)} (first at {first}); check what produced it "
                         f"(e.g. np.nan_to_num it first)")


def check_square(fn: str, name: str, x, num_models: int, *, min_width: int = 1) -> tuple[int, int]:
    """(O, n) of a square (O, O) matrix with O = num_models * n, n >= min_width."""
    shape = tuple(np.shape(x))
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{fn}: {name} must be a square (N*n, N*n) matrix, got shape {shape}")
    if shape[0] % num_models:
        raise ValueError(f"{fn}: {name} size O={shape[0]} is not a multiple of "
                         f"num_models={num_models} (expected (N*n, N*n))")
    if shape[0] // num_models < min_width:
        raise ValueError(f"{fn}: {name} of shape {shape} gives n={shape[0] // num_models} "
                         f"features per model; need n >= {min_width}")
    return shape[0], shape[0] // num_models
