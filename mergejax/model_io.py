"""Endpoints from files (orbax, PyTorch, safetensors) and export of merged models.

`load_endpoint(path, model)` detects the format from the path: a directory is an orbax
checkpoint written by `mergejax.io.checkpoint`; `.pt/.pth/.bin/.safetensors` is a PyTorch
state_dict converted by `mergejax.converters` for `model`'s architecture and arguments.
`export(...)` writes every head of a merged model as orbax, torch `.pt` and/or `.safetensors`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mergejax.io import checkpoint as checkpointing
from mergejax.models import Model, Variables

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
FORMATS = ("orbax", "torch", "safetensors")


def _torch_kwargs(model: Model) -> dict:
    return {k: v for k, v in model.kwargs.items() if k not in ("bn_momentum",)}


def load_endpoint(path: str | Path, model: Model, example: np.ndarray, *,
                  allow_nonfinite: bool = False) -> Variables:
    """Variables of `model` read from `path` (format from the path; see module docstring).

    `example` (1, H, W, C) fixes the expected shapes (orbax restores are checked against them);
    for a torch file it may be None (the converter infers the input shape or uses its default).
    Every tensor must be floating point and finite unless `allow_nonfinite` (the error names
    the file and the key: `mergejax.io.check.check_tensors`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"endpoint checkpoint {path} does not exist")
    if path.is_dir():
        return checkpointing.load(path, like=model.init_shapes(example),
                                  allow_nonfinite=allow_nonfinite)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"cannot tell the format of endpoint checkpoint {path}: expected an "
                         f"orbax directory or one of {TORCH_SUFFIXES}")
    from mergejax import converters

    state_dict = converters.load_state_dict(path, allow_nonfinite=allow_nonfinite)
    # example None: the converter reads the input shape off the checkpoint where it can (ViT
    # position embeddings) and otherwise uses the architecture's default
    shape = None if example is None else example.shape[1:]
    return converters.from_torch(state_dict, model.name, input_shape=shape,
                                 allow_nonfinite=allow_nonfinite, **_torch_kwargs(model))


SAVE_FORMATS = {"orbax": "orbax", "pt": "torch", "torch": "torch", "safetensors": "safetensors"}


def save_variables(path: str | Path, variables: Variables, model: Model, fmt: str, *,
                   input_shape: Sequence[int], meta: dict | None = None) -> Path:
    """Writes one variable tree of `model` to `path` as "orbax" (a checkpoint directory),
    "torch"/"pt" (a torch state_dict in the original repository's layout) or "safetensors";
    atomically (temporary name, then rename). Returns the path."""
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {sorted(SAVE_FORMATS)}")
    path = Path(path)
    meta = {"arch": model.name, "model_kwargs": model.kwargs,
            "input_shape": list(input_shape), **(meta or {})}
    if SAVE_FORMATS[fmt] == "orbax":
        return checkpointing.save(path, variables, meta)
    from mergejax import converters

    sd = converters.to_torch(variables, model.name, input_shape=tuple(input_shape),
                             **_torch_kwargs(model))
    converters.save_state_dict(sd, path, metadata={k: str(v) for k, v in meta.items()})
    return path


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
    suffix = {"orbax": "", "torch": ".pt", "safetensors": ".safetensors"}
    for i, variables in enumerate(heads):
        for fmt in formats:
            written.append(save_variables(folder / f"head_{i}{suffix[fmt]}", variables, model,
                                          fmt, input_shape=example.shape[1:], meta=meta))
    return written
