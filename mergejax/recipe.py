"""mergekit-style YAML recipes for Flax checkpoints: `python -m mergejax.recipe R.yml --out-dir D`.

    merge_method: ties                      # see METHODS / --help
    base_model: ckpt/base                   # orbax checkpoint directory or .safetensors file
    models:
      - model: ckpt/task0
        parameters: {weight: 1.0, density: [1.0, 0.5]}      # gradient over the layers
      - model: ckpt/task1
        parameters: {density: [{filter: linear, value: 0.2}, {value: 0.6}]}   # first match wins
    parameters: {lambda: 1.0, normalize: true}              # global defaults
    dtype: float32                          # compute dtype: inputs are cast before merging
    out_dtype: float16                      # storage dtype (default: the input dtype)

Phases: `load_recipe`/`parse` validate the whole recipe (method, parameter names, scopes, value
types and ranges, input files) before any checkpoint is read; `read_model` loads the inputs
(identical trees, shapes and dtypes required); `plan` resolves every parameter per tensor and
groups the tensors sharing resolved values; `merge` calls the mergejax method once per group;
`run` writes `DIR/model.safetensors`, `DIR/orbax/` and `DIR/recipe.yml` atomically.

Inputs and flat layout: a directory is an orbax checkpoint of `mergejax.checkpointing`
(`{'params': ..., 'batch_stats': ...}`); a `.safetensors` file holds the same variables tree
flattened to `{'params/dense_0/kernel': array}` ('/'-joined key paths, `mergejax.specs.flatten`),
dtypes kept exactly (bf16 included). Paths are relative to the working directory, as in mergekit.

Parameter values (mergekit `evaluate_setting`): a scalar; a gradient (list of numbers,
piecewise-linear over the layer position t in [0, 1]); or a list of `{filter, value}` conditions
whose first entry with `filter` a substring of the tensor name ('/'-joined, e.g.
'params/dense_1/kernel'; no filter or '*' matches all) wins. A model's own value wins over the
global one, which wins over the method default; a condition list with no match falls through.

Layer position t: the module name is the first path component after the collection (`params`,
`batch_stats`). A name ending in `_<digits>` is a layer, keyed by all its integers (`layer2_1` ->
(2, 1), `dense_3` -> (3,); `conv_3` and `bn_3` share layer (3,)). The L distinct keys, sorted,
get t = idx / (L - 1) (t = 1 if L = 1). Other tensors get mergekit's pre/post-layer values:
t = 1 for heads (`linear`, `fc`, `classifier`, `head`, `lm_head`), t = 0 otherwise (stems such
as `conv1`, `bn1`). Names whose numbering restarts (torchvision `classifier_0` after
`features_41`) are not depth-ordered: give such tensors filters.

Semantics are mergekit's (per-tensor sparsification, `zero_sign="positive"`, weights applied
before the sign election, normalize = divide by the sum of the agreeing weights), computed by
mergejax's methods: each group of tensors is one call of `mergejax.methods` (ties, dare,
breadcrumbs, task_arithmetic, average, slerp) whenever the method can express the group's
values (one density for all models; for sign-election methods equal positive weights); else
each task vector is sparsified alone by mergejax's sparsifier (`trim_topk`, `dare_drop`,
`breadcrumbs_mask`) and combined by mergekit's formula (`_merge_per_model`). Differences from
mergekit: magnitude trims use mergejax's threshold (every |x| >= the (n - int(n density))-th
smallest is kept: int(n density) + 1 entries, ties included, not exactly int(n density)); DARE
draws from JAX keys (`--random-seed`); BatchNorm statistics are merged like any tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergejax import checkpointing
from mergejax.specs import flatten, unflatten

Flat = dict[str, np.ndarray]


class RecipeError(ValueError):
    """A recipe that cannot run: unsupported method/parameter, bad value, bad or missing input."""


# --------------------------------------------------------------------------------------------
# What is supported
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A recipe merge method: its family, accepted parameters and (mergekit) defaults."""

    name: str
    kind: str  # "linear" | "gta" (task vectors from base_model) | "slerp"
    params: tuple[str, ...]
    defaults: Mapping[str, Any]
    sparsify: str | None = None  # "magnitude" | "random" | "magnitude_outliers"
    consensus: bool = False  # TIES sign election
    doc: str = ""


