"""The one safetensors reader and writer (no torch needed).

bf16: numpy has no bfloat16 of its own; `ml_dtypes` (a JAX dependency, `jnp.bfloat16` is its
type) supplies one, and it is registered with numpy before every read, so a file is read the
same way whether or not JAX was imported first. `read_safetensors` returns bf16 tensors
as `ml_dtypes.bfloat16` arrays (dtypes kept exactly, what Flax checkpoints need) or, with
`upcast_bf16=True`, as float32 (what torch state_dicts become here). The upcast is exact: a
bf16 value is the top 16 bits of the float32 with the same value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mergejax.io.atomic import atomic_file


def _register_bfloat16() -> None:
    import ml_dtypes  # noqa: F401  (importing it teaches numpy the name 'bfloat16')


def read_safetensors(path: str | os.PathLike, *, upcast_bf16: bool = False
                     ) -> dict[str, np.ndarray]:
    """`{name: array}` of a .safetensors file, dtypes as stored (bf16 -> float32 if asked).

    Raises ValueError naming the file if it is truncated, corrupt or not safetensors at all.
    """
    import safetensors.numpy

    _register_bfloat16()
    try:
        arrays = dict(safetensors.numpy.load_file(str(path)))
    except Exception as e:  # SafetensorError: header or data cut short, not safetensors at all
        raise ValueError(f"cannot read {path}: truncated or corrupt safetensors file "
                         f"({type(e).__name__}: {e})") from e
    if upcast_bf16:
        arrays = {k: bf16_to_float32(v) for k, v in arrays.items()}
    return arrays


def bf16_to_float32(array: np.ndarray) -> np.ndarray:
    """`array` as float32 if it is bfloat16 (exact), else unchanged."""
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, Any], *, fmt: str,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Writes `{name: array}` to `path` atomically; returns the path.

    The file's metadata is `{"format": fmt, **metadata}` (strings; safetensors' convention is
    fmt "pt" for torch state_dicts, "flax" for Flax variables). On any failure nothing is
    written and an existing file is left as it was.
    """
    import safetensors.numpy

    # order="C", not np.ascontiguousarray: that one turns 0-d arrays (num_batches_tracked) 1-d.
    arrays = {str(k): np.asarray(v, order="C") for k, v in arrays.items()}
    meta = {"format": fmt, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    with atomic_file(path) as tmp:
        safetensors.numpy.save_file(arrays, str(tmp), metadata=meta)
    return Path(path)
