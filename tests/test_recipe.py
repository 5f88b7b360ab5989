"""mergejax.recipe: mergekit-style YAML recipes on tiny MLP checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import yaml

from mergejax import methods, models
from mergejax import recipe as R
from mergejax.io import checkpoint
from mergejax.specs import flatten, unflatten

REPO = Path(__file__).resolve().parents[1]
NAMES3 = ["params/dense_0/kernel", "params/dense_1/kernel", "params/dense_2/kernel",
          "params/linear/kernel", "params/conv1/kernel"]


# --------------------------------------------------------------------------------------------
# Fixtures: a base and three "fine-tuned" MLPs (dense_0..dense_2 + head), orbax and safetensors
# --------------------------------------------------------------------------------------------


def _trees(hidden=(8, 8, 8), n=3, seed=0):
    model = models.create("mlp", num_classes=3, hidden=hidden)
    base = jax.tree.map(np.asarray, model.init(jax.random.key(seed), jnp.zeros((1, 4, 4, 1))))
    rng = np.random.default_rng(seed + 1)
    tuned = [jax.tree.map(lambda a: (a + 0.1 * rng.standard_normal(a.shape)).astype(a.dtype),
                          base) for _ in range(n)]
    return base, tuned


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{'base', 'm0', 'm1', 'm2'} -> orbax dir; 'st:<name>' -> .safetensors; 'trees'."""
    root = tmp_path_factory.mktemp("ckpts")
    base, tuned = _trees()
    out = {"trees": (base, tuned)}
    for name, tree in [("base", base)] + [(f"m{i}", t) for i, t in enumerate(tuned)]:
        out[name] = str(checkpoint.save(root / name, tree, {"model": "mlp"}))
        R.save_flat_safetensors(root / f"{name}.safetensors", flatten(tree))
        out[f"st:{name}"] = str(root / f"{name}.safetensors")
    return out


def _run(tmp_path, raw, **kw):
    out = tmp_path / "out"
    R.run(R.parse(raw), out, **kw)
    orbax = checkpoint.load(out / "orbax")
    st = R.load_flat_safetensors(out / "model.safetensors")
    assert sorted(st) == sorted(flatten(orbax))
    for k, v in flatten(orbax).items():
        np.testing.assert_array_equal(st[k], v)
        assert st[k].dtype == v.dtype
    return orbax


def _assert_trees_equal(a, b, **tol):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if tol:
            np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k, **tol)
        else:
            np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _fn(name):
    return methods.get(name).fn("weight_space")


# --------------------------------------------------------------------------------------------
# Methods map onto mergejax's
# --------------------------------------------------------------------------------------------


def test_ties_recipe_equals_direct_call(ckpts, tmp_path):
    base, tuned = ckpts["trees"]
    raw = {"merge_method": "ties", "base_model": ckpts["base"],
           "models": [{"model": ckpts[f"m{i}"]} for i in range(3)],
           "parameters": {"density": 0.5, "lambda": 0.8}}
    got = _run(tmp_path, raw)
    want = _fn("ties")(base, tuned, lam=0.8, density=0.5, disjoint="mean", zero_sign="positive",
                       scope="tensor")
    _assert_trees_equal(got, want)
    # mergejax's default (global) TIES trims differently: the mapping is not vacuous.
    other = _fn("ties")(base, tuned, lam=0.8, density=0.5)
    assert not np.allclose(flatten(got)["params/dense_0/kernel"],
                           flatten(other)["params/dense_0/kernel"])


def test_ties_equal_weights_without_normalize_is_disjoint_sum(ckpts, tmp_path):
    base, tuned = ckpts["trees"]
    raw = {"merge_method": "ties", "base_model": ckpts["base"],
           "models": [{"model": ckpts[f"m{i}"], "parameters": {"weight": 0.5}} for i in range(3)],
           "parameters": {"density": 0.5, "normalize": False}}
    want = _fn("ties")(base, tuned, lam=0.5, density=0.5, disjoint="sum", zero_sign="positive",
                       scope="tensor")
    _assert_trees_equal(_run(tmp_path, raw), want)