_GTA = {"weight": 1.0, "density": 1.0, "lambda": 1.0, "int8_mask": False}
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", "linear", ("weight", "normalize"), {"weight": 1.0, "normalize": True},
           doc="sum w_i theta_i / sum w_i (mergejax average; normalize: false drops the /; "
               "base_model unused)"),
    Method("task_arithmetic", "gta", ("weight", "lambda", "normalize", "int8_mask"),
           {**_GTA, "normalize": False}, doc="base + lambda sum w_i tau_i"),
    Method("ties", "gta", ("weight", "density", "lambda", "normalize", "int8_mask"),
           {**_GTA, "normalize": True}, "magnitude", True,
           "per-tensor magnitude trim, sign election, disjoint merge (mergejax ties)"),
    Method("dare_linear", "gta", ("weight", "density", "lambda", "normalize", "rescale",
                                  "int8_mask"),
           {**_GTA, "normalize": False, "rescale": True}, "random",
           doc="random drop (p = 1 - density), then task arithmetic (mergejax dare)"),
    Method("dare_ties", "gta", ("weight", "density", "lambda", "normalize", "rescale",
                                "int8_mask"),
           {**_GTA, "normalize": False, "rescale": True}, "random", True,
           "random drop, then sign election (mergejax dare, merge=ties)"),
    Method("breadcrumbs", "gta", ("weight", "density", "gamma", "lambda", "normalize",
                                  "int8_mask"),
           {**_GTA, "gamma": 0.01, "normalize": False}, "magnitude_outliers",
           doc="drop the top-gamma and the smallest entries per tensor (mergejax breadcrumbs)"),
    Method("breadcrumbs_ties", "gta", ("weight", "density", "gamma", "lambda", "normalize",
                                       "int8_mask"),
           {**_GTA, "gamma": 0.01, "normalize": False}, "magnitude_outliers", True,
           "breadcrumbs, then sign election"),
    Method("slerp", "slerp", ("t",), {},
           doc="spherical interpolation of exactly two models, t=0 -> base_model (or the first)"),
)}

# name -> (scope, kind, range check or None, help). "model" parameters may be given per model
# or globally (as the default for every model); "global" ones only under top-level parameters.
PARAMETERS: dict[str, tuple[str, str, Any, str]] = {
    "weight": ("model", "number", None, "per-model weight (default 1; mergekit requires it)"),
    "density": ("model", "number", None,
                "fraction of task-vector entries kept, (0, 1] (dare: [0, 1], p = 1 - density)"),
    "gamma": ("model", "number", (0, 1, False, True),
              "breadcrumbs: fraction of the largest entries removed, [0, 1)"),
    "lambda": ("global", "number", None, "scale of the merged task vector (mergejax lam)"),
    "normalize": ("global", "bool", None, "divide by the (agreeing) weights' sum"),
    "rescale": ("global", "bool", None, "dare: rescale survivors to the tensor's L1 norm"),
    "int8_mask": ("global", "bool", None, "accepted for mergekit compatibility; no effect"),
    "t": ("global", "number", (0, 1, False, False), "slerp factor, [0, 1] (required)"),
}
DTYPES = ("float32", "float16", "bfloat16")
TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
_MERGEKIT_ONLY = ("slices", "modules", "tokenizer", "tokenizer_source", "chat_template")
HEADS = ("linear", "fc", "classifier", "head", "lm_head")
COLLECTIONS = ("params", "batch_stats")
SAFETENSORS_NAME, ORBAX_NAME, RECIPE_NAME = "model.safetensors", "orbax", "recipe.yml"
_DIV_EPS = 1e-8  # mergekit: |sum of weights| below this divides by 1


def _range(method: str, name: str):
    """(lo, hi, lo_open, hi_open) of a numeric parameter, or None for any finite value."""
    if name == "density":
        return (0, 1, False, False) if method.startswith("dare") else (0, 1, True, False)
    return PARAMETERS[name][2]


