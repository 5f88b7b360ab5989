"""Reading and writing state_dict files: `.safetensors` (no torch needed) and `.pt/.pth/.bin`.

Torch pickles are read with `weights_only=True` only: a pickle that holds anything but tensors
and plain containers is refused, never executed. safetensors go through
`mergejax.io.safetensors_io` (bf16 upcast to float32 exactly). Files are written under a
temporary name and renamed when complete (`mergejax.io.atomic`), so a failed write leaves
nothing behind (and an old file intact).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np

from mergejax.converters.state_dict import is_tensor, normalize, to_numpy
from mergejax.io.atomic import atomic_file
from mergejax.io.check import check_tensors
from mergejax.io.safetensors_io import read_safetensors, write_safetensors

SAFETENSORS = (".safetensors",)
TORCH = (".pt", ".pth", ".bin")


def _resave_hint(path: Path) -> str:
    return ("If you trust the file, re-save its tensors as safetensors in a separate step, e.g.\n"
            "  import torch, safetensors.torch as st\n"
            f"  sd = torch.load({str(path)!r}, weights_only=False)  # runs its pickled code\n"
            "  st.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\n"
            "(take sd['state_dict'] or the like first if the weights are nested), "
            "then convert the .safetensors file.")


def _read_torch(path: Path):
    try:
        import torch  # only here: safetensors files need no torch at all
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch; or convert it to .safetensors") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused a global (a class or function the pickle would call).
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it calls {found.group(1)}" if found else "torch.load(weights_only=True) failed"
        raise ValueError(f"refused to load {path}: it holds objects other than tensors and plain "
                         f"containers, which only unpickling with code execution can rebuild "
                         f"({reason}); nothing was executed.\n" + _resave_hint(path)) from e
    except Exception as e:  # RuntimeError / EOFError / KeyError from a cut or damaged file
        raise ValueError(f"cannot read {path}: truncated or corrupt torch checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


_READERS: dict[str, Callable[[Path], object]] = {
    **{s: partial(read_safetensors, upcast_bf16=True) for s in SAFETENSORS},
    **{s: _read_torch for s in TORCH}}


def load_state_dict(path: str | os.PathLike, *, allow_nonfinite: bool = False
                    ) -> dict[str, np.ndarray]:
    """`{torch key: array}` from a `.safetensors` or `.pt/.pth/.bin` file.

    Checkpoint dicts wrapping the weights (`state_dict`, `model`, `net`) are unwrapped, `module.`
    prefixes stripped, float16/bf16 upcast to float32 (exactly). Raises ValueError naming the
    file if it is truncated or corrupt, or a pickle holding more than tensors and plain
    containers; and, naming the file and the key (`mergejax.io.check.check_tensors`), for a
    tensor that is not floating point (integer buffers `num_batches_tracked` excepted, kept as
    they are) or holds NaN/inf values (unless `allow_nonfinite`).
    """
    path = Path(path)
    if path.suffix.lower() not in _READERS:
        raise ValueError(f"{path}: unknown checkpoint suffix; expected one of {sorted(_READERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    sd = normalize(_READERS[path.suffix.lower()](path), source=str(path))
    return check_tensors(sd, str(path), allow_nonfinite=allow_nonfinite)


def _write_safetensors(sd: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    write_safetensors(path, sd, fmt="pt", metadata=metadata)


def _write_torch(sd: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    import torch

    del metadata  # a torch pickle has no metadata slot; keep the file a pure state_dict
    with atomic_file(path) as tmp:
        torch.save({k: torch.tensor(v) for k, v in sd.items()}, tmp)


_WRITERS = {**{s: _write_safetensors for s in SAFETENSORS}, **{s: _write_torch for s in TORCH}}


def save_state_dict(state_dict: Mapping, path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Writes `{key: array or tensor}` to `path` (`.safetensors` or `.pt/.pth/.bin`), atomically.

    safetensors files get metadata `{"format": "pt", **metadata}` (str -> str). The file is
    written under a temporary name in the same directory and renamed when complete: on any
    failure nothing is written and an existing file is left as it was. Returns the path.
    """
    path = Path(path)
    writer = _WRITERS.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"{path}: unknown suffix; expected one of {sorted(_WRITERS)}")
    bad = sorted(str(k) for k, v in state_dict.items() if not is_tensor(v))
    if bad:
        raise ValueError(f"cannot save {path}: entries that are not tensors: {bad}")
    arrays = {str(k): to_numpy(v) for k, v in state_dict.items()}
    writer(arrays, path, {str(k): str(v) for k, v in (metadata or {}).items()})
    return path
