"""The matching run's diagnostics: interpolation curves per alignment and match quality.

`matching_sections` turns a run's endpoints, statistics and each matching method's
`(merge, unmerge)` pairs into `Section`s (numbers and matplotlib figures):

- `interpolation` (two models only): for "naive" and every method of `curve_methods` the run
  merged with (all spaces: partial zips have no line), loss and accuracy at `points` values of
  t along the line (`mergejax.diagnostics.curves`), and the barrier heights; figures
  `interpolation_loss` and `interpolation_accuracy` (joint and per task).
- `match_quality`: per feature space and method, the mean matched correlation, the share of
  merges within one model and the merged features' correlation to each endpoint's
  (`mergejax.diagnostics.match_quality`); figure `match_quality`.

`write_matching_diagnostics` is the multitask kind's hook: it reads `config.diagnostics` and
hands the sections to `mergejax.diagnostics.report.write_sections`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from mergejax import specs
from mergejax.config_lib import DIAGNOSTICS
from mergejax.data import Task
from mergejax.diagnostics import curves as curves_lib
from mergejax.diagnostics import match_quality as mq
from mergejax.diagnostics.section import Section
from mergejax.kernels.statistics import Moments
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec

NAIVE = "naive"  # the line without alignment (plain averaging at t = 1/2)


def _figure(ncols: int, title: str, legend_width: float = 0.0):
    """A Figure (no pyplot state; rendered by Agg on save) with `ncols` side-by-side axes and
    `legend_width` inches to spare for a legend at the right."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * ncols + legend_width, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(title)
    return fig, axes


def _curve_figure(curves: Mapping[str, curves_lib.Curve], kind: str, shared_head: bool):
    """Loss ("loss") or accuracy ("acc") against t: joint, then one panel per task. The legend
    gives each line's barrier (one shared head) or its joint value at t = 1/2 (per-task
    heads, whose ends are not comparable models)."""
    first = next(iter(curves.values()))
    tasks = [] if shared_head else list(first.per_task_acc)  # one head: the same as joint
    loss = kind == "loss"
    fig, axes = _figure(1 + len(tasks), "Loss along the line between the models" if loss
                        else "Accuracy along the line between the models",
                        legend_width=0.0 if tasks else 3.0)
    scale = 1.0 if loss else 100.0
    for name, c in curves.items():
        key = "joint_loss" if loss else "joint_acc"
        unit = "" if loss else " %" if not shared_head else " pts"
        mid = np.flatnonzero(np.isclose(c.ts, 0.5))
        if shared_head:
            label = f"{name} (barrier {c.barriers()[key] * scale:.3g}{unit})"
        elif mid.size:
            label = f"{name} (t=½: {getattr(c, key)[mid[0]] * scale:.3g}{unit})"
        else:
            label = name
        series = [c.joint_loss if loss else c.joint_acc] + [
            (c.per_task_loss if loss else c.per_task_acc)[t] for t in tasks]
        for ax, values in zip(axes, series):
            ax.plot(c.ts, np.asarray(values) * scale, marker="o", markersize=3, label=label)
    for ax, panel in zip(axes, ["joint"] + tasks):
        ax.set_title(panel.replace("_", " "))
        ax.set_xlabel("t (0 = model A, 1 = model B)")
        ax.set_ylabel("cross-entropy (nats)" if loss else "accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if tasks:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3),
                   fontsize="small")
    else:  # one panel: a column at the right fits the labels
        fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return fig


def _quality_figure(quality: Mapping[str, Mapping[str, dict]]):
    """Grouped bars per feature space: matched correlation, within-model share, and the mean
    over models of the merged-to-endpoint correlation, one bar colour per method."""
    methods = list(quality)
    spaces = list(dict.fromkeys(s for q in quality.values() for s in q))
    fig, axes = _figure(3, "Match quality per feature space")
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(spaces))
    panels = [("matched_corr", "matched correlation", "correlation", 1.0),
              ("within_model_share", "merges within one model", "share of merges (%)", 100.0),
              ("merged_to_endpoint", "merged vs endpoint features", "correlation", 1.0)]
    for ax, (key, title, ylabel, scale) in zip(axes, panels):
        for j, method in enumerate(methods):
            vals = [np.mean(quality[method][s][key]) * scale if s in quality[method] else 0.0
                    for s in spaces]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=method)
        ax.set_title(title)
        ax.set_xticks(x, spaces, rotation=45, ha="right", fontsize="small")
        ax.set_xlabel("feature space")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5),
               fontsize="small")
    return fig


def curve_section(curves: Mapping[str, curves_lib.Curve], *, bn_reset: bool,
                  estimator: str, shared_head: bool) -> Section:
    """The `interpolation` section of finished curves (`{line name: Curve}`); `shared_head`:
    the endpoints share one label space (one interpolated head, not one head per task)."""
    first = next(iter(curves.values()))
    numbers = {"t": [float(t) for t in first.ts], "bn_reset": bn_reset,
               "shared_head": shared_head,
               "estimator": estimator if bn_reset else "",
               "methods": {name: c.numbers() for name, c in curves.items()}}
    text = ("Joint and per-task loss and accuracy at evenly spaced t along "
            "θ(t) = (1−t)·θ_A + t·θ_B, before alignment (naive) and after each method's "
            "(t = ½ is the method's merge; see `mergejax.diagnostics.curves`). The barrier is "
            "the largest excess of the loss over the straight line between its ends (Git "
            "Re-Basin)." + (" BatchNorm statistics were recomputed at every point." if bn_reset
                           else "") + (
            "" if shared_head else " Each task keeps its own model's head, so near t = 0 task "
            "b's head sits on model A's trunk (and the reverse): the joint curve is high at "
            "both ends, and the barriers in diagnostics.json are not the picture's point; the "
            "per-task panels show how far each task survives along the line."))
    return Section("interpolation", "Interpolation curves", numbers,
                   {"interpolation_loss": _curve_figure(curves, "loss", shared_head),
                    "interpolation_accuracy": _curve_figure(curves, "acc", shared_head)}, text)