def _mergekit_gta(base, tuned, weights, densities, *, lam, normalize, consensus=True):
    """Independent numpy reference of mergekit's GTA (weights before the sign election,
    divisor = sum of agreeing weights) with magnitude sparsification."""
    out = {}
    for k, b in flatten(base).items():
        b = b.astype(np.float32)
        deltas = []
        for t, d in zip(tuned, densities):
            x = flatten(t)[k].astype(np.float32) - b
            # mergejax's (official TIES / tall_masks) threshold: keep |x| >= the
            # (n - int(n d))-th smallest |x|, one entry more than mergekit's top int(n d).
            thr = np.sort(np.abs(x).ravel())[x.size - int(x.size * d) - 1]
            deltas.append(np.where(np.abs(x) >= thr, x, 0) if d < 1 else x)
        w = np.asarray(weights, np.float32).reshape(-1, *([1] * b.ndim))
        wd = np.stack(deltas) * w
        if consensus:
            mask = np.sign(wd) == np.where(wd.sum(0) >= 0, 1, -1)
            mixed, div = (wd * mask).sum(0), (w * mask).sum(0)
            div[div == 0] = 1
        else:
            mixed, div = wd.sum(0), w.sum()
        out[k] = b + lam * (mixed / div if normalize else mixed)
    return unflatten(out)


@pytest.mark.parametrize("weights,densities,normalize", [
    ((1.0, 1.0, 1.0), (0.5, 0.5, 0.5), True),  # one mergejax ties call
    ((1.0, 0.5, 2.0), (0.5, 0.5, 0.5), True),  # per-model weights
    ((1.0, 0.5, 2.0), (0.9, 0.5, 0.3), False),  # per-model densities
])
def test_ties_matches_mergekit_semantics(ckpts, tmp_path, weights, densities, normalize):
    base, tuned = ckpts["trees"]
    raw = {"merge_method": "ties", "base_model": ckpts["base"],
           "models": [{"model": ckpts[f"m{i}"],
                       "parameters": {"weight": weights[i], "density": densities[i]}}
                      for i in range(3)],
           "parameters": {"lambda": 0.7, "normalize": normalize}}
    want = _mergekit_gta(base, tuned, weights, densities, lam=0.7, normalize=normalize)
    _assert_trees_equal(_run(tmp_path, raw), want, rtol=1e-5, atol=1e-6)


def test_dare_ties_equals_direct_call_with_group_key(ckpts, tmp_path):
    base, tuned = ckpts["trees"]
    raw = {"merge_method": "dare_ties", "base_model": ckpts["base"],
           "models": [{"model": ckpts[f"m{i}"]} for i in range(3)],
           "parameters": {"density": 0.7}}
    got = _run(tmp_path, raw, seed=3)
    key = jax.random.fold_in(jax.random.key(3), 0)  # one group -> group 0's key
    want = _fn("dare")(base, tuned, key=key, p=1 - 0.7, lam=1.0, rescale="l1", merge="ties",
                       density=1.0, disjoint="sum", zero_sign="positive", scope="tensor")
    _assert_trees_equal(got, want)


def test_breadcrumbs_ties_and_normalized_dare_linear_equal_direct_calls(ckpts, tmp_path):
    base, tuned = ckpts["trees"]
    entries = [{"model": ckpts[f"m{i}"], "parameters": {"weight": 0.4}} for i in range(3)]
    raw = {"merge_method": "breadcrumbs_ties", "base_model": ckpts["base"], "models": entries,
           "parameters": {"density": 0.6, "gamma": 0.1, "lambda": 0.9}}
    want = _fn("breadcrumbs")(base, tuned, lam=0.9 * 0.4, density=0.6, gamma=0.1,
                              scope="tensor", merge="ties", disjoint="sum", zero_sign="positive")
    _assert_trees_equal(_run(tmp_path / "bt", raw), want)
    raw = {"merge_method": "dare_linear", "base_model": ckpts["base"], "models": entries,
           "parameters": {"density": 0.6, "normalize": True, "rescale": False}}
    key = jax.random.fold_in(jax.random.key(0), 0)
    want = _fn("dare")(base, tuned, key=key, p=1 - 0.6, lam=0.4 / 1.2, rescale="none")
    _assert_trees_equal(_run(tmp_path / "dl", raw), want, rtol=1e-6, atol=1e-7)


