"""Results rows: `WORKDIR/results.json`, `results.csv` and a printed table.

A row is `{"method", "joint_acc", "task_avg_acc", "per_task_acc": {task: acc}, "seconds", ...}`
(extra keys such as chosen hyperparameters are kept). A method that failed gives a row with an
`error` field (its message) and null accuracies. A run stamps every row with
`"run": {"run_id", "started", "version"}` (columns `run_id`, `run_started`, `run_version` in
the CSV). Files are strict JSON (non-finite numbers become null) written under a temporary name
and renamed (`mergejax.io.atomic`), so a reader never sees half a file; a run rewrites them
after every finished row.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from mergejax.io.atomic import atomic_write_text

FILES = ("results.json", "results.csv")


def clean(value):
    """`value` as strict JSON data: numpy scalars / arrays to Python, NaN and inf to None."""
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def to_json(value, **kwargs) -> str:
    """Strict JSON text of `value` (`clean`ed; never NaN)."""
    return json.dumps(clean(value), allow_nan=False, **kwargs)


def _flat(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in ("per_task_acc", "run")}
    for task, acc in (row.get("per_task_acc") or {}).items():
        out[f"{task}_acc"] = acc
    for k, v in (row.get("run") or {}).items():
        out[f"run_{k.removeprefix('run_')}"] = v
    return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in out.items()}


def write(workdir: str | os.PathLike, rows: Sequence[dict], run: Mapping | None = None) -> None:
    """Writes results.json and results.csv into `workdir` (each atomically).

    `run` (`{"run_id", "started", "version"}`) is stamped on every row lacking one.
    """
    workdir = Path(workdir)
    rows = [clean({**r, "run": dict(run)} if run is not None and "run" not in r else r)
            for r in rows]
    atomic_write_text(workdir / "results.json", json.dumps(rows, indent=1, allow_nan=False))
    flat = [_flat(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r)) or ["method"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(workdir / "results.csv", buf.getvalue())


def move_aside(workdir: str | os.PathLike) -> list[Path]:
    """Renames a previous run's results.json / .csv to results.previous.json / .csv (replacing
    older ones), so no file of the new run's name is stale; returns the new paths."""
    moved = []
    for name in FILES:
        old = Path(workdir) / name
        if old.exists():
            new = old.with_name(name.replace("results.", "results.previous."))
            os.replace(old, new)
            moved.append(new)
    return moved


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def table(rows: Sequence[dict]) -> str:
    """A markdown table of the rows: method, joint, per-task, task average (%), seconds."""
    tasks = list(dict.fromkeys(t for r in rows for t in (r.get("per_task_acc") or {})))
    head = ["method", "joint", *tasks, "task avg", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            cells = [r["method"], "error", *[""] * len(tasks), "",
                     f"{r.get('seconds') or 0.0:.1f}"]
        else:
            per_task = r.get("per_task_acc") or {}
            cells = [r["method"], _pct(r.get("joint_acc"))]
            cells += [_pct(per_task.get(t)) for t in tasks]
            cells += [_pct(r.get("task_avg_acc")), f"{r.get('seconds') or 0.0:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def result_row(method: str, metrics: dict, seconds: float, **extra) -> dict:
    """One results row: the method's name, its accuracies, seconds and extra fields."""
    return {"method": method, **metrics, "seconds": round(seconds, 3), **extra}


def error_row(method: str, error: BaseException | str, seconds: float = 0.0, **extra) -> dict:
    """The row of a method that failed: null accuracies and `error` (`"Type: message"`)."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"method": method, "joint_acc": None, "task_avg_acc": None, "per_task_acc": {},
            "seconds": round(seconds, 3), "error": message, **extra}


class RowLog:
    """The rows of a run as they finish: each is kept and handed to `emit` (which writes the
    results files), so a later failure never loses a finished row."""

    def __init__(self, emit: Callable[[dict], None] | None = None):
        self.rows: list[dict] = []
        self.emit = emit

    def add(self, row: dict) -> None:
        """Keeps `row` and emits it."""
        self.rows.append(row)
        if self.emit is not None:
            self.emit(row)

    def add_entry(self, entry: str, make_row: Callable[[float], dict]) -> None:
        """Adds `make_row(start)` for method entry `entry` (`start`: its perf_counter start);
        if it raises, an `error_row` instead, so the other entries still run."""
        start = time.perf_counter()
        try:
            row = make_row(start)
        except Exception as e:  # one failing method does not lose the others' rows
            logging.exception("%s failed", entry)
            row = error_row(entry, e, time.perf_counter() - start)
        self.add(row)
        logging.info("%s: %s", entry, row)
