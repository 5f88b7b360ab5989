"""The fine-tuned workflow end to end (:quick) with every weight-space method."""

from pathlib import Path

import pytest

from mergejax import experiment, methods
from mergejax.config_lib import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def _config(name, arg="quick"):
    return load_config_file(ROOT / "configs" / f"{name}.py", arg)


@pytest.mark.slow
def test_finetune_quick_runs_every_method(tmp_path):
    config = _config("digits_finetune_mlp")
    with config.unlocked():
        config.merge.task_arithmetic.lam = 0.5  # fixed: not searched
        config.merge_search.task_arithmetic = ()
    rows = experiment.run(config, tmp_path)
    names = [r["method"] for r in rows]
    assert names[:2] == ["base", "finetuned"]
    assert set(names[2:]) == set(config.merge.methods)
    by_name = {r["method"]: r for r in rows}
    assert len(by_name["finetuned"]["per_task_acc"]) == 5
    assert by_name["task_arithmetic"]["hparams"]["lam"] == 0.5
    assert by_name["task_arithmetic"]["num_candidates"] == 1
    assert by_name["ties"]["num_candidates"] == len(methods.get("ties").search["lam"])
    tall = by_name["tall_masks"]["hparams"]
    assert len(tall["per_task"]) == 5  # lambda chosen per task
    assert (tmp_path / "results.csv").exists()


def test_finetune_refuses_matching_only_methods(tmp_path):
    config = _config("digits_finetune_mlp")
    with config.unlocked():
        config.merge.methods = ("zipit",)
    with pytest.raises(ValueError, match="weight_space"):
        experiment.run(config, tmp_path)


@pytest.mark.slow
def test_cifar_finetune_quick_under_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = _config("cifar_finetune_resnet20")
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        rows = experiment.run(config, tmp_path)
    assert [r["method"] for r in rows] == ["base", "finetuned", *config.merge.methods]
    assert all(len(r["per_task_acc"]) == 2 for r in rows)
