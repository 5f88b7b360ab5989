"""SIGKILL the launcher during a save, during training and during merging; the next run resumes.

After every kill: results.json is strict JSON holding only finished rows. The final run reuses
every endpoint a killed run finished, removes what killed saves left half-written, and leaves
no temporary file or folder anywhere in the workdir.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")
ARGS = [f"--config={ROOT}/configs/digits_mlp.py:quick",
        # wider layers: saves take long enough to be caught in the act
        "--config.model.hidden=(1024,1024)",
        "--config.merge.methods=('average','average+repair','permute+repair','zipit+repair')",
        "--config.export.formats=('orbax',)"]


def _temporaries(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if TEMP.match(p.name)] if work.exists() else []


def _rows(work: Path) -> list[dict]:
    """results.json parsed strictly (no NaN / inf), or [] before the first write."""
    try:
        text = (work / "results.json").read_text()
    except FileNotFoundError:  # not written yet, or just moved aside by a starting run
        return []
    rows = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert isinstance(rows, list)
    for r in rows:  # finished rows only
        assert r["method"] and "error" not in r and r["joint_acc"] is not None, r
    return rows


def _start(work: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), f"--workdir={work}",
                                 *ARGS], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0, poll: float = 0.002):
    """SIGKILLs `proc` as soon as `ready()` is true; returns False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    proc.kill()
    pytest.fail("timed out waiting for the moment to kill")


@pytest.mark.slow
def test_sigkill_during_save_training_and_merging_then_resume(tmp_path):
    work, log = tmp_path / "work", tmp_path / "log.txt"
    endpoints = work / "endpoints"

    # 1. during a save: an endpoint's temporary folder exists
    proc = _start(work, log)
    assert _kill_when(proc, lambda: bool(_temporaries(endpoints))), log.read_text()[-2000:]
    assert _rows(work) == []
    assert (work / ".lock").exists()  # left by the killed run: stale, taken over next time

    # 2. during training: the log says an endpoint is training
    proc = _start(work, log)
    assert _kill_when(proc, lambda: "training endpoint" in log.read_text()), \
        log.read_text()[-2000:]
    assert "removed" in log.read_text()  # the killed save's temporary, at the start
    assert not any(p for p in _temporaries(work) if p.stat().st_mtime < proc_start(log))
    _rows(work)

    # 3. during merging: the endpoint rows are written, merges in progress
    proc = _start(work, log)
    assert _kill_when(proc, lambda: len(_rows(work)) >= 4), log.read_text()[-2000:]
    finished = _rows(work)
    assert [r["method"] for r in finished[:3]] == ["model_a", "model_b", "ensemble"]
    done = {p.name: (p / "meta.json").stat().st_mtime_ns for p in endpoints.iterdir()
            if (p / "meta.json").exists()}
    assert len(done) == 2

    # 4. the next run resumes: endpoints reused, every row written, nothing temporary left
    proc = _start(work, log)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("reusing endpoint") == 2 and "training endpoint" not in text
    assert {p.name: (p / "meta.json").stat().st_mtime_ns for p in endpoints.iterdir()
            if (p / "meta.json").exists()} == done
    rows = _rows(work)
    assert [r["method"] for r in rows] == ["model_a", "model_b", "ensemble", "average",
                                           "average+repair", "permute+repair", "zipit+repair"]
    assert _temporaries(work) == [] and not (work / ".lock").exists()
    assert json.loads((work / "run.json").read_text())["status"] == "finished"


def proc_start(log: Path) -> float:
    """The log's creation time: temporaries older than it were left by an earlier run."""
    return log.stat().st_ctime
