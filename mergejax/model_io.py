"""Endpoints from files (orbax, PyTorch, safetensors) and export of merged models.

`load_endpoint(path, model)` detects the format from the path: a directory is an orbax
checkpoint written by `mergejax.checkpointing`; `.pt/.pth/.bin/.safetensors` is a PyTorch
state_dict converted by `mergejax.converters` for `model`'s architecture and arguments.
`export(...)` writes every head of a merged model as orbax, torch `.pt` and/or `.safetensors`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mergejax import checkpointing
from mergejax.models import Model, Variables

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
FORMATS = ("orbax", "torch", "safetensors")


def _torch_kwargs(model: Model) -> dict:
    return {k: v for k, v in model.kwargs.items() if k not in ("bn_momentum",)}


def load_endpoint(path: str | Path, model: Model, example: np.ndarray) -> Variables:
    """Variables of `model` read from `path` (format from the path; see module docstring).

    `example` (1, H, W, C) fixes the expected shapes (orbax restores are checked against them).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"endpoint checkpoint {path} does not exist")
    if path.is_dir():
        return checkpointing.load(path, like=model.init_shapes(example))
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"cannot tell the format of endpoint checkpoint {path}: expected an "
                         f"orbax directory or one of {TORCH_SUFFIXES}")
    from mergejax import converters

    state_dict = converters.load_state_dict(path)
    return converters.from_torch(state_dict, model.name, input_shape=example.shape[1:],
                                 **_torch_kwargs(model))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def export(out_dir: str | Path, method: str, model: Model, heads: Sequence[Variables],
           formats: Sequence[str], example: np.ndarray, meta: dict | None = None) -> list[Path]:
    """Writes each head tree of a merged model to `out_dir/<method>/head_<i>.<ext>`.

    Returns the paths written. Every file is written under a temporary name and renamed.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; valid: {FORMATS}")
    folder = Path(out_dir) / _safe(method)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "arch": model.name, "model_kwargs": model.kwargs, **(meta or {})}
    written = []
    for i, variables in enumerate(heads):
        if "orbax" in formats:
            written.append(checkpointing.save(folder / f"head_{i}", variables, meta))
        torch_formats = [f for f in formats if f in ("torch", "safetensors")]
        if torch_formats:
            from mergejax import converters

            sd = converters.to_torch(variables, model.name, input_shape=example.shape[1:],
                                     **_torch_kwargs(model))
            for fmt in torch_formats:
                path = folder / f"head_{i}.{'pt' if fmt == 'torch' else 'safetensors'}"
                converters.save_state_dict(sd, path, metadata={"method": method})
                written.append(path)
    return written
