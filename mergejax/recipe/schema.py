"""What a recipe may say: the merge methods, their parameters (scope, type, range), top-level keys
and dtypes. Tables only; `validate` checks recipes against them and `cli` prints them in --help."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class RecipeError(ValueError):
    """A recipe that cannot run: unsupported method/parameter, bad value, bad or missing input."""


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
    Method("ties", "gta", ("weight", "density", "lambda", "normalize", "int8_mask", "scope"),
           {**_GTA, "normalize": True, "scope": "tensor"}, "magnitude", True,
           "magnitude trim (per tensor, or scope: global over the whole model), sign "
           "election, disjoint merge (mergejax ties)"),
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
    Method("consensus", "gta", ("lambda", "k", "mask_lambda", "merged", "density"),
           {"lambda": 1.0, "k": 2, "mask_lambda": 0.6, "merged": "sum", "density": 0.2},
           doc="Consensus merging (TALL masks, Wang et al. 2024): base + lambda * tau_MTL "
               "where >= k tasks' TALL masks agree; tau_MTL = sum of task vectors or TIES "
               "(merged: ties, whole-model trim) (mergejax consensus)"),
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
    "k": ("global", "integer", (0, None, False, False),
          "consensus: fewest agreeing TALL masks that keep an entry (integer >= 0)"),
    "mask_lambda": ("model", "number", (0, None, False, False),
                    "consensus: the task's TALL mask threshold lambda_t >= 0"),
    "merged": ("global", "choice", ("sum", "ties"),
               "consensus: tau_MTL = sum of task vectors or TIES (whole-model trim, density)"),
    # mergejax extension: mergekit trims per tensor; the TIES paper over the whole model (exact
    # out of core too: a threshold pass before the merge pass, `mergejax.recipe.thresholds`).
    "scope": ("global", "choice", ("tensor", "global"),
              "ties: magnitude trim per tensor (mergekit) or over the whole model (paper)"),
}
DTYPES = ("float32", "float16", "bfloat16")
# `tensors` is mergejax's extension for multi-document recipes (one mergekit recipe per block, as
# AutoMerge writes them): the substrings selecting the tensors this document merges.
TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "tensors")
MERGEKIT_ONLY = ("slices", "modules", "tokenizer", "tokenizer_source", "chat_template")
DIV_EPS = 1e-8  # mergekit: |sum of weights| below this divides by 1


def param_range(method: str, name: str):
    """(lo, hi, lo_open, hi_open) of a numeric parameter, or None for any finite value."""
    if name == "density":
        return (0, 1, False, False) if method.startswith("dare") else (0, 1, True, False)
    return PARAMETERS[name][2]
