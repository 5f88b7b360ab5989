"""Parameter resolution: the value of every parameter for every tensor.

Values (mergekit `evaluate_setting`): a scalar; a gradient (list of numbers, piecewise-linear over
the layer position t in [0, 1]); or a list of `{filter, value}` conditions whose first entry with
`filter` a substring of the tensor name ('/'-joined, e.g. 'params/dense_1/kernel'; no filter or
'*' matches all) wins. A model's own value wins over the global one, which wins over the method
default; a condition list with no match falls through.

Layer position t: the module name is the first path component after the collection (`params`,
`batch_stats`). A name ending in `_<digits>` is a layer, keyed by all its integers (`layer2_1` ->
(2, 1), `dense_3` -> (3,); `conv_3` and `bn_3` share layer (3,)). The L distinct keys, sorted,
get t = idx / (L - 1) (t = 1 if L = 1). Other tensors get mergekit's pre/post-layer values:
t = 1 for heads (`linear`, `fc`, `classifier`, `head`, `lm_head`), t = 0 otherwise (stems such
as `conv1`, `bn1`). Names whose numbering restarts (torchvision `classifier_0` after
`features_41`) are not depth-ordered: give such tensors filters.

PyTorch / Hugging Face names ('.'-joined, no '/': `model.layers.3.mlp.up_proj.weight`) are keyed
by their first integer component (3); the others get t = 0 if they contain `embed` (mergekit's
pre-layer weights) and t = 1 otherwise (`model.norm`, `lm_head`: post-layer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mergejax.recipe.schema import DIV_EPS, PARAMETERS, RecipeError
from mergejax.recipe.validate import Recipe

HEADS = ("linear", "fc", "classifier", "head", "lm_head")
COLLECTIONS = ("params", "batch_stats")


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
    if "/" not in name and "." in name:  # torch naming
        ints = [p for p in name.split(".") if p.isdigit()]
        return (int(ints[0]),) if ints else None
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
        elif "/" not in n and "." in n:  # torch naming: embeddings first, the rest after
            out[n] = 0.0 if "embed" in n else 1.0
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
            if abs(sum(m["weight"] for m in per_model)) < DIV_EPS:
                raise RecipeError(f"linear: the weights sum to 0 for tensor {name!r}; cannot "
                                  "normalize (set normalize: false or change the weights)")
        key = (tuple(sorted(params.items())), tuple(tuple(sorted(m.items())) for m in per_model))
        groups.setdefault(key, Group(params, per_model)).names.append(name)
    return list(groups.values())
