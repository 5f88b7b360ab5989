"""Bad inputs, one table: every case asserts the exit code (or exception), that the message
names the culprit (field, file, key or argument), and that nothing was written, deleted or left
half-written. Launcher / config / run cases are here; file, kernel and CLI cases come from
`bad_inputs_io.CASES` (helper module shared with the converters and recipe tests).

Config cases call `experiment.run` in process (validation fails before any data is read); a few
run `launch.py` as a subprocess for the exit codes, the one-line message and --debug.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs_io import CASES as IO_CASES
from helpers import snapshot

from mergejax import experiment, results, validation
from mergejax.config_lib import load_config_file
from mergejax.run_setup import WorkdirLocked, workdir_lock

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(ROOT / "launch.py")


def _config(name="digits_mlp", arg="quick", **fields):
    config = load_config_file(ROOT / "configs" / f"{name}.py", arg)
    with config.unlocked():
        for dotted, value in fields.items():
            *parents, leaf = dotted.split("__")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
    return config


def _workdir(tmp_path):
    """A workdir holding a previous run's files, which a refused run must leave as they are."""
    work = tmp_path / "work"
    (work / "endpoints").mkdir(parents=True)
    (work / "results.json").write_text('[{"method": "old"}]')
    (work / "endpoints" / "keep.txt").write_text("x")
    return work


def config_case(fields, *culprits, name="digits_mlp", count=None):
    """A case: `experiment.run` with `fields` set must raise ConfigError naming `culprits`."""

    def case(tmp_path):
        work = _workdir(tmp_path)
        before = snapshot(work)
        config = _config(name, **fields)
        with pytest.raises(validation.ConfigError) as info:
            experiment.run(config, work)
        message = str(info.value)
        for culprit in culprits:
            assert culprit in message, (culprit, message)
        if count is not None:
            assert len(info.value.problems) == count, info.value.problems
        assert snapshot(work) == before  # nothing written, moved or deleted
        fresh = tmp_path / "fresh"
        with pytest.raises(validation.ConfigError):
            experiment.run(config, fresh)
        assert not fresh.exists()  # not even the workdir is created

    return case


def _launch(tmp_path, *args, env=None, timeout=120):
    cmd = [sys.executable, LAUNCH, *args]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MERGEJAX_DEBUG", None) if not env or "MERGEJAX_DEBUG" not in env else None
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=full_env)


def _error_lines(stderr: str) -> list[str]:
    """stderr without absl's log lines (I/W...) and progress bars: what the user reads."""
    return [ln for ln in stderr.splitlines() if ln.startswith("launch.py:")]


def launch_case(args, code, *culprits, debug=False, env=None):
    """A case: `launch.py args` exits with `code`, one `launch.py:` line naming `culprits`."""

    def case(tmp_path):
        work = _workdir(tmp_path)
        before = snapshot(work)
        full = [a.replace("{work}", str(work)) for a in args]
        out = _launch(tmp_path, *full, env=env)
        assert out.returncode == code, out.stderr[-2000:]
        lines = _error_lines(out.stderr)
        assert len(lines) == 1, out.stderr[-2000:]
        for culprit in culprits:
            assert culprit in lines[0], (culprit, lines[0])
        assert ("Traceback" in out.stderr) == debug
        assert snapshot(work) == before

    return case


def locked_case(tmp_path):
    """A live owner's lock keeps a second run off the workdir; the message names its PID."""
    work = _workdir(tmp_path)
    (work / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                            "started": "earlier"}))
    before = snapshot(work)
    with pytest.raises(WorkdirLocked, match=f"PID {os.getpid()}"):
        experiment.run(_config(), work)
    assert snapshot(work) == before


