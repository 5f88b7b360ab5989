"""One part of a run's diagnostics: the numbers behind it and the pictures drawn from them.

Every diagnostic (interpolation curves, match quality, task-vector conflicts, sweeps) returns
`Section`s; `mergejax.diagnostics.report` writes them: figures to `WORKDIR/plots/<stem>.png`,
numbers to `WORKDIR/diagnostics.json` under `name`, and both into `WORKDIR/report.md`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Section:
    """A named group of diagnostics.

    Attributes:
      name: the key in diagnostics.json, e.g. "interpolation", "match_quality", "task_vectors".
      title: a heading for report.md.
      numbers: JSON-able nested dicts/lists of finite floats, ints and strings.
      figures: file stem -> matplotlib Figure (Agg backend), written as plots/<stem>.png.
      text: optional markdown paragraph for report.md (what the pictures show, in one or two
        sentences).
    """

    name: str
    title: str
    numbers: dict[str, Any]
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    text: str = ""