def quality_section(quality: Mapping[str, Mapping[str, dict]]) -> Section:
    """The `match_quality` section of `{method: {space: space_quality}}`."""
    numbers = {"methods": {m: {"spaces": q, "mean": {
        "matched_corr": float(np.mean([v["matched_corr"] for v in q.values()])),
        "within_model_share": float(np.mean([v["within_model_share"] for v in q.values()])),
        "merged_to_endpoint": [float(x) for x in np.mean(
            [v["merged_to_endpoint"] for v in q.values()], axis=0)]}}
        for m, q in quality.items() if q}}
    text = ("Per feature space: the mean correlation of the features each method matched, the "
            "share of its merges within one model (ZipIt!), and how well the merged features "
            "correlate with the endpoint features they replace (on the statistics' data).")
    return Section("match_quality", "Match quality", numbers,
                   {"match_quality": _quality_figure(quality)}, text)


def matching_sections(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                      tasks: Sequence[Task], aligned: Mapping[str, Mapping[str, tuple]],
                      images: np.ndarray, labels: np.ndarray, *,
                      statistics: Mapping[str, Moments] | None = None,
                      reset_batches: Sequence[np.ndarray] | None = None,
                      estimator: str = "population", settings: Mapping | None = None,
                      batch_size: int = 256) -> list[Section]:
    """The diagnostics sections of a matching run.

    Args:
      model, spec, endpoints, tasks: the run's architecture, merge spec, N endpoints and their
        tasks.
      aligned: `{method name: {space: (merge, unmerge)}}`, one full matching per method (the
        first full entry of that method in the run).
      images, labels: the evaluation split, (M, H, W, C) and (M,) global labels.
      statistics: `{space: Moments}` of the endpoints (None: no match-quality section).
      reset_batches: batches for the BatchNorm reset at every curve point (BatchNorm models).
      estimator: the reset's estimator, as the run's (`config.repair.estimator`).
      settings: `config.diagnostics` fields (`curves`, `points`, `curve_methods`,
        `match_quality`, optional `chunk`: curve points per vmapped call); missing ones take
        `config_lib.DIAGNOSTICS`.
      batch_size: evaluation batch size.

    Returns:
      `interpolation` (two endpoints and `curves` on) and `match_quality` (statistics given and
      `match_quality` on) sections, those that apply.
    """
    s = {**DIAGNOSTICS, **dict(settings or {})}
    sections = []
    full = {name: t for name, t in aligned.items() if set(spec.space_names) <= set(t)}
    if s["curves"] and len(endpoints) == 2:
        lines = {name: None if name == NAIVE else full[name] for name in s["curve_methods"]
                 if name == NAIVE or name in full}
        has_bn = "batch_stats" in endpoints[0]
        found = {name: curves_lib.interpolation_curve(
            model, spec, endpoints, t, tasks, images, labels, points=int(s["points"]),
            reset_batches=reset_batches if has_bn else None, estimator=estimator,
            batch_size=batch_size, chunk=int(s.get("chunk", 0))) for name, t in lines.items()}
        if found:
            sections.append(curve_section(found, bn_reset=has_bn, estimator=estimator,
                                          shared_head=len({tuple(t) for t in tasks}) == 1))
    if s["match_quality"] and statistics:
        # "average" is the naive matching under another name
        matchings = {NAIVE: specs.identity_transforms(spec, len(endpoints)),
                     **{k: v for k, v in aligned.items() if k != "average"}}
        quality = {name: mq.match_quality(statistics, t, len(endpoints))
                   for name, t in matchings.items()}
        quality = {name: q for name, q in quality.items() if q}
        if quality:
            sections.append(quality_section(quality))
    return sections


def write_matching_diagnostics(config, workdir: str | os.PathLike, model: Model,
                               spec: MergeSpec, endpoints: Sequence[Variables],
                               tasks: Sequence[Task], aligned: Mapping[str, Mapping[str, tuple]],
                               statistics, images: np.ndarray, labels: np.ndarray,
                               repair_batches: Callable[[], Iterable[np.ndarray]],
                               estimator: str) -> list[Path]:
    """The multitask kind's hook: `matching_sections` under `config.diagnostics`, written with
    `report.write_sections`; returns the PNG paths ([] when diagnostics are off).

    `statistics` is the run's `StatisticsCache` (spaces not collected yet cost one pass).
    """
    from mergejax.diagnostics import report

    if not report.enabled(config):
        return []
    s = report.settings(config)
    try:
        stats = None
        if s["match_quality"]:  # spaces no method observed cost one pass over the data here
            stats = statistics.get([sp.name for sp in spec.spaces if sp.tap is not None])
        has_bn = "batch_stats" in endpoints[0]
        reset = [np.asarray(x) for x in repair_batches()] if has_bn and s["curves"] else None
        sections = matching_sections(model, spec, endpoints, tasks, aligned, images, labels,
                                     statistics=stats, reset_batches=reset,
                                     estimator=estimator, settings=s,
                                     batch_size=config.data.eval_batch_size)
        paths = report.write_sections(workdir, sections) if sections else []
    except Exception:  # diagnostics never cost a run its results: say so and go on
        logging.exception("matching diagnostics failed; results are unaffected")
        return []
    logging.info("diagnostics: %d plots in %s", len(paths), Path(workdir) / "plots")
    return paths