def test_dare_per_model_path_drops_as_the_single_call(ckpts, tmp_path):
    # Unequal weights take the per-model path; its drops must be the one-call path's: with
    # S = sum_t drop_t (weights 1, 1, 1), B_k (weight 2 on model k) = base + S + drop_k, so
    # B_0 + B_1 + B_2 = 3 base + 4 S = 4 (base + S) - base.
    def dare(weights):
        raw = {"merge_method": "dare_linear", "base_model": ckpts["base"],
               "parameters": {"density": 0.5},
               "models": [{"model": ckpts[f"m{i}"], "parameters": {"weight": w}}
                          for i, w in enumerate(weights)]}
        return flatten(_run(tmp_path / str(weights), raw))

    a = dare((1, 1, 1))
    bs = [dare(tuple(2 if i == k else 1 for i in range(3))) for k in range(3)]
    base = flatten(ckpts["trees"][0])
    for name in a:
        np.testing.assert_allclose(sum(b[name] for b in bs), 4 * a[name] - base[name],
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_task_arithmetic_and_breadcrumbs_take_per_model_weights(ckpts, tmp_path):
    base, tuned = ckpts["trees"]
    entries = [{"model": ckpts[f"m{i}"], "parameters": {"weight": w}}
               for i, w in enumerate((1.0, 0.5, 2.0))]
    raw = {"merge_method": "task_arithmetic", "base_model": ckpts["base"], "models": entries,
           "parameters": {"lambda": 0.3}}
    want = _fn("task_arithmetic")(base, tuned, lam=0.3, weights=(1.0, 0.5, 2.0))
    _assert_trees_equal(_run(tmp_path / "ta", raw), want)
    raw = {**raw, "merge_method": "breadcrumbs", "parameters": {"density": 0.6, "gamma": 0.1}}
    want = _fn("breadcrumbs")(base, tuned, lam=1.0, density=0.6, gamma=0.1, scope="tensor",
                              weights=(1.0, 0.5, 2.0))
    _assert_trees_equal(_run(tmp_path / "bc", raw), want)


def test_linear_weights_normalize(ckpts, tmp_path):
    base, tuned = ckpts["trees"]

    def linear(weights, **params):
        raw = {"merge_method": "linear", "parameters": params,
               "models": [{"model": ckpts[f"m{i}"], "parameters": {"weight": w}}
                          for i, w in enumerate(weights)]}
        return _run(tmp_path / f"{weights}{params}", raw)

    avg = _fn("average")(None, tuned[:2])
    _assert_trees_equal(linear((2, 2)), avg)
    _assert_trees_equal(linear((1, 1)), avg)
    _assert_trees_equal(linear((2, 2), normalize=False),
                        jax.tree.map(lambda a, b: 2 * a + 2 * b, *tuned[:2]), rtol=1e-6)
    lopsided = linear((3, 1))
    _assert_trees_equal(lopsided, jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, *tuned[:2]),
                        rtol=1e-6)


def test_slerp_t0_is_base_model(ckpts, tmp_path):
    base, tuned = ckpts["trees"]
    raw = {"merge_method": "slerp", "base_model": ckpts["m1"],
           "models": [{"model": ckpts["m0"]}, {"model": ckpts["m1"]}],
           "parameters": {"t": [{"filter": "linear", "value": 0.0}, {"value": 0.3}]}}
    got = flatten(_run(tmp_path, raw))
    want = flatten(_fn("slerp")(None, [tuned[1], tuned[0]], t=0.3))
    head = flatten(tuned[1])["params/linear/kernel"]
    np.testing.assert_array_equal(got["params/linear/kernel"], head)  # filter: t = 0
    np.testing.assert_array_equal(got["params/dense_0/kernel"], want["params/dense_0/kernel"])


# --------------------------------------------------------------------------------------------
# Parameter values: gradients over layers, filters, precedence
# --------------------------------------------------------------------------------------------