# --------------------------------------------------------------------------------------------
# Parsing and static validation (no checkpoint is read here)
# --------------------------------------------------------------------------------------------


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
    if kind == "bool":
        return None if isinstance(v, bool) else f"must be true or false, got {v!r}"
    if not _is_number(v) or not math.isfinite(v):
        return f"must be a finite number, got {v!r}"
    rng = _range(method, name)
    if rng is not None:
        lo, hi, lo_open, hi_open = rng
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            return (f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                    f"got {v!r}")
    return None


def _setting_errors(method: str, name: str, setting) -> list[str]:
    """Problems of one parameter setting (scalar | gradient | {filter, value} condition(s))."""
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
    """Why `path` is not a readable input, or None."""
    if path.is_dir():
        if checkpointing.exists(path) or (path / SAFETENSORS_NAME).is_file():
            return None
        return (f"{path} is a directory but not an orbax checkpoint of mergejax.checkpointing "
                f"(meta.json + state/) nor a recipe output ({SAFETENSORS_NAME})")
    if not path.exists():
        return f"{path} does not exist"
    if path.suffix != ".safetensors":
        return (f"{path}: unknown format; expected an orbax checkpoint directory or a "
                ".safetensors file of flat Flax variables (convert torch files with "
                "`python -m mergejax.converters to-flax` first)")
    return None


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
        if key in _MERGEKIT_ONLY:
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
    if check_files:
        for p in sorted(paths):
            if (err := _input_error(p)) is not None:
                errs.append(err)
    if errs:
        raise RecipeError("\n".join(errs))
    return Recipe(method, base, tuple(models), dict(params), raw.get("dtype"),
                  raw.get("out_dtype"), raw)


def _param_errors(method: Method, p, setting, where: str, per_model: bool) -> list[str]:
    if p not in method.params:
        return [f"{where}: parameter {p!r} is not supported by {method.name}; supported: "
                f"{', '.join(method.params) or 'none'}"]
    if per_model and PARAMETERS[p][0] == "global":
        return [f"{where}: parameter {p!r} is global: give it under the top-level parameters"]
    return [f"{where}: {p}: {e}" for e in _setting_errors(method.name, p, setting)]


def load_recipe(path: str | os.PathLike, *, check_files: bool = True) -> Recipe:
    """Reads and validates the YAML recipe at `path` (see `parse`)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    return parse(raw, check_files=check_files)


# --------------------------------------------------------------------------------------------
# Parameter resolution per tensor
# --------------------------------------------------------------------------------------------


def evaluate_setting(setting, tensor_name: str, t: float):
    """The value of a setting for one tensor at layer position `t`; None if no filter matches.

    Gradients interpolate as mergekit: with n values, s = t (n - 1), i = int(s),
    value = (1 - f) v[i] + f v[min(i + 1, n - 1)], f = s - i.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], Mapping):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    if isinstance(setting, list):
        s = t * (len(setting) - 1)
        i0 = int(s)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = s - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def _module(name: str) -> str:
    parts = name.split("/")
    return parts[1] if len(parts) > 1 and parts[0] in COLLECTIONS else parts[0]


