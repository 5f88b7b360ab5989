"""Parsing and static validation of a recipe: every problem is reported before any checkpoint is
read (method, top-level keys, parameter names and scopes, value forms and ranges, model count and
base requirements, dtypes, and that each input exists in a readable format)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergejax.recipe.checkpoint_io import SAFETENSORS_NAME
from mergejax.recipe.hf_io import SAFETENSORS_INDEX, input_kind
from mergejax.recipe.schema import (
    DTYPES,
    MERGEKIT_ONLY,
    METHODS,
    PARAMETERS,
    TOP_LEVEL,
    Method,
    RecipeError,
    param_range,
)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One input: `ref` as written, `path` resolved, its own parameter settings."""

    ref: str
    path: Path
    parameters: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe. `raw` is the parsed YAML (recorded in the outputs)."""

    method: Method
    base: ModelEntry | None
    models: tuple[ModelEntry, ...]
    parameters: Mapping[str, Any]
    dtype: str | None
    out_dtype: str | None
    raw: Mapping[str, Any]
    tensors: tuple[str, ...] | None = None  # multi-document recipes: this block's filters

    @property
    def members(self) -> list[ModelEntry]:
        """The models merged, in order. GTA: the models other than the base. slerp: [the t=0
        end (base_model, else the first model), the other]. linear: all models (no base)."""
        if self.method.kind == "gta":
            return [m for m in self.models if m.path != self.base.path]
        if self.method.kind == "slerp":
            first = self.base or self.models[0]
            other = next(m for m in self.models if m.path != first.path)
            return [first, other]
        return list(self.models)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_scalar(method: str, name: str, v) -> str | None:
    kind = PARAMETERS[name][1]
    if kind == "choice":
        choices = PARAMETERS[name][2]
        return None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"
    if kind == "bool":
        return None if isinstance(v, bool) else f"must be true or false, got {v!r}"
    if not _is_number(v) or not math.isfinite(v):
        return f"must be a finite number, got {v!r}"
    if kind == "integer" and not float(v).is_integer():
        return f"must be an integer, got {v!r}"
    rng = param_range(method, name)
    if rng is not None:
        lo, hi, lo_open, hi_open = rng
        hi = math.inf if hi is None else hi
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            return (f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                    f"got {v!r}")
    return None


def _setting_errors(method: str, name: str, setting) -> list[str]:
    """Problems of one parameter setting (scalar | gradient | {filter, value} condition(s))."""
    if PARAMETERS[name][1] == "choice" and not isinstance(setting, str):
        return [f"must be one of {', '.join(PARAMETERS[name][2])} (one value for the whole "
                f"model), got {setting!r}"]
    conds = [setting] if isinstance(setting, Mapping) else setting
    if isinstance(conds, list) and conds and all(isinstance(c, Mapping) for c in conds):
        errs = []
        for c in conds:
            extra = sorted(set(c) - {"filter", "value"})
            if extra or "value" not in c:
                errs.append(f"a condition must be {{filter, value}}, got {dict(c)!r}")
            elif c.get("filter") is not None and not isinstance(c["filter"], str):
                errs.append(f"filter must be a string, got {c['filter']!r}")
            elif isinstance(c["value"], Mapping | list) and not _is_gradient(c["value"]):
                errs.append(f"a condition's value must be a scalar or a gradient, got "
                            f"{c['value']!r}")
            else:
                errs += _setting_errors(method, name, c["value"])
        return errs
    if isinstance(setting, list):
        if not _is_gradient(setting) or PARAMETERS[name][1] != "number":
            return [f"a list must be a gradient (non-empty list of numbers) or {{filter, value}} "
                    f"conditions, got {setting!r}"]
        return [e for v in setting if (e := _check_scalar(method, name, v))]
    err = _check_scalar(method, name, setting)
    return [err] if err else []


def _is_gradient(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_number(e) for e in v)


def _input_error(path: Path) -> str | None:
    """Why `path` is not a readable input, or None (`hf_io.input_kind`)."""
    if not path.exists():
        return f"{path} does not exist"
    if input_kind(path) is not None:
        return None
    if path.is_dir():
        return (f"{path} is a directory but not an orbax checkpoint of mergejax.io.checkpoint "
                f"(meta.json + state/), a recipe output ({SAFETENSORS_NAME} + orbax/) nor a "
                f"PyTorch/Hugging Face checkpoint (*.safetensors, {SAFETENSORS_INDEX}, "
                "pytorch_model.bin)")
    return (f"{path}: unknown format; expected an orbax checkpoint directory, a .safetensors "
            "file, a .bin/.pt/.pth torch state dict or a Hugging Face checkpoint directory")


def parse(raw: Any, *, check_files: bool = True) -> Recipe:
    """Validates a parsed recipe dict; raises RecipeError listing every problem found.

    Checks the method, top-level keys, each parameter's name, scope (per model or global),
    value form and range, the method's model count and base requirements, dtypes and (if
    `check_files`) that every input exists in a readable format. Reads no checkpoint.
    """
    if not isinstance(raw, Mapping):
        raise RecipeError(f"a recipe must be a mapping, got {type(raw).__name__}")
    errs: list[str] = []
    for key in raw:
        if key in MERGEKIT_ONLY:
            errs.append(f"'{key}' is a mergekit option that mergejax.recipe does not support "
                        f"(supported keys: {', '.join(TOP_LEVEL)})")
        elif key not in TOP_LEVEL:
            errs.append(f"unknown key '{key}'; supported keys: {', '.join(TOP_LEVEL)}")
    name = raw.get("merge_method")
    if name not in METHODS:
        errs.append(f"merge_method {name!r} is not supported; supported methods: "
                    f"{', '.join(METHODS)}")
        raise RecipeError("\n".join(errs))
    method = METHODS[name]

    def entry(ref, params, where) -> ModelEntry | None:
        if not isinstance(ref, str) or not ref:
            errs.append(f"{where}: 'model' must be a path, got {ref!r}")
            return None
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            errs.append(f"{where}: parameters must be a mapping, got {params!r}")
            params = {}
        for p, setting in params.items():
            errs.extend(_param_errors(method, p, setting, where, per_model=True))
        return ModelEntry(ref, Path(os.path.abspath(os.path.expanduser(ref))), dict(params))

    models = []
    raw_models = raw.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        errs.append("'models' must be a non-empty list of {model, parameters}")
        raw_models = []
    for i, m in enumerate(raw_models):
        where = f"models[{i}]"
        if not isinstance(m, Mapping) or set(m) - {"model", "parameters"}:
            errs.append(f"{where} must be a mapping with keys model and parameters, got {m!r}")
            continue
        e = entry(m.get("model"), m.get("parameters"), f"{where} ({m.get('model')})")
        if e is not None:
            models.append(e)
    seen = [m.path for m in models]
    for p in sorted({p for p in seen if seen.count(p) > 1}):
        errs.append(f"model {p} is listed twice")
    base = None
    if raw.get("base_model") is not None:
        base = entry(raw["base_model"], None, "base_model")
    params = raw.get("parameters") or {}
    if not isinstance(params, Mapping):
        errs.append(f"'parameters' must be a mapping, got {params!r}")
        params = {}
    for p, setting in params.items():
        errs.extend(_param_errors(method, p, setting, "parameters", per_model=False))

    paths = {m.path for m in models} | ({base.path} if base else set())
    if method.kind == "gta":
        if base is None:
            errs.append(f"{name} needs base_model (task vectors are taken from it)")
        elif not paths - {base.path}:
            errs.append(f"{name} needs at least one model other than base_model")
    if method.kind == "slerp":
        if len(paths) != 2:
            errs.append(f"slerp needs exactly two distinct models (base_model counts), got "
                        f"{len(paths)}")
        if "t" not in params:
            errs.append("slerp needs the global parameter t (e.g. parameters: {t: 0.5})")
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in DTYPES:
            errs.append(f"{key} {raw[key]!r} is not supported; supported: {', '.join(DTYPES)}")
    tensors = raw.get("tensors")
    if tensors is not None:
        if (not isinstance(tensors, list) or not tensors
                or not all(isinstance(t, str) and t for t in tensors)):
            errs.append(f"'tensors' must be a non-empty list of name substrings (e.g. "
                        f"[params/layer1_]), got {tensors!r}")
        tensors = tuple(tensors) if isinstance(tensors, list) else None
    if check_files:
        for p in sorted(paths):
            if (err := _input_error(p)) is not None:
                errs.append(err)
    if errs:
        raise RecipeError("\n".join(errs))
    return Recipe(method, base, tuple(models), dict(params), raw.get("dtype"),
                  raw.get("out_dtype"), raw, tensors)


def _param_errors(method: Method, p, setting, where: str, per_model: bool) -> list[str]:
    if p not in method.params:
        return [f"{where}: parameter {p!r} is not supported by {method.name}; supported: "
                f"{', '.join(method.params) or 'none'}"]
    if per_model and PARAMETERS[p][0] == "global":
        return [f"{where}: parameter {p!r} is global: give it under the top-level parameters"]
    return [f"{where}: {p}: {e}" for e in _setting_errors(method.name, p, setting)]


def parse_all(docs: Sequence[Any], *, check_files: bool = True) -> list[Recipe]:
    """Validates the documents of a recipe file (see `parse`); raises RecipeError naming the
    document at fault.

    One document is a plain mergekit recipe. Several documents merge one model block by block
    (AutoMerge writes one mergekit recipe per block): each document but the last names the
    tensors it merges with `tensors` (name substrings; a tensor goes to the first document
    that matches it), the last may omit it (the rest). Every document reads the same models.
    """
    docs = [d for d in docs if d is not None]
    if not docs:
        raise RecipeError("the recipe file holds no document")
    if len(docs) == 1:
        return [parse(docs[0], check_files=check_files)]
    recipes, errs = [], []
    for i, d in enumerate(docs):
        try:
            recipes.append(parse(d, check_files=check_files))
        except RecipeError as e:
            errs.append(f"document {i}: {e}")
    if errs:
        raise RecipeError("\n".join(errs))
    for i, r in enumerate(recipes[:-1]):
        if r.tensors is None:
            raise RecipeError(f"document {i} of {len(recipes)} has no 'tensors': only the last "
                              "document of a multi-document recipe may merge 'the rest'")
    inputs = [_inputs(r) for r in recipes]
    for i, s in enumerate(inputs[1:], start=1):
        if s != inputs[0]:
            raise RecipeError(f"document {i} reads models {sorted(map(str, s))} but document 0 "
                              f"reads {sorted(map(str, inputs[0]))}: every document of a "
                              "multi-document recipe must read the same models")
    return recipes


def _inputs(r: Recipe) -> set[Path]:
    """Every checkpoint a document's models reads, base_model included."""
    return {m.path for m in r.models} | ({r.base.path} if r.base is not None else set())


def load_recipes(path: str | os.PathLike, *, check_files: bool = True) -> list[Recipe]:
    """Reads and validates every document of the YAML recipe file at `path` (`parse_all`)."""
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    return parse_all(docs, check_files=check_files)


def load_recipe(path: str | os.PathLike, *, check_files: bool = True) -> Recipe:
    """Reads and validates the one-document YAML recipe at `path` (see `parse`)."""
    recipes = load_recipes(path, check_files=check_files)
    if len(recipes) != 1:
        raise RecipeError(f"recipe {path} holds {len(recipes)} documents; use load_recipes")
    return recipes[0]
