"""Validation curves of swept hyperparameters: what a weight-space run's grid search saw.

A finetune run scores every candidate of a method's grid (`mergejax.finetune.candidate_grid`)
on the validation split and keeps the best. `sweep_section` turns those scores into curves:
per method entry and per hyperparameter that varied, validation accuracy against its value,
each point the best over the other hyperparameters (a profile; with one searched
hyperparameter it is the plain curve). Methods that choose per task (TALL masks) also get one
curve per task.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from mergejax.diagnostics.section import Section

# a validation score: `evaluation.accuracies` output {"joint_acc", "task_avg_acc",
# "per_task_acc": {task: acc}}, accuracies in [0, 1]
Candidate = tuple[Mapping, Mapping]
# axis labels of the searched hyperparameters (methods' grids): (method, name) first, then
# name; others show their name
AXIS_LABELS = {("tall_masks", "lam"): "λ, mask threshold (unitless)",
               "lam": "λ, task-vector scale (unitless)",
               "p": "p, drop probability (fraction)",
               "density": "density, kept fraction",
               "t": "t, interpolation weight (unitless)"}


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def swept_names(candidates: Sequence[Candidate]) -> list[str]:
    """The hyperparameters whose value differs between candidates, in the grid's order."""
    if not candidates:
        return []
    first = candidates[0][0]
    return [k for k in first if any(hp.get(k) != first[k] for hp, _ in candidates[1:])]


def profile(candidates: Sequence[Candidate], name: str) -> dict:
    """Validation accuracy against hyperparameter `name`: `{"values": [v, ...],
    "task_avg_acc": [...], "per_task_acc": {task: [...]}}`, each point the best over the
    candidates with that value (values in first-seen order, i.e. the grid's)."""
    values = list(dict.fromkeys(hp[name] for hp, _ in candidates))
    tasks = list(dict.fromkeys(t for _, s in candidates for t in (s.get("per_task_acc") or {})))

    def best(value, get):
        scores = [_finite(get(s)) for hp, s in candidates if hp[name] == value]
        scores = [x for x in scores if x is not None]
        return max(scores) if scores else None

    return {"values": values,
            "task_avg_acc": [best(v, lambda s: s.get("task_avg_acc")) for v in values],
            "per_task_acc": {t: [best(v, lambda s, t=t: (s.get("per_task_acc") or {}).get(t))
                                 for v in values] for t in tasks}}


def sweep_numbers(candidates: Sequence[Candidate]) -> dict:
    """The numbers of one entry's sweep: the varied hyperparameters, every candidate's
    validation accuracies and the profile of each varied hyperparameter."""
    names = swept_names(candidates)
    return {
        "hparams": names,
        "candidates": [{"hparams": {k: hp[k] for k in names},
                        "task_avg_acc": _finite(s.get("task_avg_acc")),
                        "joint_acc": _finite(s.get("joint_acc")),
                        "per_task_acc": {t: _finite(a)
                                         for t, a in (s.get("per_task_acc") or {}).items()}}
                       for hp, s in candidates],
        "profiles": {k: profile(candidates, k) for k in names},
    }


def _numeric(values) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _line(ax, x, ys, **kw) -> None:
    """Accuracies `ys` (in [0, 1], None where missing) in % against `x`."""
    pts = [(a, 100 * y) for a, y in zip(x, ys) if y is not None]
    if pts:
        ax.plot(*zip(*pts), **kw)


def sweep_figure(entry: str, numbers: dict, per_task: bool = False):
    """One panel per varied hyperparameter: validation accuracy (%) against its value (task
    average, and per task when the method chooses per task); the best value is marked."""
    from matplotlib.figure import Figure

    names = numbers["hparams"]
    width, height = 4.2 * len(names), 3.4
    fig = Figure(figsize=(width, height), dpi=100)
    # fixed margins (inches): the labels are known, and a layout engine doubles the drawing
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.55 / height,
                        top=1 - 0.35 / height, wspace=0.35)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        prof = numbers["profiles"][name]
        values = prof["values"]
        x = [float(v) for v in values] if _numeric(values) else list(range(len(values)))

        if per_task:
            for t, ys in prof["per_task_acc"].items():
                _line(ax, x, ys, linestyle="--", linewidth=1, marker=".", label=t)
        _line(ax, x, prof["task_avg_acc"], color="black", linewidth=2, marker="o",
              label="task average")
        avg = [(-1.0 if y is None else y) for y in prof["task_avg_acc"]]
        if max(avg) >= 0:
            i = int(np.argmax(avg))
            ax.plot([x[i]], [100 * avg[i]], marker="*", markersize=14, color="tab:red",
                    linestyle="none", label="best task average")
        if not _numeric(values):
            ax.set_xticks(x, [str(v) for v in values])
        method = re.split(r"[+\[@]", entry)[0]
        ax.set_xlabel(AXIS_LABELS.get((method, name), AXIS_LABELS.get(name, f"{name} (unitless)")))
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{entry}: {name}" + (" (chosen per task)" if per_task else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)  # one legend: every panel draws the same series
    return fig


def figure_stem(entry: str) -> str:
    """`sweep_<entry>` as a plain file name (characters other than letters, digits and
    `_.+=-` become `_`)."""
    return "sweep_" + re.sub(r"[^A-Za-z0-9_.+=-]", "_", entry)


def sweep_section(sweeps: Mapping[str, Sequence[Candidate]],
                  per_task: Mapping[str, bool] | None = None) -> Section | None:
    """Section "sweeps" from `{entry: [(hparams, validation scores), ...]}` (every candidate
    an entry scored); entries with one candidate (nothing searched) are listed but not drawn.
    `per_task[entry]`: the method chooses per task (draw per-task curves). None if no entry
    searched anything."""
    per_task = dict(per_task or {})
    numbers, figures = {}, {}
    for entry, candidates in sweeps.items():
        if not candidates:
            continue
        numbers[entry] = sweep_numbers(candidates)
        if numbers[entry]["hparams"]:
            figures[figure_stem(entry)] = sweep_figure(entry, numbers[entry],
                                                       per_task.get(entry, False))
    if not figures:
        return None
    text = ("Validation accuracy of every hyperparameter value each method tried (each point "
            "the best over the method's other searched hyperparameters); the run keeps the "
            "best on validation and reports it on test.")
    return Section("sweeps", "Hyperparameter sweeps on the validation split", numbers,
                   figures, text)
