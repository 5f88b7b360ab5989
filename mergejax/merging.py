"""Matching merges end to end, shared by `mergejax.merge` and the multitask run.

match (a registered method on collected statistics) -> apply_merge -> BatchNorm reset / REPAIR.
Methods stay pure: this module is where statistics are collected (only when the method reads
activations) and where the merged model is repaired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from mergejax import methods, repair, specs
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec
from mergejax.statistics import StatisticsCache

REPAIRS = ("repair", "reset")


def match(method: str, spec: MergeSpec, endpoints: Sequence[Variables],
          statistics: StatisticsCache | None, *, spaces: Sequence[str], key: jax.Array,
          hparams: Mapping[str, Any] | None = None) -> dict[str, tuple]:
    """`{space: (merge (n_out, N*n), unmerge (N*n, n_out))}` from matching method `method`.

    Hyperparameters not given take the method's defaults; unknown ones raise naming the valid
    ones. Statistics are read from `statistics` only if the method needs activations.
    """
    m = methods.get(method)
    fn = m.fn("matching")
    hp = m.check_hparams("matching", dict(hparams or {}))
    stats = {}
    if m.needs_activations(hp):
        if statistics is None:
            raise ValueError(f"method {method!r} needs activation statistics: give data")
        stats = statistics.get(spaces)
    return fn(spec, list(endpoints), stats, key=key, spaces=list(spaces), **hp)


def merge_endpoints(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                    transforms: Mapping[str, tuple], *, tails: str = "per_model",
                    fix: str | None = None, batches: Callable[[], Iterable] | None = None,
                    estimator: str = "population") -> list[Variables]:
    """`apply_merge`, then `fix`: None, "reset" (BatchNorm reset) or "repair" (REPAIR, which
    for BatchNorm networks is exactly the reset). Returns N trees (model i's tail on the
    merged trunk; all the same tree with tails="average")."""
    if fix is not None and fix not in REPAIRS:
        raise ValueError(f"unknown repair {fix!r}; valid: {REPAIRS} or None")
    merged = specs.apply_merge(spec, endpoints, transforms, tails=tails)
    if fix is None:
        return merged
    if batches is None:
        raise ValueError(f"repair={fix!r} needs data to recompute statistics on")
    if fix == "reset":  # trees without BatchNorm come back unchanged
        return repair.reset_trees(model, merged, list(batches()), estimator=estimator)
    # for BatchNorm nets `repair.repair` is exactly the reset (one per shared trunk)
    return repair.repair(model, spec, endpoints, merged, transforms, list(batches()),
                         estimator=estimator)
