"""`run`: merges a recipe and writes `DIR/model.safetensors`, `DIR/orbax/` and `DIR/recipe.yml`
atomically (a temporary sibling directory renamed into place, `mergejax.io.atomic.atomic_dir`).

The output directory is refused before anything is read if it is not empty (unless
`overwrite`) or overlaps an input; a merged tensor with NaN/inf values is never written."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from mergejax.io import checkpoint
from mergejax.io.atomic import atomic_dir, check_output_path
from mergejax.io.check import NonFiniteError, check_tensors
from mergejax.io.cli_errors import OutputExistsError
from mergejax.recipe.checkpoint_io import (
    ORBAX_NAME,
    RECIPE_NAME,
    SAFETENSORS_NAME,
    save_flat_safetensors,
)
from mergejax.recipe.execute import merge
from mergejax.recipe.hf_io import input_kind
from mergejax.recipe.schema import RecipeError
from mergejax.recipe.shards import parse_size
from mergejax.recipe.stream import DEFAULT_SHARD, merge_hf
from mergejax.recipe.validate import Recipe
from mergejax.specs import unflatten


class RecipeOutputError(RecipeError, OutputExistsError):
    """--out-dir refused: not empty without overwrite, or overlapping an input."""


def _check_out_dir(out: Path, recipes: list[Recipe], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RecipeOutputError(f"--out-dir {out} exists and is not a directory")
    inputs = [e.path for r in recipes for e in (r.base, *r.models) if e is not None]
    try:
        check_output_path(out, inputs=inputs, overwrite=overwrite, what="--out-dir")
    except OutputExistsError as e:
        raise RecipeOutputError(str(e)) from None


def check_output_finite(flat) -> None:
    """NonFiniteError naming the merged tensor(s) with NaN/inf values: never written."""
    try:
        check_tensors(flat, "merged output", upcast=False, integer_ok=lambda key: False)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}".split("; the checkpoint is broken")[0]
                             + "; nothing was written (check the inputs, and an out_dtype "
                             "that overflows)") from None


def input_kinds(recipes: Sequence[Recipe]) -> str:
    """"hf" if every input is a PyTorch / Hugging Face checkpoint, "mergejax" if every one is
    mergejax's own; RecipeError naming the inputs if they mix the two."""
    paths = sorted({e.path for r in recipes for e in (r.base, *r.models) if e is not None})
    kinds = {p: input_kind(p) or "mergejax" for p in paths}
    if len(set(kinds.values())) > 1:
        hf = [str(p) for p, k in kinds.items() if k == "hf"]
        mj = [str(p) for p, k in kinds.items() if k == "mergejax"]
        raise RecipeError(f"the inputs mix PyTorch/Hugging Face checkpoints ({', '.join(hf)}) "
                          f"with mergejax checkpoints ({', '.join(mj)}): convert one side "
                          "(python -m mergejax.converters)")
    return next(iter(kinds.values()))


def run(recipe: Recipe | Sequence[Recipe], out_dir: str | os.PathLike, *, seed: int = 0,
        overwrite: bool = False, source: str | None = None, allow_nonfinite: bool = False,
        max_shard_size: str | int = DEFAULT_SHARD, progress: bool = False) -> str:
    """Merges and writes `out_dir/{model.safetensors, orbax/, recipe.yml}`; returns a summary.

    PyTorch / Hugging Face inputs (`hf_io.input_kind`) are merged out of core instead
    (`stream.merge_hf`): `out_dir` then holds sharded safetensors of at most `max_shard_size`
    (e.g. "5GB") with `model.safetensors.index.json` in the inputs' naming and dtypes, the base
    model's config/tokenizer files and recipe.yml; `progress` shows a tqdm bar on stderr.

    Everything is written to a temporary sibling directory renamed into place at the end, so a
    failure leaves `out_dir` as it was (absent, empty, or - with `overwrite` - the old output).
    `source` is the recipe text saved as recipe.yml (default: the parsed recipe dumped).
    Inputs must be finite unless `allow_nonfinite`; the output must be finite in any case
    (NonFiniteError naming the tensor, nothing written).
    """
    recipes = [recipe] if isinstance(recipe, Recipe) else list(recipe)
    out = Path(os.path.abspath(out_dir))
    _check_out_dir(out, recipes, overwrite)
    if input_kinds(recipes) == "hf":
        return merge_hf(recipes, out, seed=seed, max_shard_bytes=parse_size(max_shard_size),
                        progress=progress, source=source)
    import jax

    if jax.process_count() > 1:
        raise RecipeError("several processes split out-of-core merges of PyTorch/Hugging Face "
                          "checkpoints; mergejax checkpoints merge in memory: run one process")
    flat, info = merge(recipes, seed=seed, allow_nonfinite=allow_nonfinite)
    check_output_finite(flat)
    raws = [dict(r.raw) for r in recipes]
    raw_json = json.dumps(raws[0] if len(raws) == 1 else raws, sort_keys=True, default=str)
    keep = ("model", "model_kwargs", "arch", "input_shape")
    meta = {k: info["input_meta"][k] for k in keep if k in info["input_meta"]}
    methods = [r.method.name for r in recipes]
    meta.update(source="mergejax.recipe", recipe=json.loads(raw_json), seed=seed,
                merge_method=methods[0] if len(methods) == 1 else methods)
    with atomic_dir(out) as tmp:
        save_flat_safetensors(tmp / SAFETENSORS_NAME, flat,
                              {"recipe": raw_json, "seed": str(seed)})
        checkpoint.save(tmp / ORBAX_NAME, unflatten(flat), meta)
        (tmp / RECIPE_NAME).write_text(source or yaml.safe_dump_all(raws, sort_keys=False))
    n = sum(int(np.size(v)) for v in flat.values())
    dtypes = ",".join(sorted({str(v.dtype) for v in flat.values()}))
    k = len(recipes[0].members)
    return (f"{'+'.join(methods)}: merged {k} model{'s' * (k != 1)} into {out} "
            f"({len(flat)} tensors, {n:,} values, {dtypes}, {len(info['groups'])} parameter "
            f"group(s))")
