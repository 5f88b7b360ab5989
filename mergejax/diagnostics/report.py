"""Writing diagnostics: pictures to `WORKDIR/plots/`, numbers to `diagnostics.json`, a report.

A kind hands its `Section`s to `write_sections` as soon as they are computed (every file is
written atomically, so a killed run never leaves half a picture); the run calls `write_report`
once at the end, which reads back what the sections left and writes `WORKDIR/report.md`: the
results table, then every section's title, text and pictures, then any other picture in
`plots/` (FS-Merge's loss curves, the recipe search's best-so-far curve).

Files of a run:
  - `plots/<stem>.png`: one per figure (Agg backend, the figure's own size and dpi);
  - `diagnostics.json`: `{section name: numbers}`, strict JSON, every number finite;
  - `diagnostics.index.json`: `[{name, title, text, figures: [stem, ...]}]` in write order,
    what `write_report` needs to lay the sections out;
  - `report.md`.
`move_aside` (called by the run before the kind starts) renames a previous run's
diagnostics.json and plots/ to `diagnostics.previous.json` and `plots.previous/`, so a report
never shows another run's pictures.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mergejax import results
from mergejax.config_lib import DIAGNOSTICS
from mergejax.diagnostics.section import Section
from mergejax.io.atomic import atomic_file, atomic_write_text

NUMBERS_FILE = "diagnostics.json"
INDEX_FILE = "diagnostics.index.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
# a figure stem becomes a file name: no path separators, no hidden names
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


def settings(config) -> dict:
    """`config.diagnostics` over the defaults (`config_lib.DIAGNOSTICS`): a config built
    without the section, or setting only some fields, gets the defaults for the rest."""
    given = config.get("diagnostics") if hasattr(config, "get") else None
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
    return {**DIAGNOSTICS, **given}


def enabled(config, part: str | None = None) -> bool:
    """Whether diagnostics are on for `config` (and, given `part`, e.g. "task_vectors", that
    part too)."""
    s = settings(config)
    return bool(s["enabled"]) and (part is None or bool(s[part]))


def _check_finite(value: Any, where: str) -> Any:
    """`value` as JSON data (numpy to Python); a ValueError naming `where` for NaN / inf."""
    if isinstance(value, Mapping):
        return {str(k): _check_finite(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_check_finite(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"diagnostics: {where}={value!r} is not finite; diagnostics.json "
                         "holds finite numbers only (drop the entry or report it as text)")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "__array__"):  # a jax array
        return _check_finite(np.asarray(value), where)
    raise ValueError(f"diagnostics: {where} has type {type(value).__name__}, not JSON data "
                     "(dicts, lists, numbers, strings)")


def _read_json(path: Path, default):
    if not path.exists():
        return default
    return json.loads(path.read_text())


def _check_sections(sections: Sequence[Section]) -> None:
    names, stems = set(), set()
    for s in sections:
        if not isinstance(s, Section):
            raise ValueError(f"write_sections takes Section objects, got {type(s).__name__}")
        if not s.name or not isinstance(s.name, str):
            raise ValueError(f"a diagnostics section needs a non-empty name, got {s.name!r}")
        if s.name in names:
            raise ValueError(f"diagnostics section {s.name!r} given twice")
        names.add(s.name)
        for stem in s.figures:
            if not isinstance(stem, str) or not _STEM.match(stem):
                raise ValueError(f"section {s.name!r}: figure stem {stem!r} is not a plain file "
                                 "name (letters, digits, '_', '-', '.', '+', '=')")
            if stem in stems:
                raise ValueError(f"section {s.name!r}: figure stem {stem!r} is used twice")
            stems.add(stem)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Writes matplotlib Figure `fig` as a PNG at `path` atomically (its own size and dpi:
    `figsize * dpi` pixels) and closes it if pyplot manages it; returns the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # only pyplot keeps figures alive; never import it just to close
        pyplot.close(fig)
    return path


def write_sections(workdir: str | os.PathLike, sections: Iterable[Section]) -> list[Path]:
    """Writes each section's figures to `WORKDIR/plots/<stem>.png` and merges its numbers into
    `WORKDIR/diagnostics.json` under `section.name` (a section of the same name written before
    is replaced); returns the PNG paths.

    Every section is checked before anything is written: a ValueError names the number that is
    NaN / inf (e.g. `task_vectors.cosine[0][1]=nan`), a duplicate name or a bad figure stem.
    """
    workdir = Path(workdir)
    sections = list(sections)
    _check_sections(sections)
    numbers = {s.name: _check_finite(s.numbers, s.name) for s in sections}
    paths = [save_figure(fig, workdir / PLOTS_DIR / f"{stem}.png")
             for s in sections for stem, fig in s.figures.items()]
    merged = {**_read_json(workdir / NUMBERS_FILE, {}), **numbers}
    atomic_write_text(workdir / NUMBERS_FILE,
                      json.dumps(merged, indent=1, allow_nan=False) + "\n")
    index = [e for e in _read_json(workdir / INDEX_FILE, []) if e["name"] not in numbers]
    index += [{"name": s.name, "title": s.title, "text": s.text, "figures": list(s.figures)}
              for s in sections]
    atomic_write_text(workdir / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return paths


def move_aside(workdir: str | os.PathLike) -> list[Path]:
    """Renames a previous run's diagnostics.json and plots/ to diagnostics.previous.json and
    plots.previous/ (replacing older ones) and drops its index and report; returns the new
    paths. Call it while holding the workdir's lock."""
    workdir = Path(workdir)
    moved = []
    old = workdir / NUMBERS_FILE
    if old.exists():
        os.replace(old, workdir / "diagnostics.previous.json")
        moved.append(workdir / "diagnostics.previous.json")
    plots = workdir / PLOTS_DIR
    if plots.is_dir() and any(plots.iterdir()):
        target = workdir / "plots.previous"
        shutil.rmtree(target, ignore_errors=True)
        os.replace(plots, target)
        moved.append(target)
    for name in (INDEX_FILE, REPORT_FILE):
        (workdir / name).unlink(missing_ok=True)
    return moved


