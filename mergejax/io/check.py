"""The one check of weights read from a file: floating dtypes only, finite values.

Every checkpoint reader calls `check_tensors` (`mergejax.converters.load_state_dict` /
`from_torch`, `mergejax.io.checkpoint.load`, `mergejax.model_io.load_endpoint` through those,
the recipe reader) so that a NaN, inf, integer, bool or complex tensor is refused on entry with
the file, the key and the number of bad values, instead of being merged into a broken model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["INTEGER_BUFFERS", "NonFiniteError", "WeightDtypeError", "check_tensors",
           "is_integer_buffer"]

# Integer tensors a checkpoint may legitimately hold (BatchNorm's step count): kept as they are
# here, dropped by the converters' layouts.
INTEGER_BUFFERS = ("num_batches_tracked",)


class WeightDtypeError(ValueError):
    """A weight tensor that is not floating point (integer, bool, complex, object)."""


class NonFiniteError(ValueError):
    """A weight tensor with NaN or inf values."""


def is_integer_buffer(key: str) -> bool:
    """True for keys of known integer buffers (`...num_batches_tracked`)."""
    return str(key).rsplit(".", 1)[-1].rsplit("/", 1)[-1] in INTEGER_BUFFERS


def _kind(dtype: np.dtype) -> str:
    if dtype.name == "bfloat16":
        return "f"
    return dtype.kind


def check_tensors(tensors: Mapping[str, Any], source: str, *, allow_nonfinite: bool = False,
                  upcast: bool = True,
                  integer_ok: Callable[[str], bool] = is_integer_buffer) -> dict[str, Any]:
    """Checked (and optionally upcast) copy of `{key: array}` read from `source`.

    Args:
      tensors: `{key: array}` (numpy arrays, or anything `np.asarray` reads: jax arrays; torch
        tensors must be converted first).
      source: the file (or other origin) named in error messages.
      allow_nonfinite: let NaN/inf values through (the CLIs' `--allow-nonfinite`).
      upcast: float16 and bfloat16 tensors become float32 (exact); False keeps dtypes as stored.
      integer_ok: keys whose integer tensors are kept as they are (default: the known integer
        buffers, `num_batches_tracked`).

    Returns:
      `{key: np.ndarray}` in the same order.

    Raises:
      WeightDtypeError naming `source`, the key and the dtype for an integer (other than the
      known buffers), bool, complex or non-numeric tensor; NonFiniteError naming `source`, the
      key, how many values are NaN/inf and where the first one is, listing every bad key.
    """
    out: dict[str, Any] = {}
    bad_values: list[tuple[str, int, int, int]] = []
    for key, value in tensors.items():
        a = np.asarray(value)
        kind = _kind(a.dtype)
        if kind in "iu" and integer_ok(str(key)):
            out[key] = a
            continue
        if kind != "f":
            what = {"i": "integer", "u": "unsigned integer", "b": "bool",
                    "c": "complex"}.get(kind, "non-numeric")
            raise WeightDtypeError(
                f"{source}: tensor {key!r} has {what} dtype {a.dtype}; weights must be floating "
                "point (float16/bfloat16/float32/float64). Convert it, or drop the key if it is "
                "not a weight")
        if upcast and a.dtype.itemsize < 4:
            a = a.astype(np.float32)
        if not allow_nonfinite:
            finite = np.isfinite(a.astype(np.float32) if a.dtype.itemsize < 4 else a)
            if not finite.all():
                n_bad = int(finite.size - np.count_nonzero(finite))
                flat = int(np.argmin(finite.reshape(-1)))
                bad_values.append((str(key), n_bad, int(a.size), flat))
        out[key] = a
    if bad_values:
        key, n_bad, size, flat = bad_values[0]
        more = (f"; {len(bad_values) - 1} more tensor(s) too: "
                + ", ".join(repr(k) for k, *_ in bad_values[1:6])
                + (", ..." if len(bad_values) > 6 else "")) if len(bad_values) > 1 else ""
        raise NonFiniteError(
            f"{source}: tensor {key!r} has {n_bad} NaN/inf value{'s' * (n_bad != 1)} of {size} "
            f"(first at flat index {flat}){more}; the checkpoint is broken (a diverged training?). "
            "Pass allow_nonfinite=True (--allow-nonfinite) to read it anyway")
    return out