def test_layer_positions():
    t = R.layer_positions(NAMES3 + ["batch_stats/dense_1/mean"])
    assert [t[n] for n in NAMES3] == [0.0, 0.5, 1.0, 1.0, 0.0]  # head t=1, stem t=0
    assert t["batch_stats/dense_1/mean"] == 0.5  # collections share the layer
    resnet = ["params/layer1_0/c/kernel", "params/layer1_1/c/kernel", "params/layer2_0/c/kernel",
              "params/layer10_0/c/kernel", "params/conv1/kernel"]
    t = R.layer_positions(resnet)
    assert [t[n] for n in resnet] == [0.0, 1 / 3, 2 / 3, 1.0, 0.0]  # numeric, not string order
    assert R.layer_key("params/layer2_1/conv1/kernel") == (2, 1)
    assert R.layer_key("params/conv1/kernel") is None
    assert R.layer_positions(["params/dense_0/kernel"]) == {"params/dense_0/kernel": 1.0}  # L=1


def _plan_values(raw, names, param, model=None):
    groups = R.plan(R.parse(raw, check_files=False), names)
    out = {}
    for g in groups:
        for n in g.names:
            out[n] = g.params[param] if model is None else g.model_params[model][param]
    return out


def _ties(params=None, own=None):
    return {"merge_method": "ties", "base_model": "b",
            "models": [{"model": "m0", "parameters": own or {}}, {"model": "m1"}],
            "parameters": params or {}}


@pytest.mark.parametrize("a,b", [(0.2, 0.8), (0.9, 0.1)])
def test_gradient_interpolates_over_layers(a, b):
    got = _plan_values(_ties({"lambda": [a, b]}), NAMES3, "lambda")
    for name in NAMES3[:3]:
        idx = int(name.split("_")[1][0])
        assert got[name] == pytest.approx(a + (b - a) * idx / 2)
    assert got["params/linear/kernel"] == pytest.approx(b)  # post-layer: t = 1
    assert got["params/conv1/kernel"] == pytest.approx(a)  # pre-layer: t = 0
    # one layer: t = 1 -> b
    assert _plan_values(_ties({"lambda": [a, b]}), ["params/dense_0/kernel"],
                        "lambda") == {"params/dense_0/kernel": pytest.approx(b)}


def test_gradient_piecewise():
    assert R.evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert R.evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert R.evaluate_setting([0.0, 1.0, 0.0], "x", 0.5) == pytest.approx(1.0)
    assert R.evaluate_setting([3.0, 1.0, 5.0], "x", 1.0) == 5.0


def test_filters_first_match_wins_and_catch_all():
    conds = [{"filter": "dense_1", "value": 0.3}, {"filter": "dense", "value": 0.5},
             {"filter": "*", "value": 0.9}, {"value": 0.1}]
    got = _plan_values(_ties({"lambda": conds}), NAMES3, "lambda")
    assert got == {"params/dense_0/kernel": 0.5, "params/dense_1/kernel": 0.3,
                   "params/dense_2/kernel": 0.5, "params/linear/kernel": 0.9,
                   "params/conv1/kernel": 0.9}
    swapped = [conds[1], conds[0], {"value": 0.1}]
    got = _plan_values(_ties({"lambda": swapped}), NAMES3, "lambda")
    assert got["params/dense_1/kernel"] == 0.5  # "dense" matches first
    assert got["params/linear/kernel"] == 0.1  # no filter = catch-all
    # a condition's value may be a gradient
    got = _plan_values(_ties({"lambda": [{"filter": "dense", "value": [0, 1]}, {"value": 7}]}),
                       NAMES3, "lambda")
    assert got["params/dense_1/kernel"] == pytest.approx(0.5) and got["params/conv1/kernel"] == 7


def test_model_params_override_global_then_default():
    own = {"density": [{"filter": "dense_0", "value": 0.3}], "weight": 2.0}
    raw = _ties({"density": 0.6}, own)
    d0 = _plan_values(raw, NAMES3, "density", model=0)
    d1 = _plan_values(raw, NAMES3, "density", model=1)
    assert d0["params/dense_0/kernel"] == 0.3  # model value wins
    assert d0["params/dense_1/kernel"] == 0.6  # no model filter matched: global
    assert set(d1.values()) == {0.6}
    assert set(_plan_values(raw, NAMES3, "weight", model=0).values()) == {2.0}
    assert set(_plan_values(raw, NAMES3, "weight", model=1).values()) == {1.0}  # default
    assert set(_plan_values(_ties(), NAMES3, "density", model=1).values()) == {1.0}
    # tensors with equal resolved values form one group
    groups = R.plan(R.parse(raw, check_files=False), NAMES3)
    assert sorted(len(g.names) for g in groups) == [1, 4]


