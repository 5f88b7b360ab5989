"""RegMean (learned family): closed-form known answers, numpy oracles, alignment, a run row."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import (
    data,
    evaluation,
    experiment,
    learned_merging,
    models,
    repair,
    run_setup,
    specs,
    validation,
)
from mergejax.config_lib import load_config_file
from mergejax.methods import get, registry
from mergejax.methods.learned import LearnedMerge
from mergejax.methods.regmean import align_endpoints, gram_matrices, regmean_solve
from mergejax.specs import flatten
from mergejax.train import TrainSettings, train

ROOT = Path(__file__).resolve().parents[1]
REGMEAN = get("regmean").fn("learned")


def _mlp(seed, hidden=(16, 12)):
    model = models.create("mlp", num_classes=5, hidden=hidden)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
    return model, jax.tree.map(np.asarray, variables)


def _images(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def _random_variables(model, x, seed):
    """Random variables shaped like `model.init`'s (eager init of a ResNet is slow)."""
    rng = np.random.default_rng(seed)
    shapes = flatten(model.init_shapes(x))
    return specs.unflatten({k: (rng.uniform(0.5, 2.0, s.shape) if k.endswith("var")
                                else rng.normal(0, 0.3, s.shape)).astype(np.float32)
                            for k, s in shapes.items()})


def _assert_trees_close(a, b, atol):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, err_msg=k)


@pytest.mark.parametrize("align", ["permute", "weight_matching", "none"])
def test_copies_of_one_model_merge_to_that_model(align):
    model, v = _mlp(0)
    spec = specs.for_model(model)
    images = [_images(40, 1), _images(30, 2), _images(20, 3)]
    out = REGMEAN(model, spec, [v, v, v], images, key=jax.random.key(0), align=align)
    assert isinstance(out, LearnedMerge) and out.model == model and len(out.variables) == 3
    for tree in out.variables:
        _assert_trees_close(tree, v, 1e-6)
    single = REGMEAN(model, spec, [v], images[:1], key=jax.random.key(0))
    _assert_trees_close(single.variables[0], v, 1e-6)


def test_copies_of_a_vit_merge_to_it_token_grams():
    """Dense layers on (B, tokens, d) inputs: each token is a row; the conv patch embedding is
    averaged (a copy: unchanged)."""
    model = models.create("vit", num_classes=5, width=8, depth=1, heads=2, patch=4,
                          mlp_ratio=1.0)
    v = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    out = REGMEAN(model, specs.for_model(model), [v, v], [_images(12, 1), _images(9, 2)],
                  key=jax.random.key(0), align="none", batch_size=8)
    _assert_trees_close(out.variables[1], v, 1e-5)


def test_gram_matrices_equal_numpy_on_the_taps():
    """G of every Dense layer = X^T X / n of its inputs (the flattened images, then the
    previous layer's post-ReLU tap), with a batch size that leaves a padded last batch."""
    model, v = _mlp(3)
    x = _images(50, 4)
    grams = gram_matrices(model, v, x, ["dense_0", "dense_1", "linear"], batch_size=16)
    _, taps = model.features(v, jnp.asarray(x))
    inputs = {"dense_0": x.reshape(50, -1), "dense_1": np.asarray(taps["hidden0"]),
              "linear": np.asarray(taps["hidden1"])}
    for layer, a in inputs.items():
        a = a.astype(np.float64)
        np.testing.assert_allclose(grams[layer], a.T @ a / len(a), rtol=1e-5, atol=1e-6,
                                   err_msg=layer)


def test_solve_reg_coef_0_is_a_per_feature_weighted_average():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(30, 6)) * rng.uniform(0.2, 3, 6) for _ in range(3)]
    grams = [a.T @ a / len(a) for a in xs]
    ws = [rng.normal(size=(6, 4)) for _ in range(3)]
    d = np.stack([np.diag(g) for g in grams])  # (N, d_in): per-model weight of each input row
    oracle = np.einsum("ni,nij->ij", d, np.stack(ws)) / d.sum(0)[:, None]
    np.testing.assert_allclose(regmean_solve(grams, ws, 0.0), oracle, rtol=1e-5, atol=1e-6)


def test_solve_reg_coef_1_is_the_least_squares_fit_of_every_models_outputs():
    """W* = argmin sum_i ||X_i W - X_i W_i||^2 / n_i, solved by numpy's lstsq on the stacked
    rows (no normal equations), against RegMean's closed form; and a = 0.7 mixes the two."""
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 5)) + rng.normal(size=5) for n in (20, 35)]
    ws = [rng.normal(size=(5, 3)) for _ in xs]
    rows = np.concatenate([a / np.sqrt(len(a)) for a in xs])
    targets = np.concatenate([a @ w / np.sqrt(len(a)) for a, w in zip(xs, ws)])
    oracle = np.linalg.lstsq(rows, targets, rcond=None)[0]
    grams = [a.T @ a / len(a) for a in xs]
    np.testing.assert_allclose(regmean_solve(grams, ws, 1.0), oracle, rtol=1e-4, atol=1e-5)
    mixed = [0.7 * g + 0.3 * np.diag(np.diag(g)) for g in grams]
    expected = np.linalg.solve(sum(mixed), sum(g @ w for g, w in zip(mixed, ws)))
    np.testing.assert_allclose(regmean_solve(grams, ws, 0.7), expected, rtol=1e-4, atol=1e-5)