def layer_key(name: str) -> tuple[int, ...] | None:
    """Integers of the tensor's layer (`params/layer2_1/conv/kernel` -> (2, 1)), or None."""
    module = _module(name)
    if re.search(r"_\d+$", module) is None:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", module))


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Layer position t in [0, 1] of every tensor name (rule in the module docstring)."""
    keys = sorted({k for n in names if (k := layer_key(n)) is not None})
    rank = {k: i for i, k in enumerate(keys)}
    out = {}
    for n in names:
        k = layer_key(n)
        if k is not None:
            out[n] = rank[k] / (len(keys) - 1) if len(keys) > 1 else 1.0
        else:
            out[n] = 1.0 if _module(n) in HEADS else 0.0
    return out


def _resolve(recipe: Recipe, name: str, t: float, p: str, own: Mapping | None):
    for setting in ((own or {}).get(p), recipe.parameters.get(p)):
        if setting is not None:
            value = evaluate_setting(setting, name, t)
            if value is not None:
                return value
    if p not in recipe.method.defaults:
        raise RecipeError(f"parameter {p!r} has no value for tensor {name!r}: no filter "
                          "matched and it has no default (add a catch-all {value: ...})")
    return recipe.method.defaults[p]


@dataclasses.dataclass
class Group:
    """Tensors sharing resolved values: `params` (global) and `model_params` (one per member)."""

    params: dict[str, Any]
    model_params: tuple[dict[str, Any], ...]
    names: list[str] = dataclasses.field(default_factory=list)


def plan(recipe: Recipe, names: Sequence[str]) -> list[Group]:
    """Resolves every parameter for every tensor and groups equal resolutions, in name order.

    Raises RecipeError for a value that is missing (slerp `t` unmatched by the filters) or
    unusable (a normalized linear merge whose weights sum to 0).
    """
    scoped = {s: [p for p in recipe.method.params if PARAMETERS[p][0] == s]
              for s in ("global", "model")}
    positions = layer_positions(names)
    groups: dict[tuple, Group] = {}
    for name in sorted(names):
        t = positions[name]
        params = {p: _resolve(recipe, name, t, p, None) for p in scoped["global"]}
        per_model = tuple({p: _resolve(recipe, name, t, p, m.parameters) for p in scoped["model"]}
                          for m in recipe.members)
        if recipe.method.name == "linear" and params["normalize"]:
            if abs(sum(m["weight"] for m in per_model)) < _DIV_EPS:
                raise RecipeError(f"linear: the weights sum to 0 for tensor {name!r}; cannot "
                                  "normalize (set normalize: false or change the weights)")
        key = (tuple(sorted(params.items())), tuple(tuple(sorted(m.items())) for m in per_model))
        groups.setdefault(key, Group(params, per_model)).names.append(name)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------


def load_flat_safetensors(path: str | os.PathLike) -> Flat:
    """`{'params/a/kernel': array}` from a flat-layout .safetensors file, dtypes as stored."""
    import safetensors.numpy

    try:
        return dict(safetensors.numpy.load_file(str(path)))
    except Exception as e:  # SafetensorError for a cut or foreign file
        raise RecipeError(f"cannot read {path}: not a readable safetensors file "
                          f"({type(e).__name__}: {e})") from None


def save_flat_safetensors(path: str | os.PathLike, flat: Mapping[str, Any],
                          metadata: Mapping[str, str] | None = None) -> None:
    """Writes `{'/'-joined path: array}` to `path` with string metadata (format: flax)."""
    import safetensors.numpy

    # order="C", not ascontiguousarray, which turns 0-d arrays 1-d.
    arrays = {k: np.asarray(v, order="C") for k, v in flat.items()}
    safetensors.numpy.save_file(arrays, str(path),
                                metadata={"format": "flax", **(metadata or {})})


def read_model(path: str | os.PathLike) -> tuple[Flat, dict]:
    """(flat variables, meta) of one input: orbax directory, recipe output or .safetensors."""
    path = Path(path)
    if path.is_dir() and not checkpointing.exists(path):
        path = path / SAFETENSORS_NAME  # a recipe output directory
    if path.is_dir():
        return flatten(checkpointing.load(path)), checkpointing.load_meta(path)
    return load_flat_safetensors(path), {}


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


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def _fn(name: str):
    from mergejax import methods

    return methods.get(name).fn("weight_space")


def _divisor(weights: Sequence[float]) -> float:
    s = float(sum(weights))
    return 1.0 if abs(s) < _DIV_EPS else s


def _merge_group(method: Method, base, members: list, g: Group, key):
    """One mergejax method call on the group's sub-trees (nested dicts); returns a tree."""
    p = g.params
    if method.kind == "slerp":
        return _fn("slerp")(None, members, t=p["t"])
    w = [m["weight"] for m in g.model_params]
    if method.kind == "linear":
        if p["normalize"]:
            return _fn("average")(None, members, weights=w)
        # task arithmetic without a base is lam * sum_t w_t theta_t.
        return _fn("task_arithmetic")(None, members, lam=1.0, weights=w)
    lam, norm = p["lambda"], p["normalize"]
    dens = {m.get("density") for m in g.model_params}
    gams = {m.get("gamma") for m in g.model_params}
    uniform = len(dens) == 1 and len(gams) == 1
    d, gamma, c = next(iter(dens)), next(iter(gams)), w[0]
    equal_w = len(set(w)) == 1
    rescale = "l1" if p.get("rescale") else "none"
    div = _divisor(w) if norm else 1.0
    if method.name == "task_arithmetic":
        return _fn("task_arithmetic")(base, members, lam=lam / div, weights=w)
    if method.name == "breadcrumbs" and uniform:
        return _fn("breadcrumbs")(base, members, lam=lam / div, density=d, gamma=gamma,
                                  scope="tensor", weights=w)
    if method.name == "dare_linear" and uniform and equal_w:
        return _fn("dare")(base, members, key=key, p=1 - d, lam=lam * c / div, rescale=rescale)
    if method.consensus and uniform and equal_w and c > 0:
        # Equal positive weights c: mergekit's weighted election equals TIES' and its divisor
        # (sum of agreeing weights) is c * count, so normalize is the disjoint mean.
        ties = dict(disjoint="mean" if norm else "sum", zero_sign="positive",
                    lam=lam if norm else lam * c)
        if method.name == "ties":
            return _fn("ties")(base, members, density=d, scope="tensor", **ties)
        if method.name == "dare_ties":
            return _fn("dare")(base, members, key=key, p=1 - d, rescale=rescale, merge="ties",
                               density=1.0, scope="tensor", **ties)
        return _fn("breadcrumbs")(base, members, density=d, gamma=gamma, scope="tensor",
                                  merge="ties", **ties)
    return _merge_per_model(method, base, members, g, key)


