"""Reading inputs and writing flat .safetensors files.

A directory input is an orbax checkpoint of `mergejax.io.checkpoint` (`{'params': ...,
'batch_stats': ...}`) or a recipe output (read through its `model.safetensors`); a `.safetensors`
file holds the same variables tree flattened to `{'params/dense_0/kernel': array}` ('/'-joined
key paths, `mergejax.specs.flatten`), dtypes kept exactly (bf16 included). Files go through
`mergejax.io.safetensors_io`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mergejax.io import checkpoint
from mergejax.io.check import check_tensors
from mergejax.io.safetensors_io import read_safetensors, write_safetensors
from mergejax.recipe.schema import RecipeError
from mergejax.specs import flatten

Flat = dict[str, np.ndarray]
SAFETENSORS_NAME, ORBAX_NAME, RECIPE_NAME = "model.safetensors", "orbax", "recipe.yml"


def load_flat_safetensors(path: str | os.PathLike) -> Flat:
    """`{'params/a/kernel': array}` from a flat-layout .safetensors file, dtypes as stored."""
    try:
        return read_safetensors(path)
    except ValueError as e:  # a cut or foreign file
        raise RecipeError(str(e)) from None


def save_flat_safetensors(path: str | os.PathLike, flat: Mapping[str, Any],
                          metadata: Mapping[str, str] | None = None) -> None:
    """Writes `{'/'-joined path: array}` to `path` with string metadata (format: flax)."""
    write_safetensors(path, flat, fmt="flax", metadata=metadata)


def read_model(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[Flat, dict]:
    """(flat variables, meta) of one input: orbax directory, recipe output or .safetensors.

    Dtypes are kept as stored (bf16 included); every tensor must be floating point and, unless
    `allow_nonfinite`, finite (`mergejax.io.check.check_tensors`, naming the file and key).
    """
    path = Path(path)
    if path.is_dir() and not checkpoint.exists(path):
        path = path / SAFETENSORS_NAME  # a recipe output directory
    if path.is_dir():
        return (flatten(checkpoint.load(path, allow_nonfinite=allow_nonfinite)),
                checkpoint.load_meta(path))
    flat = check_tensors(load_flat_safetensors(path), str(path),
                         allow_nonfinite=allow_nonfinite, upcast=False,
                         integer_ok=lambda key: False)
    return flat, {}


def check_same_trees(named: Sequence[tuple[str, Flat]]) -> None:
    """RecipeError naming the first leaf (sorted) where a model differs from the first one."""
    ref_name, ref = named[0]
    for who, flat in named[1:]:
        for leaf in sorted(set(ref) | set(flat)):
            if leaf not in flat or leaf not in ref:
                owner = ref_name if leaf in ref else who
                raise RecipeError(f"model {who} does not match {ref_name}: leaf {leaf!r} is "
                                  f"only in {owner}")
            a, b = ref[leaf], flat[leaf]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise RecipeError(f"model {who} does not match {ref_name}: leaf {leaf!r} is "
                                  f"{b.dtype}{list(b.shape)} there but {a.dtype}{list(a.shape)} "
                                  f"in {ref_name}")
