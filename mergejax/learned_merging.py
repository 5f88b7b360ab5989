"""Learned merges end to end, for the multitask run: image budget -> method -> BatchNorm reset.

A learned method (FS-Merge, RegMean, distillation; `mergejax.methods.learned`) runs the
endpoints itself on a few training images per task. This module picks those images (a seeded,
class-stratified subset of each task's training images), calls the method and resets the
merged model's BatchNorm statistics when the entry asks for `+reset` or `+repair` (REPAIR's
per-channel correction needs a matching's merge matrices, which a learned merge has not, so
on a learned merge `+repair` is the reset; nets without BatchNorm come back unchanged).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mergejax import methods, model_io, repair
from mergejax.data import Task
from mergejax.entries import entry_hparams, parse_method, split_entry
from mergejax.fsmerge import plot_loss
from mergejax.methods.learned import LearnedMerge
from mergejax.models import Model, Variables
from mergejax.results import result_row
from mergejax.specs import MergeSpec

FIXES = ("repair", "reset")


def is_learned(entry: str) -> bool:
    """True when method entry `entry` names a method of the "learned" family only: a multitask
    run calls its learned function (a method with a matching function is merged by matching).
    False for entries that do not parse (the matching path reports them)."""
    try:
        families = methods.get(split_entry(entry).name).families
    except (ValueError, KeyError):
        return False
    return "learned" in families and "matching" not in families


def learned_merge(name: str, model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                  images: Sequence[np.ndarray], *, key: jax.Array,
                  hparams: Mapping[str, Any] | None = None, fix: str | None = None,
                  batches: Callable[[], Iterable] | None = None,
                  estimator: str = "population") -> LearnedMerge:
    """The learned method `name` on `endpoints` and each task's `images`, then `fix` (None,
    "reset" or "repair": the BatchNorm reset of the merged trees on `batches()`).

    Hyperparameters not given take the method's defaults; unknown ones raise naming the valid
    ones.
    """
    if fix is not None and fix not in FIXES:
        raise ValueError(f"unknown repair {fix!r}; valid: {FIXES} or None")
    method = methods.get(name)
    hp = method.check_hparams("learned", dict(hparams or {}))
    result = method.fn("learned")(model, spec, list(endpoints), list(images), key=key, **hp)
    if not isinstance(result, LearnedMerge):
        raise TypeError(f"learned method {name!r} returned {type(result).__name__}, not a "
                        "LearnedMerge")
    if fix is None:
        return result
    if batches is None:
        raise ValueError(f"repair={fix!r} needs data to recompute statistics on")
    trees = repair.reset_trees(result.model, result.variables, list(batches()),
                               estimator=estimator)
    return LearnedMerge(result.model, trees, result.history)


def learned_row(config, workdir: Path, entry: str, model: Model, spec: MergeSpec,
                endpoints: Sequence[Variables], tasks: Sequence[Task],
                images: Sequence[np.ndarray], repair_batches: Callable[[], Iterable],
                estimator: str, example: np.ndarray, score: Callable[..., dict],
                start: float) -> dict:
    """The results row of learned entry `entry` in a multitask run: merge, reset, export,
    evaluate (each endpoint's head on the merged trunk, `score(heads, model)`), and the loss
    curve `history["loss"]` as `workdir/plots/<entry>_loss.png` when the method has one."""
    parsed = parse_method(entry, "learned")
    if parsed.stop_after:
        raise ValueError(f"method entry {entry!r}: partial merging (@space) is for matching "
                         "methods")
    hparams = entry_hparams(config, parsed, "learned")
    fix = next((v for v in FIXES if v in parsed.variants), None)
    result = learned_merge(parsed.name, model, spec, endpoints, images,
                           key=jax.random.key(config.seed), hparams=hparams, fix=fix,
                           batches=repair_batches, estimator=estimator)
    seconds = time.perf_counter() - start
    heads = list(zip(result.variables, tasks))
    extra: dict[str, Any] = {"hparams": hparams, "images_per_task": [len(x) for x in images]}
    losses = list(result.history.get("loss", ()))
    if losses:
        safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", entry)
        path = Path(workdir) / "plots" / f"{safe}_loss.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_loss({"loss": losses}, str(path),
                  title=f"{entry}: {', '.join(str(len(x)) for x in images)} images per task")
        extra["loss_plot"] = str(path)
        extra["final_loss"] = float(losses[-1])
    if config.export.formats:
        model_io.export(Path(workdir) / "export", entry, result.model, result.variables,
                        config.export.formats, example,
                        meta={"tasks": [list(t) for t in tasks]})
    return result_row(entry, score(heads, result.model), seconds, **extra)