def _merge_per_model(method: Method, base, members: list, g: Group, key):
    """mergekit's generalized task arithmetic where mergejax's methods take one density and no
    per-model weights: each task vector is sparsified alone with mergejax's sparsifier and its
    own density, then weighted, sign-elected on the weighted values (mergekit#474) and divided
    by the sum of the (agreeing) weights if `normalize`."""
    import jax

    from mergejax.methods import _task_vectors as tv
    from mergejax.methods.breadcrumbs import breadcrumbs_mask
    from mergejax.methods.dare import dare_drop
    from mergejax.methods.ties import trim_topk

    sparse = []
    for i, (tau, mp) in enumerate(zip(tv.task_vectors(base, members), g.model_params)):
        if method.sparsify == "magnitude":
            tau = trim_topk([tau], mp["density"], scope="tensor")[0]
        elif method.sparsify == "random":
            # fold_in(key, i) is the key mergejax's dare gives model i: equal densities drop
            # the same entries on both code paths.
            tau = dare_drop([tau], p=1 - mp["density"], key=[jax.random.fold_in(key, i)],
                            rescale="l1" if g.params.get("rescale") else "none")[0]
        elif method.sparsify == "magnitude_outliers":
            tau = breadcrumbs_mask([tau], density=mp["density"], gamma=mp["gamma"],
                                   scope="tensor")[0]
        sparse.append(flatten(tau))
    w = [m["weight"] for m in g.model_params]
    out = {}
    for name, b in flatten(base).items():
        b = np.asarray(b)
        dt = np.dtype(tv.compute_dtype(b.dtype))
        xs = [np.asarray(s[name], dt) * dt.type(wi) for s, wi in zip(sparse, w)]
        if method.consensus:
            total = xs[0]
            for x in xs[1:]:
                total = total + x
            majority = np.where(total >= 0, 1, -1)  # mergekit: a zero sum elects +
            masks = [np.sign(x) == majority for x in xs]  # zeros never agree
            mixed = sum(np.where(m, x, dt.type(0)) for m, x in zip(masks, xs))
            divisor = sum(m * dt.type(wi) for m, wi in zip(masks, w)).astype(dt)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = sum(xs), dt.type(_divisor(w))
        if g.params["normalize"]:
            mixed = mixed / divisor
        out[name] = (b.astype(dt) + dt.type(g.params["lambda"]) * mixed).astype(b.dtype)
    return unflatten(out)


def _dtype(name: str | None):
    import jax.numpy as jnp

    # numpy alone has no bfloat16; jnp.dtype returns ml_dtypes' numpy dtype for it.
    return None if name is None else np.dtype(jnp.dtype(name))


