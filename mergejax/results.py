"""Results rows: `WORKDIR/results.json`, `results.csv` and a printed table.

A row is `{"method", "joint_acc", "task_avg_acc", "per_task_acc": {task: acc}, "seconds", ...}`
(extra keys such as chosen hyperparameters are kept). Files are written under a temporary name
and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _flat(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k != "per_task_acc"}
    for task, acc in row.get("per_task_acc", {}).items():
        out[f"{task}_acc"] = acc
    return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in out.items()}


def write(workdir: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Writes results.json and results.csv into `workdir`."""
    workdir = Path(workdir)
    _atomic_write(workdir / "results.json", json.dumps(list(rows), indent=1, default=float))
    flat = [_flat(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    _atomic_write(workdir / "results.csv", buf.getvalue())


def table(rows: Sequence[dict]) -> str:
    """A markdown table of the rows: method, joint, per-task, task average (%), seconds."""
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("per_task_acc", {})))
    head = ["method", "joint", *tasks, "task avg", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{100 * r['joint_acc']:.1f}"]
        cells += [f"{100 * r['per_task_acc'][t]:.1f}" if t in r.get("per_task_acc", {}) else ""
                  for t in tasks]
        cells += [f"{100 * r['task_avg_acc']:.1f}", f"{r.get('seconds', 0.0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
