"""`run`: merges a recipe and writes `DIR/model.safetensors`, `DIR/orbax/` and `DIR/recipe.yml`
atomically (a temporary sibling directory renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import yaml

from mergejax import checkpointing
from mergejax.recipe.checkpoint_io import (
    ORBAX_NAME,
    RECIPE_NAME,
    SAFETENSORS_NAME,
    save_flat_safetensors,
)
from mergejax.recipe.execute import merge
from mergejax.recipe.schema import RecipeError
from mergejax.recipe.validate import Recipe
from mergejax.specs import unflatten


def _check_out_dir(out: Path, recipe: Recipe, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out-dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RecipeError(f"--out-dir {out} is not empty; pass --overwrite to replace it")
    for e in (recipe.base, *recipe.models):
        if e is not None and (e.path == out or out in e.path.parents):
            raise RecipeError(f"--out-dir {out} contains the input {e.ref}")


def run(recipe: Recipe, out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False,
        source: str | None = None) -> str:
    """Merges and writes `out_dir/{model.safetensors, orbax/, recipe.yml}`; returns a summary.

    Everything is written to a temporary sibling directory renamed into place at the end, so a
    failure leaves `out_dir` as it was (absent, empty, or - with `overwrite` - the old output).
    `source` is the recipe text saved as recipe.yml (default: the parsed recipe dumped).
    """
    out = Path(os.path.abspath(out_dir))
    _check_out_dir(out, recipe, overwrite)
    flat, info = merge(recipe, seed=seed)
    raw_json = json.dumps(recipe.raw, sort_keys=True, default=str)
    keep = ("model", "model_kwargs", "arch", "input_shape")
    meta = {k: info["input_meta"][k] for k in keep if k in info["input_meta"]}
    meta.update(source="mergejax.recipe", recipe=json.loads(raw_json), seed=seed,
                merge_method=recipe.method.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_flat_safetensors(tmp / SAFETENSORS_NAME, flat,
                              {"recipe": raw_json, "seed": str(seed)})
        checkpointing.save(tmp / ORBAX_NAME, unflatten(flat), meta)
        (tmp / RECIPE_NAME).write_text(source or yaml.safe_dump(dict(recipe.raw)))
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists():  # put the previous output back
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
    n = sum(int(np.size(v)) for v in flat.values())
    dtypes = ",".join(sorted({str(v.dtype) for v in flat.values()}))
    k = len(recipe.members)
    return (f"{recipe.method.name}: merged {k} model{'s' * (k != 1)} into {out} "
            f"({len(flat)} tensors, {n:,} values, {dtypes}, {len(info['groups'])} parameter "
            f"group(s))")