def merge(recipe: Recipe, *, seed: int = 0) -> tuple[Flat, dict]:
    """Loads the inputs, plans and merges; returns (flat merged variables, info).

    `seed` seeds DARE: group i (in `plan` order) uses `fold_in(jax.random.key(seed), i)`.
    `info` holds the plan summary and the input meta used for the output.
    """
    import jax

    entries = ([recipe.base] if recipe.method.kind == "gta" else []) + recipe.members
    loaded: dict[Path, tuple[Flat, dict]] = {}
    for e in entries:
        if e.path not in loaded:
            loaded[e.path] = read_model(e.path)
    check_same_trees([(e.ref, loaded[e.path][0]) for e in entries])
    in_dtypes = {k: v.dtype for k, v in loaded[entries[0].path][0].items()}

    def cast(flat: Flat) -> Flat:
        return {k: v.astype(_dtype(recipe.dtype)) for k, v in flat.items()} if recipe.dtype \
            else flat

    base = cast(loaded[recipe.base.path][0]) if recipe.method.kind == "gta" else None
    members = [cast(loaded[m.path][0]) for m in recipe.members]
    groups = plan(recipe, sorted(in_dtypes))
    root = jax.random.key(seed)
    out: Flat = {}
    for i, g in enumerate(groups):
        def sub(flat, names=g.names):
            return unflatten({n: flat[n] for n in names})

        merged = _merge_group(recipe.method, None if base is None else sub(base),
                              [sub(m) for m in members], g, jax.random.fold_in(root, i))
        for name, value in flatten(merged).items():
            value = np.asarray(value)
            if recipe.dtype:  # results are in the compute dtype (as mergekit), then stored
                value = value.astype(_dtype(recipe.dtype))
            out[name] = value.astype(in_dtypes[name] if recipe.out_dtype is None
                                     else _dtype(recipe.out_dtype))
    meta = loaded[entries[0].path][1]
    return out, {"groups": groups, "input_meta": meta, "seed": seed}


# --------------------------------------------------------------------------------------------
# Writing the outputs
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _epilog() -> str:
    lines = ["supported merge methods, then their parameters=defaults:"]
    for m in METHODS.values():
        lines.append(f"  {m.name:17s}{m.doc}")
        lines.append(f"  {'':17s}" + ", ".join(f"{p}={m.defaults[p]}" if p in m.defaults
                                               else f"{p} (required)" for p in m.params))
    lines.append("parameters (scope: model = per model or global default; global = top level):")
    for p, (scope, _, _, doc) in PARAMETERS.items():
        lines.append(f"  {p:11s}{scope:7s} {doc}")
    lines += ["values: scalar | gradient [a, b, ...] over layers | [{filter: substr, value: v}, "
              "...] (first match wins, '*' = all)",
              f"top-level keys: {', '.join(TOP_LEVEL)}; dtype/out_dtype: {', '.join(DTYPES)}",
              "inputs: orbax checkpoint directories or .safetensors files of flat Flax variables "
              "('params/dense_0/kernel')"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m mergejax.recipe", epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge Flax checkpoints with a mergekit-style YAML recipe. Writes "
                    f"DIR/{SAFETENSORS_NAME}, DIR/{ORBAX_NAME}/ and DIR/{RECIPE_NAME}.")
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("--out-dir", help="output directory (required unless --dry-run)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of DARE's drops (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, load and print the per-tensor plan; write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (1 with the message on a bad recipe or input)."""
    args = parser().parse_args(argv)
    if not args.dry_run and not args.out_dir:
        parser().error("--out-dir is required (or pass --dry-run)")
    try:
        recipe = load_recipe(args.recipe)
        if args.dry_run:
            names = sorted(read_model(recipe.members[0].path)[0])
            for i, g in enumerate(plan(recipe, names)):
                models = "; ".join(f"{m.ref}: {mp}" for m, mp in zip(recipe.members,
                                                                     g.model_params) if mp)
                print(f"group {i}: {g.params} {models}\n  " + "\n  ".join(g.names))
            return 0
        print(run(recipe, args.out_dir, seed=args.random_seed, overwrite=args.overwrite,
                  source=Path(args.recipe).read_text()))
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
