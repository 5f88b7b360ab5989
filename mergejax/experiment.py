"""One run: `run(config, workdir)` dispatches on `config.kind` and writes the results.

Kinds: "multitask" (`mergejax.multitask`: one model per task from its own initialisation,
merged by matching methods) and "finetune" (`mergejax.finetune`: one base fine-tuned per task,
merged by weight-space methods). Each phase of a run is an importable function.

Order of a run: the whole config is validated (`mergejax.validation`, nothing read or written
before), the workdir is created and locked (`WORKDIR/.lock`), temporaries of killed runs are
removed, a previous run's results are moved to `results.previous.{json,csv}`, `run.json` records
the config, start time, version and status (running / finished / failed), and results.json /
.csv are rewritten after every finished row. A method that fails gives a row with an `error`
field and the run goes on with the others (`failed(rows)` lists them).
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import uuid
from pathlib import Path

import mergejax.search.run  # noqa: F401  (the search kind registers)
from mergejax import distributed, finetune, multitask, results, validation  # noqa: F401
from mergejax.diagnostics import report
from mergejax.io.atomic import atomic_write_text, remove_stale_temporaries
from mergejax.kinds import KINDS
from mergejax.run_setup import check_workdir, workdir_lock

RUN_FILE = "run.json"


def version() -> str:
    """The installed mergejax version."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("mergejax")
    except Exception:  # not installed as a distribution
        import mergejax

        return getattr(mergejax, "__version__", "unknown")


def _remove_temporaries(workdir: Path) -> None:
    """Deletes what killed runs left half-written (we hold the lock: none is in progress)."""
    for folder in (workdir, workdir / "endpoints", workdir / "export", workdir / "plots"):
        for path in remove_stale_temporaries(folder, older_than_s=0.0):
            logging.warning("removed %s, left half-written by a killed run", path)


def _write_run(workdir: Path, info: dict) -> None:
    atomic_write_text(workdir / RUN_FILE, results.to_json(info, indent=1))


def failed(rows: list[dict]) -> list[dict]:
    """The rows of methods that failed (those with an `error` field)."""
    return [r for r in rows if r.get("error")]


def run(config, workdir: str | os.PathLike, *, _scratch: bool = False) -> list[dict]:
    """Runs the experiment `config.kind` and writes results into `workdir`; returns the rows.

    On several processes (`launch.py --distributed`) every process runs the same program (its
    collectives must match) but only process 0 writes into `workdir`; the others' files go to
    a scratch directory removed at the end.

    Raises `validation.ConfigError` (every problem of the config, before anything is read or
    written) and `run_setup.WorkdirLocked` (another live run holds the workdir).
    """
    validation.validate(config)
    if not (_scratch or distributed.is_writer()):
        with tempfile.TemporaryDirectory(
                prefix=f"mergejax-process{distributed.process_index()}-") as scratch:
            return run(config, scratch, _scratch=True)
    workdir = check_workdir(workdir)
    with workdir_lock(workdir):
        _remove_temporaries(workdir)
        results.move_aside(workdir)
        report.move_aside(workdir)  # a report never shows a previous run's pictures
        now = datetime.datetime.now(datetime.UTC).astimezone()
        stamp = {"run_id": f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
                 "started": now.isoformat(timespec="seconds"), "version": version()}
        info = {**stamp, "status": "running", "pid": os.getpid(),
                "config": config.to_dict() if hasattr(config, "to_dict") else dict(config)}
        _write_run(workdir, info)
        rows: list[dict] = []
        results.write(workdir, rows, run=stamp)

        def emit(row: dict) -> None:
            rows.append({**row, "run": stamp})
            results.write(workdir, rows, run=stamp)

        try:
            KINDS.get(config.kind)(config, workdir, emit=emit)
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            _write_run(workdir, {**info, "status": "failed", "rows": len(rows),
                                 "error": error, "finished": _now()})
            if isinstance(e, Exception) and report.enabled(config):
                try:  # what finished before the error stays readable; never hides the error
                    report.write_report(workdir, rows, echo=False, failure=error)
                except Exception as report_error:  # noqa: BLE001
                    logging.warning("no report for the failed run: %s", report_error)
            raise
        if report.enabled(config):  # the kind wrote its sections; lay them out
            report.write_report(workdir, rows, echo=not _scratch)
        bad = failed(rows)
        _write_run(workdir, {**info, "status": "failed" if bad else "finished",
                             "rows": len(rows), "finished": _now(),
                             **({"failed_methods": [r["method"] for r in bad]} if bad else {})})
    if not _scratch:
        print(results.table(rows), flush=True)
    return rows


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).astimezone().isoformat(
        timespec="seconds")