def test_per_layer_linear_weights_end_to_end(ckpts, tmp_path):
    base, tuned = ckpts["trees"]
    raw = {"merge_method": "linear",
           "models": [{"model": ckpts["st:m0"], "parameters": {"weight": [1.0, 0.0]}},
                      {"model": ckpts["st:m1"], "parameters": {"weight": [0.0, 1.0]}}]}
    got = flatten(_run(tmp_path, raw))
    a, b = flatten(tuned[0]), flatten(tuned[1])
    np.testing.assert_array_equal(got["params/dense_0/kernel"], a["params/dense_0/kernel"])
    np.testing.assert_allclose(got["params/dense_1/kernel"],
                               0.5 * a["params/dense_1/kernel"] + 0.5 * b["params/dense_1/kernel"],
                               rtol=1e-6)
    np.testing.assert_array_equal(got["params/dense_2/kernel"], b["params/dense_2/kernel"])
    np.testing.assert_array_equal(got["params/linear/bias"], b["params/linear/bias"])


# --------------------------------------------------------------------------------------------
# Files: safetensors layout, dtypes, outputs
# --------------------------------------------------------------------------------------------


def test_safetensors_inputs_and_outputs_round_trip(ckpts, tmp_path):
    raw = {"merge_method": "ties", "base_model": ckpts["st:base"],
           "models": [{"model": ckpts[f"st:m{i}"]} for i in range(3)],
           "parameters": {"density": 0.5}}
    from_st = _run(tmp_path / "st", raw)
    raw_orbax = {**raw, "base_model": ckpts["base"],
                 "models": [{"model": ckpts[f"m{i}"]} for i in range(3)]}
    _assert_trees_equal(from_st, _run(tmp_path / "orbax", raw_orbax))
    out = tmp_path / "st" / "out"
    with safetensors.safe_open(out / "model.safetensors", "numpy") as f:
        meta = f.metadata()
    assert json.loads(meta["recipe"]) == raw and meta["format"] == "flax"
    assert checkpoint.load_meta(out / "orbax")["recipe"] == raw
    assert yaml.safe_load((out / "recipe.yml").read_text()) == raw
    # orbax inputs carry the model's identity to the output
    assert checkpoint.load_meta(tmp_path / "orbax" / "out" / "orbax")["model"] == "mlp"
    # a recipe output directory is itself an input
    again = {"merge_method": "linear", "models": [{"model": str(out)}]}
    _assert_trees_equal(_run(tmp_path / "again", again), from_st)


def test_dtype_casts_inputs_and_out_dtype_sets_storage(ckpts, tmp_path):
    base, tuned = ckpts["trees"]
    raw = {"merge_method": "linear", "dtype": "float16",
           "models": [{"model": ckpts["m0"]}, {"model": ckpts["m1"]}]}
    got = _run(tmp_path / "f16", raw)
    f16 = [jax.tree.map(lambda a: a.astype(np.float16), t) for t in tuned[:2]]
    want = jax.tree.map(lambda a: a.astype(np.float16).astype(np.float32),
                        _fn("average")(None, f16))
    _assert_trees_equal(got, want)  # computed from float16 inputs, stored as the input float32
    exact = _fn("average")(None, tuned[:2])
    assert not np.array_equal(flatten(got)["params/dense_0/kernel"],
                              flatten(exact)["params/dense_0/kernel"])
    got = _run(tmp_path / "bf16", {**raw, "dtype": None, "out_dtype": "bfloat16"})
    assert {str(v.dtype) for v in flatten(got).values()} == {"bfloat16"}
    _assert_trees_equal(jax.tree.map(lambda a: a.astype(np.float32), got),
                        jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(np.float32), exact))


# --------------------------------------------------------------------------------------------
# Errors: found before anything is read or written
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_reads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a checkpoint was read")

    monkeypatch.setattr(R.checkpoint_io, "read_model", boom)
    monkeypatch.setattr(checkpoint, "load", boom)
    monkeypatch.setattr(R.checkpoint_io, "load_flat_safetensors", boom)


