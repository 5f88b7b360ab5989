"""Saving and restoring variable trees with orbax, atomically.

A checkpoint is a directory holding an orbax `StandardCheckpointer` tree under `state/` and a
`meta.json` (model name and kwargs, training config, metrics). The directory is written under a
temporary name and renamed when complete, so a run killed half way leaves no checkpoint that a
later run would read. This file is the one place that knows orbax's API.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

META = "meta.json"
STATE = "state"


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import

    return ocp.StandardCheckpointer()


def exists(path: str | os.PathLike) -> bool:
    """True if `path` holds a complete checkpoint (its meta file is written last)."""
    return (Path(path) / META).is_file() and (Path(path) / STATE).is_dir()


def save(path: str | os.PathLike, variables: Any, meta: dict | None = None) -> Path:
    """Writes `variables` (a pytree of arrays) and `meta` (JSON-able) to directory `path`.

    An existing checkpoint at `path` is replaced. Returns the path.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        ckptr = _checkpointer()
        ckptr.save(tmp / STATE, jax.tree.map(np.asarray, variables))
        ckptr.wait_until_finished()
        (tmp / META).write_text(json.dumps(meta or {}, indent=1, sort_keys=True, default=str))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_meta(path: str | os.PathLike) -> dict:
    """The meta dict saved with the checkpoint at `path`."""
    return json.loads((Path(path) / META).read_text())


def load(path: str | os.PathLike, like: Any | None = None) -> Any:
    """Restores the variables at `path` as numpy arrays.

    `like` (a pytree of arrays or ShapeDtypeStructs) fixes the expected structure, shapes and
    dtypes; without it the tree is restored as saved.
    """
    path = Path(path).absolute()
    if not exists(path):
        raise FileNotFoundError(f"no complete checkpoint at {path} (expected {STATE}/ and {META})")
    ckptr = _checkpointer()
    if like is None:
        restored = ckptr.restore(path / STATE)
    else:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), like)
        restored = ckptr.restore(path / STATE, abstract)
    return jax.tree.map(np.asarray, restored)