def locked_launch_case(tmp_path):
    """The same through launch.py: exit 1, one line naming the PID and the lock file."""
    work = _workdir(tmp_path)
    (work / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    before = snapshot(work)
    out = _launch(tmp_path, f"--config={ROOT}/configs/digits_mlp.py:quick", f"--workdir={work}")
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = _error_lines(out.stderr)
    assert f"PID {os.getpid()}" in line and ".lock" in line
    assert snapshot(work) == before


def stale_lock_case(tmp_path):
    """A lock left by a dead process (a killed run) is taken over, then released."""
    work = _workdir(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (work / ".lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    with workdir_lock(work):
        assert json.loads((work / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirLocked, match=str(os.getpid())):
            with workdir_lock(work):
                pass
    assert not (work / ".lock").exists()
    assert sorted(p.name for p in work.iterdir()) == ["endpoints", "results.json"]


def strict_json_case(tmp_path):
    """results.json never holds NaN or inf (invalid JSON): they become null."""
    work = tmp_path / "w"
    work.mkdir()
    rows = [{"method": "x", "joint_acc": math.nan, "task_avg_acc": math.inf,
             "per_task_acc": {"task_a": -math.inf}, "seconds": 0.1}]
    results.write(work, rows, run={"run_id": "r", "started": "t", "version": "v"})
    parsed = json.loads((work / "results.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert parsed[0]["joint_acc"] is None and parsed[0]["per_task_acc"]["task_a"] is None
    assert parsed[0]["run"]["run_id"] == "r"
    assert "run_id" in (work / "results.csv").read_text().splitlines()[0]
    assert sorted(p.name for p in work.iterdir()) == ["results.csv", "results.json"]


def unwritable_workdir_case(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = snapshot(tmp_path)
    with pytest.raises(PermissionError, match=str(blocker)):
        experiment.run(_config(), blocker / "sub")
    assert snapshot(tmp_path) == before


NAN = float("nan")
MLP = f"--config={ROOT}/configs/digits_mlp.py:quick"

LAUNCHER_CASES = [
    pytest.param(config_case({"merge__zipit__alpha": NAN}, "config.merge.zipit.alpha=nan",
                             "finite"), id="zipit-alpha-nan"),
    pytest.param(config_case({"merge__zipit__beta": -1e9}, "config.merge.zipit.beta", ">= 0"),
                 id="zipit-beta-negative"),
    pytest.param(config_case({"merge__mudsc__alpha": math.inf}, "config.merge.mudsc.alpha=inf"),
                 id="mudsc-alpha-inf"),
    pytest.param(config_case({"merge__mudsc__fix_rate": 1.5}, "config.merge.mudsc.fix_rate=1.5",
                             "[0, 1]"), id="mudsc-fix-rate"),
    pytest.param(config_case({"merge__mudsc__matcher": "hungarian"},
                             "config.merge.mudsc.matcher='hungarian'", "'zip'"),
                 id="mudsc-matcher"),
    pytest.param(config_case({"merge__weight_matching__max_iter": 0},
                             "config.merge.weight_matching.max_iter=0"), id="wm-max-iter"),
    pytest.param(config_case({"train__batch_size": 0}, "config.train.batch_size=0", ">= 1"),
                 id="train-batch-size-0"),
    pytest.param(config_case({"train__epochs": -1}, "config.train.epochs=-1"),
                 id="train-epochs-negative"),
    pytest.param(config_case({"train__lr": NAN}, "config.train.lr=nan"), id="train-lr-nan"),
    pytest.param(config_case({"data__batch_size": 0}, "config.data.batch_size=0"),
                 id="data-batch-size-0"),
    pytest.param(config_case({"data__eval_batch_size": -5}, "config.data.eval_batch_size=-5"),
                 id="eval-batch-size"),
    pytest.param(config_case({"seed": -1}, "config.seed=-1"), id="seed-negative"),
    pytest.param(config_case({"seed": 2**40}, "config.seed=1099511627776"), id="seed-huge"),
    pytest.param(config_case({"merge__methods": ("average+repair", "zipit@hidden9+repair")},
                             "config.merge.methods[1]='zipit@hidden9+repair'", "hidden0"),
                 id="unknown-space"),
    pytest.param(config_case({"merge__methods": ("average", "zipitt")}, "'zipitt'", "zipit"),
                 id="unknown-method"),
    pytest.param(config_case({"merge__methods": ("average+polish",)}, "'polish'", "repair"),
                 id="unknown-variant"),
    pytest.param(config_case({"merge__methods": ("average", "ties")}, "config.merge.methods[1]",
                             "'matching'"), id="weight-space-method-in-multitask"),
    pytest.param(config_case({"merge__methods": ("zipit",)}, "config.merge.methods[0]",
                             "weight_space", name="digits_finetune_mlp"),
                 id="matching-method-in-finetune"),
    pytest.param(config_case({"merge__methods": ("ties@hidden0",)}, "'ties@hidden0'",
                             "partial merging", name="digits_finetune_mlp"),
                 id="space-in-finetune"),
    pytest.param(config_case({"merge__ties__density": 2.0}, "config.merge.ties.density=2.0",
                             "(0, 1]", name="digits_finetune_mlp"), id="ties-density"),
    pytest.param(config_case({"merge__dare__p": 1.5}, "config.merge.dare.p=1.5",
                             name="digits_finetune_mlp"), id="dare-p"),
    pytest.param(config_case({"merge__task_arithmetic__lam": math.inf},
                             "config.merge.task_arithmetic.lam=inf",
                             name="digits_finetune_mlp"), id="lam-inf"),
    pytest.param(config_case({"merge__consensus__k": -1}, "config.merge.consensus.k=-1",
                             "integer", name="digits_finetune_mlp"), id="consensus-k"),
    pytest.param(config_case({"merge__breadcrumbs__scope": "rows"},
                             "config.merge.breadcrumbs.scope='rows'", "'row'",
                             name="digits_finetune_mlp"), id="breadcrumbs-scope"),
    pytest.param(config_case({"merge_search__ties": ("density",)},
                             "config.merge_search.ties", "lam", name="digits_finetune_mlp"),
                 id="search-name"),
    pytest.param(config_case({"finetune__batch_size": 0}, "config.finetune.batch_size=0",
                             name="digits_finetune_mlp"), id="finetune-batch-size"),
    pytest.param(config_case({"data__num_tasks": 20}, "config.data.num_tasks", "10 classes"),
                 id="too-many-tasks"),
    pytest.param(config_case({"data__task_classes": ((0, 1), (1, 99))},
                             "config.data.task_classes[1]", "[0, 10)"), id="task-classes"),
    pytest.param(config_case({"data__name": "mnist"}, "config.data.name='mnist'", "digits"),
                 id="unknown-dataset"),
    pytest.param(config_case({"data__name": "cifar10", "data__data_dir": "/no/such/dir"},
                             "config.data.data_dir='/no/such/dir'"), id="missing-data-dir"),
    pytest.param(config_case({"model__name": "resnet21"}, "config.model.name='resnet21'",
                             "resnet20"), id="unknown-model"),
    pytest.param(config_case({"model__depthx": 3}, "config.model", "depthx"),
                 id="unknown-model-kwarg"),
    pytest.param(config_case({"repair__estimator": "mean"}, "config.repair.estimator='mean'",
                             "per_batch"), id="repair-estimator"),
    pytest.param(config_case({"export__formats": ("onnx",)}, "config.export.formats",
                             "safetensors"), id="export-format"),
    pytest.param(config_case({"endpoints__checkpoints": ("/no/a.pt", "/no/b.pt")},
                             "config.endpoints.checkpoints[0]='/no/a.pt'",
                             "config.endpoints.checkpoints[1]='/no/b.pt'"),
                 id="missing-checkpoints"),
    pytest.param(config_case({"kind": "distill"}, "config.kind='distill'", "multitask"),
                 id="unknown-kind"),
    pytest.param(config_case({"merge__zipit__alpha": NAN, "train__batch_size": 0, "seed": -1,
                              "merge__methods": ("zipit@hidden9+repair",)},
                             "alpha=nan", "batch_size=0", "seed=-1", "hidden9", count=4),
                 id="every-problem-at-once"),
    pytest.param(locked_case, id="workdir-locked"),
    pytest.param(stale_lock_case, id="stale-lock-taken-over"),
    pytest.param(strict_json_case, id="results-strict-json"),
    pytest.param(unwritable_workdir_case, id="unwritable-workdir"),
    pytest.param(launch_case([MLP, "--workdir={work}", "--config.merge.zipit.alpha=nan"], 2,
                             "config.merge.zipit.alpha=nan"), id="launch-nan-exit-2"),
    pytest.param(launch_case([MLP, "--workdir={work}", "--config.train.batch_size=0",
                              "--debug"], 2, "config.train.batch_size=0", debug=True),
                 id="launch-debug-traceback"),
    pytest.param(launch_case([MLP, "--workdir={work}", "--config.seed=-1"], 2, "config.seed",
                             debug=True, env={"MERGEJAX_DEBUG": "1"}), id="launch-debug-env"),
    pytest.param(launch_case([MLP, "--workdir={work}", "--config.merge.zipit.gamma=1"], 2,
                             "--config.merge.zipit.gamma", "gamma"), id="launch-unknown-field"),
    pytest.param(launch_case([MLP, "--workdir={work}", "--config.train.batch_size=abc"], 2,
                             "--config.train.batch_size"), id="launch-bad-type"),
    pytest.param(launch_case(["--config=configs/nope.py", "--workdir={work}"], 2,
                             "configs/nope.py"), id="launch-missing-config-file"),
    pytest.param(launch_case([f"--config={ROOT}/configs/digits_mlp.py:widht=3",
                              "--workdir={work}"], 2, "widht"), id="launch-bad-config-arg"),
    pytest.param(launch_case([MLP, "--workdir={work}", "--bogus"], 2, "bogus"),
                 id="launch-unknown-flag"),
    pytest.param(locked_launch_case, id="launch-locked-exit-1"),
]


@pytest.mark.parametrize("case", [*LAUNCHER_CASES, *IO_CASES])
def test_bad_input(case, tmp_path):
    case(tmp_path)


def test_table_size():
    assert len(LAUNCHER_CASES) >= 20
    assert len(LAUNCHER_CASES) + len(IO_CASES) >= 40
