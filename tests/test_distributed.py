"""Multi-host runs: `launch.py --distributed` on 2 local CPU processes (gloo collectives) gives
the single-process results.json; only process 0 writes; an endpoint is trained once (by both
processes together) or read once from the cache (by process 0, sent to process 1).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import distributed_env, free_port, run_together

from mergejax import experiment
from mergejax.config_lib import load_config_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "digits_mlp.py"  # the cheapest config: a tiny MLP, 2 epochs under :quick


def _overrides(methods: str) -> list[str]:
    out = [f"--config.merge.methods={methods}"]
    if "diagnostics" in load_config_file(ROOT / "configs" / CONFIG, "quick"):
        out.append("--config.diagnostics.enabled=False")  # plots are not what is tested here
    return out


def _launch_two(workdir: Path, methods: str) -> list[subprocess.CompletedProcess]:
    """Runs launch.py as processes 0 and 1 of one distributed run; returns both results."""
    port = free_port()
    jobs = []
    for i in range(2):
        cmd = [sys.executable, str(ROOT / "launch.py"),
               f"--config={ROOT / 'configs' / CONFIG}:quick", f"--workdir={workdir}",
               "--distributed", f"--coordinator=localhost:{port}", "--num_processes=2",
               *_overrides(methods)]
        # process 1 takes its id from the environment, process 0 from the flag
        if i == 0:
            cmd.append("--process_id=0")
        jobs.append((cmd, distributed_env(MERGEJAX_PROCESS_ID=str(i))))
    out = run_together(jobs)
    for o in out:
        assert o.returncode == 0, o.stderr[-3000:]
    return out


def _comparable(rows: list[dict]) -> list[dict]:
    """Rows without what differs between runs: run ids, timestamps, seconds."""
    return [{k: v for k, v in r.items() if k not in ("run", "seconds")} for r in rows]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(tmp_path):
    config = load_config_file(ROOT / "configs" / CONFIG, "quick")
    with config.unlocked():
        config.merge.methods = ("permute+repair",)
        if "diagnostics" in config:
            config.diagnostics.enabled = False
    single = experiment.run(config, tmp_path / "single")  # this process: 8 fake devices

    # model_a is cached (process 0 reads it and hands it to process 1); model_b is not (both
    # processes train it together, process 0 saves it)
    multi = tmp_path / "multi"
    cached = next((tmp_path / "single" / "endpoints").glob("*-s0-*"))
    shutil.copytree(cached, multi / "endpoints" / cached.name)
    stamp = os.stat(multi / "endpoints" / cached.name / "meta.json").st_mtime_ns
    outs = _launch_two(multi, "('permute+repair',)")

    rows = json.loads((multi / "results.json").read_text())
    assert [r["method"] for r in rows] == ["model_a", "model_b", "ensemble", "permute+repair"]
    assert _comparable(rows) == _comparable(single)
    assert os.stat(multi / "endpoints" / cached.name / "meta.json").st_mtime_ns == stamp
    assert "reusing endpoint model_a" in outs[0].stderr
    assert "training endpoint model_b" in outs[0].stderr + outs[1].stderr
    # process 0 wrote the workdir and printed the table; process 1 wrote none of it
    assert json.loads((multi / "run.json").read_text())["status"] == "finished"
    assert "| permute+repair |" in outs[0].stdout and "| permute+repair |" not in outs[1].stdout
    assert len(list((multi / "endpoints").iterdir())) == 2  # model_b saved once
