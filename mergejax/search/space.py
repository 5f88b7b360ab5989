"""The search space: per block, a merge method and its weights, densities and lambda.

AutoMerge's space (two source models A, B): per block a categorical method in {ties,
task_arithmetic, dare_linear, dare_ties}, one weight w in [0, 1] with w_A = w, w_B = 1 - w, and
densities d_A, d_B in [0.5, 1]. With N != 2 models every model has its own weight. A range
whose ends are equal is a fixed value, not a searched one, so a space of single points is
deterministic. Every parameter is sampled on every trial (also a density the chosen method
ignores): the space keeps one fixed dimension, which CMA-ES needs.

A point of the space becomes a recipe: one mergekit document per block (`to_recipe`), read by
`mergejax.recipe` exactly as `python -m mergejax.recipe` reads the YAML written from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from mergejax.recipe.schema import METHODS

DEFAULT_METHODS = ("ties", "task_arithmetic", "dare_linear", "dare_ties")
Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Blocks (`{block: [flat tensor names]}`), the methods to choose from and the ranges of
    weight, density and lambda (closed intervals; equal ends fix the value)."""

    blocks: Mapping[str, Sequence[str]]
    num_models: int
    methods: tuple[str, ...] = DEFAULT_METHODS
    weight: Range = (0.0, 1.0)
    density: Range = (0.5, 1.0)
    lam: Range = (1.0, 1.0)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS or METHODS[m].kind == "slerp"]
        if unknown or not self.methods:
            raise ValueError(f"search methods {unknown or '()'} are not searchable; choose from "
                             f"{[m for m, v in METHODS.items() if v.kind != 'slerp']}")
        for name, (lo, hi) in (("weight", self.weight), ("density", self.density),
                               ("lambda", self.lam)):
            if not lo <= hi:
                raise ValueError(f"search range {name} {(lo, hi)}: low end above high end")
        if not (0.0 < self.density[0] and self.density[1] <= 1.0):
            raise ValueError(f"search density range {self.density} must lie in (0, 1]")
        if self.num_models < 1:
            raise ValueError("a search needs at least one fine-tuned model")

    def _float(self, trial, name: str, rng: Range) -> float:
        lo, hi = rng
        return float(lo) if lo == hi else trial.suggest_float(name, lo, hi)

    def sample(self, trial) -> dict[str, Any]:
        """One point from an optuna trial: `{"<block>/method": m, "<block>/w0": .., "<block>/d0":
        .., "<block>/lambda": ..}` (every block, every parameter)."""
        point: dict[str, Any] = {}
        for block in self.blocks:
            point[f"{block}/method"] = (self.methods[0] if len(self.methods) == 1 else
                                        trial.suggest_categorical(f"{block}/method",
                                                                  list(self.methods)))
            if self.num_models == 2:  # AutoMerge: w_A = w, w_B = 1 - w
                w = self._float(trial, f"{block}/w", self.weight)
                point[f"{block}/w0"], point[f"{block}/w1"] = w, 1.0 - w
            else:
                for i in range(self.num_models):
                    point[f"{block}/w{i}"] = self._float(trial, f"{block}/w{i}", self.weight)
            for i in range(self.num_models):
                point[f"{block}/d{i}"] = self._float(trial, f"{block}/d{i}", self.density)
            point[f"{block}/lambda"] = self._float(trial, f"{block}/lambda", self.lam)
        return point

    def to_recipe(self, point: Mapping[str, Any], base: str, models: Sequence[str]
                  ) -> list[dict]:
        """The recipe documents (mergekit schema + `tensors`) of `point`, one per block, reading
        `base` (task vectors are taken from it) and the fine-tuned `models` (paths)."""
        docs = []
        everything = [n for names in self.blocks.values() for n in names]
        for block, names in self.blocks.items():
            method = METHODS[point[f"{block}/method"]]
            members = []
            for i, ref in enumerate(models):
                params = {"weight": float(point[f"{block}/w{i}"])}
                if "density" in method.params:
                    params["density"] = float(point[f"{block}/d{i}"])
                members.append({"model": ref, "parameters": params})
            doc: dict[str, Any] = {"merge_method": method.name}
            if method.kind == "gta":
                doc["base_model"] = base
                doc["parameters"] = {"lambda": float(point[f"{block}/lambda"])}
            doc["models"] = members
            doc["tensors"] = selectors(names, everything)
            docs.append(doc)
        return docs


def selectors(names: Sequence[str], everything: Sequence[str]) -> list[str]:
    """Short `tensors` substrings selecting `names` and nothing else of `everything`: a module
    prefix (`params/layer1_0/`) where every tensor it matches is in `names`, else full names."""
    mine = set(names)
    out = []
    for n in sorted(names):
        parts = n.split("/")
        s = "/".join(parts[:2]) + "/" if len(parts) > 2 else n
        if not all(m in mine for m in everything if s in m):
            s = n
        if s not in out:
            out.append(s)
    return out


class NumpyTrial:
    """An optuna-like trial drawing uniformly from a numpy generator (`space.sample(
    NumpyTrial(rng))`): random points without a study, for benchmarks and tests."""

    def __init__(self, rng):
        self.rng = rng

    def suggest_float(self, name: str, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def suggest_categorical(self, name: str, choices):
        return choices[self.rng.integers(len(choices))]
