"""End to end: `configs/digits32_resnet20.py:quick` (ZipIt!'s protocol on digits at 32x32)."""

from pathlib import Path

import pytest

from mergejax import experiment
from mergejax.config_lib import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def _config(arg="quick"):
    return load_config_file(ROOT / "configs" / "digits32_resnet20.py", arg)


def test_config_fields_are_the_protocol():
    c = _config(None)
    assert c.data.name == "digits32"
    assert tuple(map(tuple, c.data.task_classes)) == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    assert c.data.shuffle_statistics is False
    assert c.data.stat_batches == 0 and c.merge.repair_batches == 0  # every training image
    assert c.repair.estimator == "per_batch" and c.repair.reset_endpoints is True
    assert c.model.name == "resnet20" and c.model.width == 1
    assert "zipit+repair" in c.merge.methods
    assert (c.merge.zipit.alpha, c.merge.zipit.beta) == (0.5, 1.0)
    assert _config("width=2").model.width == 2


@pytest.mark.slow
def test_quick_run_follows_the_protocol(tmp_path):
    rows = experiment.run(_config(), tmp_path)
    assert [r["method"] for r in rows] == ["model_a", "model_b", "ensemble", "zipit+repair"]
    for r in rows:
        assert set(r["per_task_acc"]) == {"task_a", "task_b"}
        assert 0.0 <= r["joint_acc"] <= 1.0
    # one epoch already beats chance (20%) on each endpoint's own task
    assert rows[0]["per_task_acc"]["task_a"] > 0.3 and rows[1]["per_task_acc"]["task_b"] > 0.3
    assert rows[0]["per_task_acc"]["task_b"] == 0.0  # an endpoint knows only its own task
    assert rows[-1]["hparams"]["alpha"] == 0.5 and rows[-1]["hparams"]["beta"] == 1.0
