"""Saving and restoring variable trees with orbax, atomically.

A checkpoint is a directory holding an orbax `StandardCheckpointer` tree under `state/` and a
`meta.json` (model name and kwargs, training config, metrics). The directory is written under a
temporary name and renamed when complete (`atomic_dir`), so a run killed half way leaves no
checkpoint that a later run would read. This file is the one place that knows orbax's API.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mergejax.io.atomic import atomic_dir, check_output_path
from mergejax.io.check import check_tensors

META = "meta.json"
STATE = "state"


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import

    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    # Multi-process runs: the one process that reads or writes a file does it alone (orbax
    # would otherwise wait at a barrier for every process).
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def exists(path: str | os.PathLike) -> bool:
    """True if `path` holds a complete checkpoint (its meta file is written last)."""
    return (Path(path) / META).is_file() and (Path(path) / STATE).is_dir()


class CorruptCheckpointError(ValueError):
    """A checkpoint directory that orbax cannot restore (damaged, or another structure)."""


def save(path: str | os.PathLike, variables: Any, meta: dict | None = None, *,
         overwrite: bool = True) -> Path:
    """Writes `variables` (a pytree of arrays) and `meta` (JSON-able) to directory `path`.

    An existing `path` is replaced (atomically: the new one is complete before the old one goes)
    if `overwrite` (the default; the launcher's caches rely on it); with `overwrite=False` an
    existing non-empty `path` raises `mergejax.io.cli_errors.OutputExistsError` and nothing is
    written. Returns the (absolute) path.
    """
    path = Path(path).absolute()
    if not overwrite:
        check_output_path(path)
    with atomic_dir(path) as tmp:
        ckptr = _checkpointer()
        ckptr.save(tmp / STATE, jax.tree.map(np.asarray, variables))
        ckptr.wait_until_finished()
        (tmp / META).write_text(json.dumps(meta or {}, indent=1, sort_keys=True, default=str))
    return path


def load_meta(path: str | os.PathLike) -> dict:
    """The meta dict saved with the checkpoint at `path`."""
    return json.loads((Path(path) / META).read_text())


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def load(path: str | os.PathLike, like: Any | None = None, *,
         allow_nonfinite: bool = False) -> Any:
    """Restores the variables at `path` as numpy arrays, checked on entry.

    `like` (a pytree of arrays or ShapeDtypeStructs) fixes the expected structure, shapes and
    dtypes; without it the tree is restored as saved (dtypes kept, bf16 included). Every leaf
    must be floating point and (unless `allow_nonfinite`) finite
    (`mergejax.io.check.check_tensors`: the error names the checkpoint and the leaf).
    Raises FileNotFoundError for an incomplete checkpoint and CorruptCheckpointError (naming
    `path`) when orbax cannot restore it.
    """
    path = Path(path).absolute()
    if not exists(path):
        raise FileNotFoundError(f"no complete checkpoint at {path} (expected {STATE}/ and {META})")
    ckptr = _checkpointer()
    try:
        if like is None:
            restored = ckptr.restore(path / STATE)
        else:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), like)
            restored = ckptr.restore(path / STATE, abstract)
    except Exception as e:  # orbax / tensorstore errors of a damaged or foreign checkpoint
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CorruptCheckpointError(
            f"cannot restore checkpoint {path}: damaged, or not the expected structure "
            f"({type(e).__name__}: {first}); delete it (or move it aside) to recreate it") from e
    leaves, treedef = jax.tree_util.tree_flatten_with_path(restored)
    checked = check_tensors({_key(p): np.asarray(v) for p, v in leaves}, f"checkpoint {path}",
                            allow_nonfinite=allow_nonfinite, upcast=False)
    return jax.tree_util.tree_unflatten(treedef, list(checked.values()))