@pytest.mark.parametrize("change,message", [
    ({"merge_method": "della"}, "supported methods: linear, task_arithmetic, ties"),
    ({"parameters": {"epsilon": 0.1}}, "'epsilon' is not supported by ties; supported: weight"),
    ({"parameters": {"density": 1.5}}, "density: must be in (0, 1], got 1.5"),
    ({"parameters": {"density": [0.5, "x"]}}, "a list must be a gradient"),
    ({"parameters": {"normalize": 1}}, "normalize: must be true or false"),
    ({"parameters": {"density": [{"filter": "a", "value": 0.5, "oops": 1}]}},
     "a condition must be {filter, value}"),
    ({"models": [{"model": "MISSING", "parameters": {"lambda": 1.0}}]},
     "'lambda' is global: give it under the top-level parameters"),
    ({"models": [{"model": "MISSING"}]}, "MISSING does not exist"),
    ({"base_model": None}, "ties needs base_model"),
    ({"slices": []}, "'slices' is a mergekit option"),
    ({"dtype": "int8"}, "dtype 'int8' is not supported"),
])
def test_bad_recipes_fail_before_reading_or_writing(ckpts, tmp_path, no_reads, change, message):
    raw = {"merge_method": "ties", "base_model": ckpts["base"],
           "models": [{"model": ckpts["m0"]}, {"model": ckpts["m1"]}], **change}
    out = tmp_path / "out"
    with pytest.raises(R.RecipeError) as e:
        R.run(R.parse(raw), out)
    assert message in str(e.value)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_mismatched_trees_name_the_leaf(ckpts, tmp_path):
    _, other = _trees(hidden=(8, 9, 8), n=1)
    checkpoint.save(tmp_path / "wide", other[0])
    out = tmp_path / "out"
    out.mkdir()
    raw = {"merge_method": "task_arithmetic", "base_model": ckpts["base"],
           "models": [{"model": ckpts["m0"]}, {"model": str(tmp_path / "wide")}]}
    with pytest.raises(R.RecipeError, match=r"leaf 'params/dense_1/bias' is float32\[9\] there"):
        R.run(R.parse(raw), out)
    assert os.listdir(out) == [] and sorted(os.listdir(tmp_path)) == ["out", "wide"]


def test_non_empty_out_dir_needs_overwrite(ckpts, tmp_path):
    raw = {"merge_method": "linear", "models": [{"model": ckpts["m0"]}]}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(R.RecipeError, match="not empty; pass --overwrite"):
        R.run(R.parse(raw), out)
    R.run(R.parse(raw), out, overwrite=True)
    assert sorted(os.listdir(out)) == ["model.safetensors", "orbax", "recipe.yml"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary left behind


def test_example_recipes_validate():
    files = sorted((REPO / "configs" / "recipes").glob("*.yml"))
    assert files
    for f in files:
        R.load_recipe(f, check_files=False)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mergejax.recipe", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_help_run_and_error(ckpts, tmp_path):
    r = _cli("--help")
    assert r.returncode == 0
    for word in list(R.METHODS) + list(R.PARAMETERS) + ["--out-dir", "gradient"]:
        assert word in r.stdout
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "dare_linear", "base_model": ckpts["base"],
        "models": [{"model": ckpts["m0"], "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": ckpts["st:m1"], "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": 0.9}, "out_dtype": "float16"}))
    r = _cli(recipe, "--out-dir", tmp_path / "out", "--random-seed", "1")
    assert r.returncode == 0, r.stderr
    assert "dare_linear: merged 2 models" in r.stdout and len(r.stdout.splitlines()) == 1
    st = R.load_flat_safetensors(tmp_path / "out" / "model.safetensors")
    assert {v.dtype for v in st.values()} == {np.dtype(np.float16)}
    recipe.write_text(recipe.read_text().replace("dare_linear", "model_stock"))
    r = _cli(recipe, "--out-dir", tmp_path / "bad")
    assert r.returncode == 2 and "model_stock" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(ckpts, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": ckpts["base"],
        "models": [{"model": ckpts["m0"], "parameters": {"density": [0.2, 0.8]}},
                   {"model": ckpts["m1"]}]}))
    assert R.main([str(recipe), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.count("group ") == 3  # dense_0 (0.2), dense_1 (0.5), dense_2 + linear (0.8)
    assert "'density': 0.5" in text and "params/dense_1/kernel" in text
    assert os.listdir(tmp_path) == ["r.yml"]
