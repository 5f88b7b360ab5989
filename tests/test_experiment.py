"""End to end: the real configs, shrunk with :quick, through launch.py and experiment.run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergejax import experiment
from mergejax.config_lib import load_config_file
from mergejax.io import checkpoint as checkpointing

ROOT = Path(__file__).resolve().parents[1]


def _config(arg="quick", name="digits_resnet20"):
    return load_config_file(ROOT / "configs" / f"{name}.py", arg)


@pytest.mark.slow
def test_quick_launch_writes_results_and_reuses_endpoints(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch.py"),
           "--config=" + str(ROOT / "configs/digits_resnet20.py") + ":quick",
           f"--workdir={tmp_path}",
           "--config.merge.methods=('average','average+repair','zipit@stream1+repair')"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    methods = [r["method"] for r in rows]
    assert methods == ["model_a", "model_b", "ensemble", "average", "average+repair",
                       "zipit@stream1+repair"]
    assert rows[-1]["hparams"]["stop_after"] == "stream1"
    for r in rows:
        assert set(r["per_task_acc"]) == {"task_a", "task_b"}
        assert 0.0 <= r["joint_acc"] <= 1.0 and r["seconds"] >= 0.0
        assert abs(r["task_avg_acc"] - sum(r["per_task_acc"].values()) / 2) < 1e-9
    # an endpoint knows only its own task
    assert rows[0]["per_task_acc"]["task_b"] == 0.0 and rows[0]["per_task_acc"]["task_a"] > 0.5
    assert rows[2]["joint_acc"] >= max(rows[0]["joint_acc"], rows[1]["joint_acc"]) - 0.05
    assert (tmp_path / "results.csv").read_text().startswith("method,joint_acc")
    assert "| ensemble |" in out.stdout
    endpoints = sorted((tmp_path / "endpoints").iterdir())
    assert len(endpoints) == 2 and all(checkpointing.exists(p) for p in endpoints)
    stamps = [os.stat(p / "meta.json").st_mtime_ns for p in endpoints]
    # second run: endpoints reused, not retrained
    rows2 = experiment.run(_config(), tmp_path)
    assert [os.stat(p / "meta.json").st_mtime_ns for p in endpoints] == stamps
    assert rows2[0]["joint_acc"] == rows[0]["joint_acc"]


def test_unknown_method_fails_before_any_training(tmp_path):
    config = _config()
    with config.unlocked():
        config.merge.methods = ("average", "zipitt")
    with pytest.raises(KeyError, match="average"):
        experiment.run(config, tmp_path)
    assert not (tmp_path / "endpoints").exists()
    with config.unlocked():
        config.merge.methods = ("average+polish",)
    with pytest.raises(ValueError, match="repair"):
        experiment.run(config, tmp_path)


def test_unknown_model_and_dataset_list_valid_names(tmp_path):
    config = _config()
    with config.unlocked():
        config.model.name = "resnet21"
    with pytest.raises(KeyError, match="resnet20"):
        experiment.run(config, tmp_path)
    config = _config()
    with config.unlocked():
        config.data.name = "mnist"
    with pytest.raises(KeyError, match="digits"):
        experiment.run(config, tmp_path)


def test_unwritable_workdir_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        experiment.run(_config(), blocker / "sub")


def test_half_written_checkpoint_is_never_read(tmp_path):
    import numpy as np

    tree = {"params": {"w": np.ones(3, np.float32)}}
    half = tmp_path / "ckpt"
    (half / "state").mkdir(parents=True)  # killed before meta.json was written
    assert not checkpointing.exists(half)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpointing.load(half)
    checkpointing.save(half, tree, {"a": 1})
    assert checkpointing.exists(half) and checkpointing.load_meta(half) == {"a": 1}
    restored = checkpointing.load(half, like=tree)
    np.testing.assert_array_equal(restored["params"]["w"], tree["params"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_config_arguments_are_typed_and_checked():
    assert _config("width=3").model.width == 3
    assert _config("quick").train.epochs < _config(None).train.epochs
    with pytest.raises(ValueError, match="valid"):
        _config("widht=3")


@pytest.mark.slow
def test_cifar_config_quick_under_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = _config("quick", name="cifar5_resnet20")
    with config.unlocked():
        config.merge.mudsc = {"iters": 2}
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        rows = experiment.run(config, tmp_path)
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["model_a", "model_b", "ensemble"]
    assert methods[3:] == list(config.merge.methods)
    assert all(0.0 <= r["joint_acc"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_failing_method_gives_error_row_and_corrupt_endpoint_is_retrained(tmp_path):
    import json
    import warnings

    from mergejax.methods import registry

    @registry.register("_test_fails", "matching", needs="none")
    def _fails(spec, endpoints, statistics, *, key=None, spaces):
        raise RuntimeError("boom in _test_fails")

    try:
        config = _config("quick", name="digits_mlp")
        with config.unlocked():
            config.merge.methods = ("average", "_test_fails", "average+repair")
        rows = experiment.run(config, tmp_path)
    finally:
        registry._METHODS._items.pop("_test_fails")
    assert [r["method"] for r in rows][-3:] == ["average", "_test_fails", "average+repair"]
    bad = experiment.failed(rows)
    assert [r["method"] for r in bad] == ["_test_fails"] and "boom" in bad[0]["error"]
    on_disk = json.loads((tmp_path / "results.json").read_text(),
                         parse_constant=lambda c: pytest.fail(c))
    assert [r["method"] for r in on_disk] == [r["method"] for r in rows]
    assert all(r["run"]["run_id"] == rows[0]["run"]["run_id"] for r in on_disk)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "failed" and run["failed_methods"] == ["_test_fails"]
    assert run["config"]["merge"]["methods"] == list(config.merge.methods)
    assert not (tmp_path / ".lock").exists()
    # garble one cached endpoint: the next run names it, moves it aside and retrains it
    endpoint = sorted((tmp_path / "endpoints").iterdir())[0]
    for f in (endpoint / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage" * 3)
    config = _config("quick", name="digits_mlp")
    with config.unlocked():
        config.merge.methods = ("average",)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows2 = experiment.run(config, tmp_path)
    messages = [str(w.message) for w in caught if "corrupt" in str(w.message)]
    assert len(messages) == 1 and endpoint.name in messages[0]
    aside = [p for p in (tmp_path / "endpoints").iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and checkpointing.exists(endpoint)
    assert rows2[0]["joint_acc"] == rows[0]["joint_acc"]  # retrained identically (same seed)
    previous = json.loads((tmp_path / "results.previous.json").read_text())
    assert [r["method"] for r in previous] == [r["method"] for r in rows]
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"