def test_dead_inputs_fall_back_to_the_average():
    """An input feature zero for every model makes sum G~ singular: its row is the average."""
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(20, 4)) for _ in range(2)]
    for a in xs:
        a[:, 2] = 0.0
    ws = [rng.normal(size=(4, 3)) for _ in xs]
    out = regmean_solve([a.T @ a / 20 for a in xs], ws, 0.7)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[2], (ws[0][2] + ws[1][2]) / 2, rtol=1e-5)


class _Convs(nn.Module):
    """Two convs on the image (3x3 stride 2 pad 1 with bias; 2x2 stride 2 VALID), summed."""

    @nn.compact
    def __call__(self, x, train=False):
        a = nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="a")(x)
        b = nn.Conv(4, (2, 2), strides=(2, 2), padding="VALID", use_bias=False, name="b")(x)
        return nn.Dense(3, name="head")((a + b).reshape(x.shape[0], -1))


def _numpy_patches(x, k, stride, pad):
    """(n * H' * W', k * k * C) patches in HWIO kernel order, by explicit slicing."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = (x.shape[1] - k) // stride + 1
    rows = [x[:, i * stride:i * stride + k, j * stride:j * stride + k, :].reshape(len(x), -1)
            for i in range(out) for j in range(out)]
    return np.concatenate(rows)


def test_conv_grams_equal_numpy_patches_and_convs_are_patch_matmuls():
    model = models.Model("convs", _Convs(), {}, "head")
    x = _images(10, 5)
    v = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.asarray(x)))
    grams = gram_matrices(model, v, x, ["a", "b", "head"], batch_size=4)
    for layer, k, stride, pad in (("a", 3, 2, 1), ("b", 2, 2, 0)):
        rows = _numpy_patches(x, k, stride, pad)
        np.testing.assert_allclose(grams[layer], rows.T @ rows / len(rows), rtol=1e-5,
                                   atol=1e-6, err_msg=layer)
        kernel = np.asarray(v["params"][layer]["kernel"], np.float64)
        conv = flax_conv = nn.Conv(4, (k, k), strides=(stride, stride),
                                   padding=((pad, pad), (pad, pad)), use_bias=False)
        out = np.asarray(flax_conv.apply({"params": {"kernel": kernel}}, x), np.float64)
        # row order of _numpy_patches is (position, image): compare as sets of rows
        out = out.transpose(1, 2, 0, 3).reshape(-1, 4)
        np.testing.assert_allclose(rows @ kernel.reshape(-1, 4), out, atol=1e-4)
        del conv


def test_resnet_copies_merge_to_themselves_and_reset_batchnorm():
    """Every ResNet conv is solved on its patches: copies come back (1e-5); with convs=False
    the trunk is the plain average; `+reset` recomputes BatchNorm statistics."""
    model = models.create("resnet", depth=8, width=1, num_classes=5)
    x = _images(6, 0)
    v0, v1 = (_random_variables(model, x, seed) for seed in (0, 1))
    spec = specs.for_model(model)
    copies = REGMEAN(model, spec, [v0, v0], [x, x[:4]], key=jax.random.key(0), align="none")
    _assert_trees_close(copies.variables[1], v0, 1e-5)
    out = learned_merging.learned_merge(
        "regmean", model, spec, [v0, v1], [x, x], key=jax.random.key(0),
        hparams={"align": "none", "convs": False}, fix="reset", batches=lambda: [x])
    average = specs.apply_merge(spec, [v0, v1], specs.identity_transforms(spec, 2))
    for merged, avg in zip(out.variables, average):
        _assert_trees_close(merged["params"], avg["params"], 1e-6)
    expected = repair.reset_batch_stats(model, average[0], [x])["batch_stats"]
    _assert_trees_close(out.variables[1]["batch_stats"], expected, 1e-6)
    assert not np.allclose(flatten(expected)["layer1_0/bn1/mean"],
                           flatten(average[0]["batch_stats"])["layer1_0/bn1/mean"])


@pytest.fixture(scope="module")
def digits_pair():
    """Two MLPs from different initialisations, each trained on its own 5 digits."""
    ds = data.load("digits")
    x, y = ds.splits["train"]
    tasks = [(2, 3, 4, 6, 7), (0, 1, 5, 8, 9)]
    model = models.create("mlp", num_classes=5, hidden=(32, 32))
    settings = TrainSettings(epochs=5, batch_size=64, lr=0.05, warmup_epochs=0.5)
    eps = [train(model, *data.select(x, y, t), settings, seed=i)[0] for i, t in enumerate(tasks)]
    images = run_setup.task_images(ds, tasks, 100, seed=0)
    return model, eps, tasks, images, ds.splits["test"]


def test_permute_alignment_keeps_each_model_and_regmean_beats_the_average(digits_pair):
    model, eps, tasks, images, (xt, yt) = digits_pair
    spec = specs.for_model(model)
    aligned = align_endpoints(model, spec, eps, np.concatenate(images), align="permute")
    for a, e in zip(aligned, eps):  # a permutation leaves every function unchanged
        np.testing.assert_allclose(model.apply(a, xt[:64]), model.apply(e, xt[:64]), atol=1e-4)
    assert not np.allclose(aligned[1]["params"]["dense_0"]["kernel"],
                           eps[1]["params"]["dense_0"]["kernel"])

    def joint(trees):
        return evaluation.evaluate(model, list(zip(trees, tasks)), xt, yt, tasks)["joint_acc"]

    out = REGMEAN(model, spec, eps, images, key=jax.random.key(0))
    assert all(np.isfinite(leaf).all() for t in out.variables for leaf in flatten(t).values())
    average = specs.apply_merge(spec, eps, specs.identity_transforms(spec, 2))
    assert joint(out.variables) > joint(average) + 0.05
    # the heads are the endpoints' own (permuted onto the merged features), not merged
    np.testing.assert_array_equal(out.variables[0]["params"]["linear"]["kernel"],
                                  aligned[0]["params"]["linear"]["kernel"])


def test_stratified_choice_keeps_class_proportions():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = run_setup.stratified_choice(labels, 10, np.random.default_rng(0))
    assert len(set(idx)) == 10 and np.bincount(labels[idx]).tolist() == [5, 3, 2]
    assert len(run_setup.stratified_choice(labels, 0, np.random.default_rng(0))) == 100


def test_quick_multitask_run_writes_regmean_rows_and_a_loss_plot(tmp_path):
    @registry.register("_test_learned", "learned")
    def _fake(model, spec, endpoints, task_images, *, key=None, steps: int = 3):
        """A learned method with a loss history: the endpoints themselves."""
        return LearnedMerge(model, list(endpoints), {"loss": [3.0, 2.0, 1.0][:steps]})

    try:
        config = load_config_file(ROOT / "configs" / "digits_mlp.py", "quick")
        with config.unlocked():
            config.merge.methods = ("regmean+reset", "regmean[reg_coef=0.0]", "_test_learned")
            config.data.images_per_task = 40
            config.export.formats = ("safetensors",)
        rows = experiment.run(config, tmp_path)
    finally:
        registry._METHODS._items.pop("_test_learned")
    by_name = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    row = by_name["regmean+reset"]
    assert "error" not in row and 0.2 < row["joint_acc"] <= 1.0
    assert row["hparams"] == {"reg_coef": 0.7, "align": "permute", "convs": True,
                              "batch_size": 256}
    assert row["images_per_task"] == [40, 40]
    assert by_name["regmean[reg_coef=0.0]"]["hparams"]["reg_coef"] == 0.0
    fake = by_name["_test_learned"]
    assert fake["final_loss"] == 1.0 and (tmp_path / "plots" / "_test_learned_loss.png").exists()
    # the endpoints as a "merge": the ensemble's accuracy
    assert fake["joint_acc"] == pytest.approx(by_name["ensemble"]["joint_acc"])
    assert len(rows) == len(by_name)
    assert (tmp_path / "export" / "regmean+reset" / "head_1.safetensors").is_file()


@pytest.mark.parametrize("fields, culprit", [
    ({"merge.methods": ("regmean@hidden0",)}, "partial merging"),
    ({"merge.methods": ('regmean[align="zipit"]',)}, "align"),
    ({"merge.regmean.reg_coef": 1.5}, "reg_coef"),
    ({"data.images_per_task": -1}, "images_per_task"),
])
def test_validation_checks_learned_entries(fields, culprit):
    config = load_config_file(ROOT / "configs" / "digits_mlp.py", "quick")
    with config.unlocked():
        for field, value in fields.items():
            section, *rest = field.split(".")
            target = config[section]
            for part in rest[:-1]:
                target = target[part]
            target[rest[-1]] = value
    with pytest.raises(validation.ConfigError, match=culprit):
        validation.validate(config)


def test_validation_accepts_learned_entries():
    config = load_config_file(ROOT / "configs" / "digits_mlp.py", "quick")
    with config.unlocked():
        config.merge.methods = ("regmean", 'regmean[align="none",reg_coef=0.5]+repair')
    validation.validate(config)