def _title(stem: str) -> str:
    return stem.replace("_", " ")


def report_text(workdir: str | os.PathLike, rows: Sequence[dict], *,
                failure: str | None = None) -> str:
    """The markdown of report.md: the results table, every written section (title, text,
    pictures as relative links `plots/<stem>.png`) and the other pictures in plots/.
    `failure` (the error of a run that stopped) is stated first: what follows is partial."""
    workdir = Path(workdir)
    run = next((r["run"] for r in rows if r.get("run")), {})
    lines = ["# Run report", ""]
    if run:
        lines += [f"Run `{run.get('run_id', '?')}`, started {run.get('started', '?')}, "
                  f"mergejax {run.get('version', '?')}.", ""]
    if failure:
        lines += [f"**The run failed:** `{failure}`. The results and sections below are what "
                  "it finished before the error (run.json has the status).", ""]
    lines += ["## Results", "", "Accuracies in %, seconds of each merge (results.json / "
              "results.csv).", "", results.table(rows) if rows else "(no rows)", ""]
    shown = set()
    for entry in _read_json(workdir / INDEX_FILE, []):
        lines += [f"## {entry['title'] or entry['name']}", ""]
        if entry.get("text"):
            lines += [entry["text"], ""]
        for stem in entry["figures"]:
            if (workdir / PLOTS_DIR / f"{stem}.png").exists():
                lines += [f"![{_title(stem)}]({PLOTS_DIR}/{stem}.png)", ""]
                shown.add(f"{stem}.png")
        lines += [f"Numbers: `{NUMBERS_FILE}` key `{entry['name']}`.", ""]
    plots = workdir / PLOTS_DIR
    others = sorted(p.name for p in plots.glob("*.png") if p.name not in shown) \
        if plots.is_dir() else []
    if others:
        lines += ["## Other plots", ""]
        for name in others:
            lines += [f"![{_title(Path(name).stem)}]({PLOTS_DIR}/{name})", ""]
    return "\n".join(lines)


def write_report(workdir: str | os.PathLike, rows: Sequence[dict], *, echo: bool = True,
                 failure: str | None = None) -> Path:
    """Writes `WORKDIR/report.md` (`report_text`) atomically, prints (if `echo`) where the
    report, the numbers and the pictures are, and returns its path. Works when no section was
    written (the report is then the results table and any pictures in plots/)."""
    workdir = Path(workdir)
    path = atomic_write_text(workdir / REPORT_FILE, report_text(workdir, rows, failure=failure))
    if not echo:
        return path
    plots = workdir / PLOTS_DIR
    count = len(list(plots.glob("*.png"))) if plots.is_dir() else 0
    numbers = workdir / NUMBERS_FILE
    print(f"report: {path}\n"
          f"diagnostics: {numbers if numbers.exists() else '(none written)'}\n"
          f"plots: {plots}/ ({count} png)", flush=True)
    return path
