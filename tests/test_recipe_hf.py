"""mergejax.recipe on PyTorch / Hugging Face checkpoints: out-of-core merges of a tiny Llama.

A random bf16 `LlamaForCausalLM` (built from a config, no download) saved sharded by
`save_pretrained`, and three perturbed copies as fine-tuned models. Each recipe's output must
load in `transformers` and equal an independent numpy reference of the recipe.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import yaml
from helpers import distributed_env, free_port, run_together

from mergejax import recipe as R
from mergejax.io.atomic import remove_stale_temporaries
from mergejax.recipe.hf_io import CheckpointInputError, Source

REPO = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
SHARD = "4KB"  # the tiny model (13 KB) in 4 input shards; outputs in 3-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """{'base', 'ft0'..'ft2'} -> sharded HF directories; 'sd:<name>' -> {name: np bf16}."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = {"cfg": cfg}
    gen = torch.Generator().manual_seed(1)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("base", "ft0", "ft1", "ft2"):
        if name != "base":
            sd = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=gen)).to(v.dtype)
                  for k, v in base_sd.items()}
            model.load_state_dict(sd)
        model.save_pretrained(root / name, max_shard_size=SHARD)
        out[name] = str(root / name)
        out[f"sd:{name}"] = {k: v.view(torch.int16).numpy().view(BF16).copy()
                             for k, v in model.state_dict().items()}
    assert len(list((root / "base").glob("*.safetensors"))) > 1  # really sharded
    return out


def _read_dir(path) -> dict:
    """{name: array} of an output directory, read through its index."""
    src = Source(path)
    try:
        return {n: src.read(n) for n in src.names}
    finally:
        src.close()


def _f32(x):
    return np.asarray(x, np.float32)


# --------------------------------------------------------------------------------------------
# Independent numpy references (mergekit semantics; global trim = TIES paper)
# --------------------------------------------------------------------------------------------


def _trim(taus: dict, density: float, scope: str) -> dict:
    """Keep |tau| >= the (n - int(n d))-th smallest |tau| (ties kept), per tensor or over
    all tensors of the model."""
    if density >= 1:
        return taus
    if scope == "global":
        allv = np.sort(np.concatenate([np.abs(t).ravel() for t in taus.values()]))
        thr = {k: allv[allv.size - int(allv.size * density) - 1] for k in taus}
    else:
        thr = {k: np.sort(np.abs(t).ravel())[t.size - int(t.size * density) - 1]
               for k, t in taus.items()}
    return {k: np.where(np.abs(t) >= thr[k], t, np.float32(0)) for k, t in taus.items()}


def ref_gta(base, tuned, weights, *, lam, normalize, consensus, density=1.0, scope="tensor",
            masks=None):
    """base + lam * (elected) weighted sum of (trimmed / DARE-masked) task vectors, in f32,
    stored as bf16."""
    taus = [{k: _f32(m[k]) - _f32(b) for k, b in base.items()} for m in tuned]
    taus = [_trim(t, density, scope) for t in taus]
    if masks is not None:
        taus = [{k: np.where(masks[i][k], t[k], np.float32(0)) for k in t}
                for i, t in enumerate(taus)]
    out = {}
    for k, b in base.items():
        w = np.asarray(weights, np.float32).reshape(-1, *([1] * b.ndim))
        wd = np.stack([t[k] for t in taus]) * w
        if consensus:
            keep = np.sign(wd) == np.where(wd.sum(0) >= 0, 1, -1)
            mixed, div = (wd * keep).sum(0), (w * keep).sum(0)
            div[div == 0] = 1
        else:
            mixed, div = wd.sum(0), np.float32(w.sum())
        out[k] = (_f32(b) + np.float32(lam) * (mixed / div if normalize else mixed)).astype(BF16)
    return out


def ref_linear(models, weights):
    """sum_t w_t theta_t / sum_t w_t in float32, stored as bf16."""
    w = np.asarray(weights, np.float32) / np.float32(np.sum(weights))
    return {k: sum(wi * _f32(m[k]) for wi, m in zip(w, models)).astype(BF16) for k in models[0]}


def ref_consensus(base, tuned, mask_lams, *, lam, k, density=None):
    """Consensus merging in numpy (tall_masks): tau_MTL = sum of task vectors, or TIES (global
    trim, disjoint sum, majority sign where the sum is 0); TALL masks |theta_0 - theta_t| >
    |theta_0 + tau_MTL - theta_t| * lam_t; keep tau_MTL where >= k masks agree."""
    taus = [{n: _f32(m[n]) - _f32(b) for n, b in base.items()} for m in tuned]
    if density is None:
        mtv = {n: sum(t[n] for t in taus) for n in base}
    else:
        trimmed = [_trim(t, density, "global") for t in taus]
        totals = {n: sum(t[n] for t in trimmed) for n in base}
        majority = np.sign(sum(int(np.sign(v).sum()) for v in totals.values()))
        mtv = {}
        for n, total in totals.items():
            s = np.where(np.sign(total) == 0, majority, np.sign(total))
            mtv[n] = sum(np.where(np.where(s > 0, t[n] > 0, t[n] < 0), t[n], np.float32(0))
                         for t in trimmed)
    out = {}
    for n, b in base.items():
        b32 = _f32(b)
        mt = _f32(mtv[n].astype(BF16))  # tau_MTL is held in the models' dtype, as mergejax
        count = sum((np.abs(b32 - _f32(m[n])) > np.abs(b32 + mt - _f32(m[n])) * np.float32(
            lt)).astype(np.int32) for m, lt in zip(tuned, mask_lams))
        out[n] = (b32 + np.float32(lam) * np.where(count >= k, mt, np.float32(0))).astype(BF16)
    return out


def ref_slerp(a, b, t):
    out = {}
    for k in a:
        x, y = _f32(a[k]), _f32(b[k])
        nx, ny = x.ravel() / np.linalg.norm(x), y.ravel() / np.linalg.norm(y)
        dot = float(np.sum(nx * ny))
        if abs(dot) > 0.9995:
            r = (1 - t) * x + t * y
        else:
            om = np.arccos(dot)
            r = np.sin((1 - t) * om) / np.sin(om) * x + np.sin(t * om) / np.sin(om) * y
        out[k] = r.astype(np.float32).astype(BF16)
    return out


def dare_masks(names, shapes, seed: int, density: float, n_models: int):
    """The documented DARE keys: fold_in(fold_in(key(seed), crc32(name)), model), leaf 0."""
    out = [{} for _ in range(n_models)]
    for k in names:
        kt = jax.random.fold_in(jax.random.key(seed), zlib.crc32(k.encode()) & 0x7FFFFFFF)
        for t in range(n_models):
            key = jax.random.fold_in(jax.random.fold_in(kt, t), 0)
            out[t][k] = np.asarray(jax.random.bernoulli(key, density, shapes[k]))
    return out


def _assert_close_bf16(got: dict, want: dict, ulps: int = 0):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == BF16 and got[k].shape == want[k].shape, k
        if ulps == 0:
            np.testing.assert_array_equal(_f32(got[k]), _f32(want[k]), err_msg=k)
        else:  # transcendental functions: jax and numpy may differ by a float32 ulp
            np.testing.assert_allclose(_f32(got[k]), _f32(want[k]), rtol=ulps * 2.0**-7,
                                       atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------------------------
# Recipes on sharded HF checkpoints
# --------------------------------------------------------------------------------------------

W = (1.0, 0.5, 2.0)
W_EQUAL = 0.5  # a power of two: scaling by it is exact, so either order of operations agrees
MASK_LAMBDAS = (0.4, 0.6, 0.5)


def _recipe(llama, method):
    gta = {"base_model": llama["base"],
           "models": [{"model": llama[f"ft{i}"], "parameters": {"weight": W[i]}}
                      for i in range(3)]}
    equal = {**gta, "models": [{"model": llama[f"ft{i}"], "parameters": {"weight": W_EQUAL}}
                               for i in range(3)]}
    return {
        "ties_global": {"merge_method": "ties", **gta,
                        "parameters": {"density": 0.3, "lambda": 0.9, "scope": "global"}},
        "ties_tensor": {"merge_method": "ties", **gta, "parameters": {"density": 0.3}},
        # equal weights: mergejax's own TIES election (the trim applied inside its kernel)
        "ties_equal_tensor": {"merge_method": "ties", **equal,
                              "parameters": {"density": 0.3, "normalize": False}},
        "ties_equal_global": {"merge_method": "ties", **equal,
                              "parameters": {"density": 0.3, "lambda": 0.9, "scope": "global"}},
        "dare": {"merge_method": "dare_linear", **gta,
                 "parameters": {"density": 0.6, "rescale": False, "lambda": 0.8}},
        "task_arithmetic": {"merge_method": "task_arithmetic", **gta,
                            "parameters": {"lambda": 0.7}},
        "linear": {"merge_method": "linear",
                   "models": [{"model": llama[f"ft{i}"], "parameters": {"weight": W[i]}}
                              for i in range(3)]},
        "consensus_sum": {"merge_method": "consensus", "base_model": llama["base"],
                          "models": [{"model": llama[f"ft{i}"],
                                      "parameters": {"mask_lambda": MASK_LAMBDAS[i]}}
                                     for i in range(3)],
                          "parameters": {"lambda": 0.7, "k": 2}},
        "consensus_ties": {"merge_method": "consensus", "base_model": llama["base"],
                           "models": [{"model": llama[f"ft{i}"],
                                       "parameters": {"mask_lambda": MASK_LAMBDAS[i]}}
                                      for i in range(3)],
                           "parameters": {"lambda": 0.9, "k": 2, "merged": "ties",
                                          "density": 0.3}},
        "slerp": {"merge_method": "slerp", "base_model": llama["ft0"],
                  "models": [{"model": llama["ft0"]}, {"model": llama["ft1"]}],
                  "parameters": {"t": 0.3}},
    }[method]


def _want(llama, method):
    base, tuned = llama["sd:base"], [llama[f"sd:ft{i}"] for i in range(3)]
    if method == "ties_global":
        return ref_gta(base, tuned, W, lam=0.9, normalize=True, consensus=True, density=0.3,
                       scope="global")
    if method == "ties_tensor":
        return ref_gta(base, tuned, W, lam=1.0, normalize=True, consensus=True, density=0.3)
    if method == "ties_equal_tensor":
        return ref_gta(base, tuned, (W_EQUAL,) * 3, lam=1.0, normalize=False, consensus=True,
                       density=0.3)
    if method == "ties_equal_global":
        return ref_gta(base, tuned, (W_EQUAL,) * 3, lam=0.9, normalize=True, consensus=True,
                       density=0.3, scope="global")
    if method == "dare":
        masks = dare_masks(sorted(base), {k: v.shape for k, v in base.items()}, 0, 0.6, 3)
        return ref_gta(base, tuned, W, lam=0.8, normalize=False, consensus=False, masks=masks)
    if method == "task_arithmetic":
        return ref_gta(base, tuned, W, lam=0.7, normalize=False, consensus=False)
    if method == "linear":
        return ref_linear(tuned, W)
    if method.startswith("consensus"):
        ties = method == "consensus_ties"
        return ref_consensus(base, tuned, MASK_LAMBDAS, lam=0.9 if ties else 0.7, k=2,
                             density=0.3 if ties else None)
    return ref_slerp(tuned[0], tuned[1], 0.3)


@pytest.mark.parametrize("method", ["ties_global", "ties_tensor", "ties_equal_tensor",
                                    "ties_equal_global", "dare", "task_arithmetic", "linear",
                                    "slerp", "consensus_sum", "consensus_ties"])
def test_recipe_output_loads_in_transformers_and_equals_numpy(llama, tmp_path, method):
    import torch
    import transformers

    out = tmp_path / "out"
    summary = R.run(R.parse(_recipe(llama, method)), out, max_shard_size="5KB")
    assert "shard(s)" in summary
    got = _read_dir(out)
    _assert_close_bf16(got, _want(llama, method), ulps=1 if method == "slerp" else 0)
    ref_dir = Path(llama["ft0" if method in ("linear", "slerp") else "base"])
    assert (out / "config.json").read_bytes() == (ref_dir / "config.json").read_bytes()
    assert (out / "generation_config.json").is_file() and (out / "recipe.yml").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(got)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    assert model.dtype == torch.bfloat16
    for k, v in got.items():
        np.testing.assert_array_equal(sd[k].float().numpy(), _f32(v), err_msg=k)


@pytest.mark.parametrize("method", ["ties_tensor", "ties_global", "ties_equal_tensor",
                                    "ties_equal_global", "linear", "consensus_ties"])
def test_large_tensors_merged_in_row_blocks_give_the_same_result(llama, tmp_path, monkeypatch,
                                                                   method):
    """Blocks of 2 rows (every matrix split; ties' per-tensor threshold found over the
    blocks) give exactly the one-block result, i.e. the numpy reference."""
    from mergejax.recipe import stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 128)
    assert len(stream.row_blocks((16, 32), 2)) == 8
    R.run(R.parse(_recipe(llama, method)), tmp_path / "out")
    _assert_close_bf16(_read_dir(tmp_path / "out"), _want(llama, method))


def test_read_rows_reads_every_step_th_row(llama, tmp_path):
    """`Source.read_rows` (the whole-model bracket's sample) equals the full read's rows
    0, step, ...; 1-d tensors come whole; a file cut short is named."""
    src = Source(llama["ft0"])
    try:
        names = src.names
        assert any(len(src.info(n).shape) == 1 for n in names)
        for n in names:
            full = src.read(n)
            for step in (1, 3, 64):
                got = src.read_rows(n, step)
                want = full if full.ndim < 2 else full[::step]
                assert got.dtype == full.dtype and got.shape == want.shape, n
                np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=n)
    finally:
        src.close()
    cut = tmp_path / "cut.safetensors"
    _save_single(dict(llama["sd:ft1"]), cut)
    src = Source(cut)  # the header is read here; the file is cut afterwards
    try:
        name = max((n for n in src.names if len(src.info(n).shape) >= 2),
                   key=lambda n: src.info(n).offset)
        info = src.info(name)
        with open(cut, "r+b") as f:  # keeps its first row and a byte of the second
            f.truncate(info.offset + info.nbytes // info.shape[0] + 1)
        with pytest.raises(CheckpointInputError, match=f"{name!r} is truncated"):
            src.read_rows(name, 1)
    finally:
        src.close()


@pytest.mark.parametrize("method", ["ties_tensor", "ties_equal_tensor"])
def test_one_block_tensors_trimmed_by_the_bracket_select(llama, tmp_path, monkeypatch, method):
    """Tensors of one block from `topk.HOST_SELECT_MIN` entries on find their threshold with
    the streamed bracket select, not the method's host select: the same result."""
    from mergejax.kernels import topk

    monkeypatch.setattr(topk, "HOST_SELECT_MIN", 64)
    R.run(R.parse(_recipe(llama, method)), tmp_path / "out")
    _assert_close_bf16(_read_dir(tmp_path / "out"), _want(llama, method))


@pytest.mark.parametrize("method", ["ties_equal_tensor", "ties_equal_global"])
@pytest.mark.parametrize("where", ["model 1", "the base"])
def test_non_finite_input_of_a_blocked_ties_merge_is_named(llama, tmp_path, monkeypatch,
                                                            method, where):
    """The trim-in-kernel TIES path (row blocks, equal weights) checks its inputs too: a NaN,
    which TIES' election could otherwise drop silently, is refused naming the tensor and the
    input (the threshold's count pass sees it and leaves the check to `ties_block`)."""
    from mergejax.recipe import stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 128)
    name = "model.layers.1.mlp.up_proj.weight"
    sd = dict(llama["sd:base" if where == "the base" else "sd:ft1"])
    sd[name] = sd[name].copy()
    sd[name][-1, 3] = np.nan  # in the last row block
    _save_single(sd, tmp_path / "nan.safetensors")
    raw = _recipe(llama, method)
    if where == "the base":
        raw["base_model"] = str(tmp_path / "nan.safetensors")
    else:
        raw["models"][1]["model"] = str(tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointInputError, match=f"{name!r}.*{where} has non-finite"):
        R.run(R.parse(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ties_equal_tensor", "ties_equal_global"])
def test_blocked_ties_takes_the_input_check_from_the_count_pass(llama, tmp_path, monkeypatch,
                                                                 method):
    """Finite inputs: the bracket's count pass proves them finite, so `ties_block` does not
    read every input once more to check them; the merge is unchanged."""
    from mergejax.recipe import stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 128)
    checked = []

    def spy(*args, **kwargs):
        checked.append(kwargs.get("checked", False))
        return ties_block(*args, **kwargs)

    ties_block = stream.ties_block
    monkeypatch.setattr(stream, "ties_block", spy)
    R.run(R.parse(_recipe(llama, method)), tmp_path / "out")
    _assert_close_bf16(_read_dir(tmp_path / "out"), _want(llama, method))
    assert checked and all(checked), (sum(checked), len(checked))


def test_global_trim_differs_from_per_tensor_and_needs_one_density(llama, tmp_path):
    a, b = _want(llama, "ties_global"), _want(llama, "ties_tensor")
    assert any(not np.array_equal(_f32(a[k]), _f32(b[k])) for k in a)  # not a vacuous option
    raw = _recipe(llama, "ties_global")
    raw["models"][0]["parameters"]["density"] = [0.2, 0.8]
    with pytest.raises(R.RecipeError, match="one density per model"):
        R.run(R.parse(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_global_ties_in_memory_equals_mergejax_ties_global(tmp_path):
    """The same trim on mergejax's own (in-memory) inputs equals `ties(scope="global")`."""
    from mergejax import methods

    rng = np.random.default_rng(0)
    base = {"params": {f"dense_{i}": {"kernel": rng.standard_normal((6, 5)).astype(np.float32)}
                       for i in range(3)}}
    tuned = [jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                          base) for _ in range(2)]
    paths = []
    for name, tree in [("base", base), ("m0", tuned[0]), ("m1", tuned[1])]:
        R.save_flat_safetensors(tmp_path / f"{name}.safetensors",
                                {f"params/{k}/kernel": v["kernel"]
                                 for k, v in tree["params"].items()})
        paths.append(str(tmp_path / f"{name}.safetensors"))
    raw = {"merge_method": "ties", "base_model": paths[0],
           "models": [{"model": p} for p in paths[1:]],
           "parameters": {"density": 0.3, "scope": "global"}}
    R.run(R.parse(raw), tmp_path / "out")
    got = R.load_flat_safetensors(tmp_path / "out" / "model.safetensors")
    want = methods.get("ties").fn("weight_space")(base, tuned, density=0.3, scope="global",
                                                  disjoint="mean", zero_sign="positive")
    for k, v in want["params"].items():
        np.testing.assert_array_equal(got[f"params/{k}/kernel"], v["kernel"], err_msg=k)


def _planted_consensus_models():
    """base + 3 models whose TIES-elected sign sums to 0 on many kept entries (tau_2 = -tau_1
    there, tau_0 small enough to be trimmed) and whose majority sign is negative, so the
    zero-sign rule decides entries; bf16 like the HF models."""
    rng = np.random.default_rng(3)
    shapes = {"a.weight": (40, 24), "b.weight": (24, 16), "c.bias": (16,)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    taus = []
    for _ in range(3):
        taus.append({n: (0.05 * rng.standard_normal(s) - 0.04).astype(np.float32)
                     for n, s in shapes.items()})  # mostly negative: majority -1
    for n in shapes:  # base 0 there, so that tau_2 = -tau_1 holds exactly in bf16
        planted = rng.random(shapes[n]) < 0.3
        base[n] = np.where(planted, np.float32(0), base[n])
        taus[0][n] = np.where(planted, 1e-4 * np.sign(taus[0][n]), taus[0][n])
    tuned = [{n: (base[n] + t[n]).astype(BF16) for n in shapes} for t in taus]
    for n in shapes:
        planted = base[n] == 0
        tuned[2][n] = np.where(planted, -tuned[1][n], tuned[2][n])
    return {n: v.astype(BF16) for n, v in base.items()}, tuned


@pytest.mark.parametrize("merged", ["sum", "ties"])
def test_consensus_out_of_core_and_in_memory_equal_mergejax_consensus(tmp_path, merged):
    """Out of core (HF names) and in memory (mergejax names), the consensus recipe equals
    `mergejax.methods.consensus` on the same models bit for bit, also where TIES' sign sum is
    0 and the (negative) whole-model majority decides."""
    from mergejax import methods

    base, tuned = _planted_consensus_models()
    lam, k, mask_lams, density = 0.8, 2, [0.5, 0.3, 0.6], 0.4
    want = methods.get("consensus").fn("weight_space")(
        base, tuned, lam=lam, k=k, mask_lam=mask_lams, merged=merged, density=density)
    if merged == "ties":  # the planted entries really are decided by the zero-sign rule
        from mergejax.methods import task_vectors as tv

        m = tv.prepare(base, tuned, method="test")
        by_rule = [tv.merge_leaves(m, combine="ties-sum", trim="global", density=density,
                                   zero_sign=rule, add_base=False) for rule in
                   ("majority", "positive")]
        assert any(not np.array_equal(_f32(by_rule[0][n]), _f32(by_rule[1][n])) for n in base)
    for layout in ("hf", "mergejax"):
        paths = []
        for name, tree in [("base", base), ("m0", tuned[0]), ("m1", tuned[1]),
                           ("m2", tuned[2])]:
            flat = tree if layout == "hf" else {f"params/{n}": v for n, v in tree.items()}
            if layout == "hf":
                _save_single(flat, tmp_path / f"{layout}_{name}.safetensors")
            else:
                R.save_flat_safetensors(tmp_path / f"{layout}_{name}.safetensors", flat)
            paths.append(str(tmp_path / f"{layout}_{name}.safetensors"))
        raw = {"merge_method": "consensus", "base_model": paths[0],
               "models": [{"model": p, "parameters": {"mask_lambda": ml}}
                          for p, ml in zip(paths[1:], mask_lams)],
               "parameters": {"lambda": lam, "k": k, "merged": merged, "density": density}}
        R.run(R.parse(raw), tmp_path / f"out_{layout}")
        if layout == "hf":
            got = _read_dir(tmp_path / "out_hf")
        else:
            got = {n[len("params/"):]: v for n, v in R.load_flat_safetensors(
                tmp_path / "out_mergejax" / "model.safetensors").items()}
        for n, v in want.items():
            assert got[n].dtype == BF16, (layout, n)
            np.testing.assert_array_equal(_f32(got[n]), _f32(v), err_msg=f"{layout} {n}")


# --------------------------------------------------------------------------------------------
# Input formats and reading order
# --------------------------------------------------------------------------------------------


def _save_single(sd: dict, path: Path, reverse: bool = True):
    import safetensors.torch
    import torch

    names = sorted(sd, reverse=reverse)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(sd[k]).view(np.int16)).view(
        torch.bfloat16) for k in names}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def test_bin_pt_and_single_safetensors_inputs_and_dare_reading_order(llama, tmp_path):
    import torch

    def tsd(name):
        return {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
                for k, v in llama[f"sd:{name}"].items()}

    torch.save(tsd("base"), tmp_path / "base.bin")
    torch.save(tsd("ft0"), tmp_path / "ft0.pt")
    _save_single(llama["sd:ft1"], tmp_path / "ft1.safetensors")  # another tensor order
    (tmp_path / "ft2").mkdir()
    torch.save(tsd("ft2"), tmp_path / "ft2" / "pytorch_model.bin")
    for method in ("task_arithmetic", "dare"):
        raw = _recipe(llama, method)
        raw["base_model"] = str(tmp_path / "base.bin")
        for m, p in zip(raw["models"], ("ft0.pt", "ft1.safetensors", "ft2")):
            m["model"] = str(tmp_path / p)
        R.run(R.parse(raw), tmp_path / method)
        # DARE's masks come from the seed and the tensor name: another file layout and
        # reading order gives the same bytes
        _assert_close_bf16(_read_dir(tmp_path / method), _want(llama, method))


def _save_sharded_bin(llama, name: str, folder: Path, shards: int = 3) -> dict:
    """`folder` as transformers' sharded .bin layout: pytorch_model-0000i-of-0000N.bin state
    dicts (torch.save) + pytorch_model.bin.index.json + the model's config.json; returns the
    index's weight_map."""
    import torch

    folder.mkdir()
    sd = llama[f"sd:{name}"]
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: torch.from_numpy(sd[k].view(np.int16)).view(torch.bfloat16)
                for k in names[i::shards]}
        torch.save(part, folder / fname)
        weight_map.update({k: fname for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.nbytes for v in sd.values())},
         "weight_map": weight_map}))
    shutil.copy2(Path(llama[name]) / "config.json", folder / "config.json")
    return weight_map


def test_sharded_bin_inputs_with_their_index(llama, tmp_path):
    """transformers' sharded .bin layout (index + .bin shards, read with weights_only) merges
    like the safetensors layout; a shard the index lists but that is missing is named."""
    raw = _recipe(llama, "ties_global")
    raw["base_model"] = str(tmp_path / "base")
    _save_sharded_bin(llama, "base", tmp_path / "base")
    weight_map = _save_sharded_bin(llama, "ft2", tmp_path / "ft2")
    raw["models"][2]["model"] = str(tmp_path / "ft2")
    R.run(R.parse(raw), tmp_path / "out", max_shard_size="5KB")
    _assert_close_bf16(_read_dir(tmp_path / "out"), _want(llama, "ties_global"))
    # the reference (base) is .bin: its config.json travels, the output is safetensors
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    gone = "pytorch_model-00002-of-00003.bin"
    (tmp_path / "ft2" / gone).unlink()
    first = next(k for k, f in weight_map.items() if f == gone)
    with pytest.raises(CheckpointInputError) as e:
        R.run(R.parse(raw), tmp_path / "out2")
    assert gone in str(e.value) and "pytorch_model.bin.index.json" in str(e.value)
    assert repr(first) in str(e.value)
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming file and tensor, nothing written
# --------------------------------------------------------------------------------------------


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _expect_error(llama, tmp_path, bad: Path, *patterns):
    raw = _recipe(llama, "task_arithmetic")
    raw["models"][1]["model"] = str(bad)
    with pytest.raises(CheckpointInputError) as e:
        R.run(R.parse(raw), tmp_path / "out")
    for p in patterns:
        assert p in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary


def test_missing_shard_names_the_index_shard_and_a_tensor(llama, tmp_path):
    bad = _copy(llama["ft1"], tmp_path / "ft1")
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["model.layers.1.mlp.up_proj.weight"]
    (bad / shard).unlink()
    first = next(k for k, f in index.items() if f == shard)
    _expect_error(llama, tmp_path, bad, "model.safetensors.index.json", shard, "is missing",
                  repr(first))


def test_key_and_shape_mismatch_name_the_tensor_and_files(llama, tmp_path):
    sd = dict(llama["sd:ft1"])
    del sd["model.layers.0.mlp.down_proj.weight"]
    _save_single(sd, tmp_path / "missing.safetensors")
    _expect_error(llama, tmp_path, tmp_path / "missing.safetensors",
                  "has no tensor 'model.layers.0.mlp.down_proj.weight'", "missing.safetensors",
                  "model-0000")
    sd = dict(llama["sd:ft1"])
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"][:, :8]
    _save_single(sd, tmp_path / "shape.safetensors")
    _expect_error(llama, tmp_path, tmp_path / "shape.safetensors",
                  "'model.layers.0.mlp.down_proj.weight' is bfloat16[16, 8] in",
                  "shape.safetensors", "but bfloat16[16, 32] in")
    sd = {**llama["sd:ft1"], "extra.weight": np.zeros(3, BF16)}
    _save_single(sd, tmp_path / "extra.safetensors")
    _expect_error(llama, tmp_path, tmp_path / "extra.safetensors", "'extra.weight'",
                  "extra.safetensors", "is not in")


def test_non_finite_input_and_overflowing_out_dtype_write_nothing(llama, tmp_path):
    """A NaN in one input tensor is refused by name (the methods' input check); a merge whose
    values overflow the requested out_dtype is refused after the storage cast."""
    from mergejax.io.check import NonFiniteError

    name = "model.layers.1.self_attn.o_proj.weight"
    sd = dict(llama["sd:ft1"])
    sd[name] = sd[name].copy()
    sd[name][3, 5] = np.nan
    _save_single(sd, tmp_path / "nan.safetensors")
    _expect_error(llama, tmp_path, tmp_path / "nan.safetensors", repr(name),
                  "nan.safetensors", "non-finite")
    raw = {**_recipe(llama, "task_arithmetic"), "out_dtype": "float16"}
    raw["parameters"] = {"lambda": 1e7}  # |tau| ~ 0.02: 2e5 > float16's max 65504
    with pytest.raises(NonFiniteError, match="merged tensor .* has NaN/inf values"):
        R.run(R.parse(raw), tmp_path / "out16")
    assert not (tmp_path / "out16").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out16")]
    raw["parameters"] = {"lambda": 1.0}  # the same recipe in range: float16 output
    R.run(R.parse(raw), tmp_path / "ok16")
    assert {v.dtype for v in _read_dir(tmp_path / "ok16").values()} == {np.dtype(np.float16)}


# --------------------------------------------------------------------------------------------
# Processes: the CLI on 1 device = 8 fake devices; a killed merge leaves no output
# --------------------------------------------------------------------------------------------


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MERGEJAX_COMPILE_CACHE="off",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    return env


def test_cli_on_one_and_eight_devices_and_in_process_write_identical_bytes(llama, tmp_path):
    """The device count does not change the bytes: two CLI processes (1 and 8 devices, not
    one distributed job) running concurrently and the in-process run (8 fake devices) give
    byte-identical shards."""
    assert len(jax.devices()) == 8
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_recipe(llama, "ties_global")))
    procs = [subprocess.Popen([sys.executable, "-m", "mergejax.recipe", str(recipe),
                               str(tmp_path / f"out{d}"), "--max-shard-size", "5KB"],
                              cwd=REPO, env=_env(d), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for d in (1, 8)]
    R.main([str(recipe), str(tmp_path / "inproc"), "--max-shard-size", "5KB"])
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "ties: merged 3 models" in out
    shards = sorted(f.name for f in (tmp_path / "inproc").glob("*.safetensors"))
    assert len(shards) > 1
    for d in (1, 8):
        for f in shards + ["model.safetensors.index.json"]:
            assert (tmp_path / f"out{d}" / f).read_bytes() == (tmp_path / "inproc" / f
                                                               ).read_bytes(), (d, f)


KILLER = textwrap.dedent("""
    import sys, time
    from mergejax.recipe import shards
    write, seen = shards.ShardedWriter.write, []
    def slow_write(self, name, array):
        write(self, name, array)
        seen.append(name)
        if len(seen) == 5:  # part of the output is on disk: wait to be killed
            print("WRITTEN", self.folder, flush=True)
            time.sleep(300)
    shards.ShardedWriter.write = slow_write
    from mergejax.recipe.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_killed_merge_leaves_no_partial_output(llama, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_recipe(llama, "task_arithmetic")))
    out = tmp_path / "merged" / "out"
    p = subprocess.Popen([sys.executable, "-c", KILLER, str(recipe), str(out),
                          "--max-shard-size", "5KB"], cwd=REPO, env=_env(1),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("WRITTEN"), p.stderr.read()
        tmp = Path(line.split()[1])
        assert any(tmp.glob("*.safetensors"))  # a partial shard existed when killed
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    left = list(out.parent.iterdir())
    assert [f.name for f in left] == [tmp.name] and tmp.name.startswith(".out.tmp-")
    assert remove_stale_temporaries(out.parent, older_than_s=0) == left  # cleaned next run
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Several processes share one out-of-core merge
# --------------------------------------------------------------------------------------------


def _two_processes(recipe: Path, out: Path) -> list[subprocess.CompletedProcess]:
    """The recipe CLI as processes 0 and 1 of one jax.distributed job (one CPU device each)."""
    port = free_port()
    env = distributed_env(JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    return run_together([([sys.executable, "-m", "mergejax.recipe", str(recipe), str(out),
                           "--max-shard-size", "5KB", "--distributed",
                           f"--coordinator=localhost:{port}", "--num-processes=2",
                           f"--process-id={i}"], env) for i in range(2)], cwd=REPO, timeout=300)


@pytest.mark.parametrize("method", ["ties_global", "consensus_ties"])
def test_two_processes_split_the_shards_and_write_the_single_process_bytes(llama, tmp_path,
                                                                           method):
    """Two processes each merge every other output shard (whole-model TIES: histograms, and
    consensus' sign sums, summed over the processes); the folder equals the single-process one
    byte for byte, and only process 0 reports."""
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_recipe(llama, method)))
    R.main([str(recipe), str(tmp_path / "single"), "--max-shard-size", "5KB"])
    files = sorted(f.name for f in (tmp_path / "single").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) >= 3  # both processes work
    p0, p1 = _two_processes(recipe, tmp_path / "two")
    assert p0.returncode == 0 and p1.returncode == 0, (p0.stderr[-2000:], p1.stderr[-2000:])
    assert f"{_recipe(llama, method)['merge_method']}: merged 3 models" in p0.stdout
    assert "merged" not in p1.stdout  # (gloo prints to stdout)
    assert sorted(f.name for f in (tmp_path / "two").iterdir()) == files
    for f in files:
        assert (tmp_path / "two" / f).read_bytes() == (tmp_path / "single" / f).read_bytes(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two")]


def test_a_failure_on_one_process_fails_both_and_writes_nothing(llama, tmp_path):
    """A NaN in a tensor of an output shard that process 1 writes: process 1 names it, process
    0 reports that process 1 failed, and neither the output nor a temporary folder remains."""
    R.run(R.parse(_recipe(llama, "task_arithmetic")), tmp_path / "single",
          max_shard_size="5KB")
    index = json.loads((tmp_path / "single" / "model.safetensors.index.json").read_text())
    shard_2 = sorted(set(index["weight_map"].values()))[1]  # index 1: process 1's
    name = next(n for n, f in sorted(index["weight_map"].items())
                if f == shard_2 and n.endswith("weight"))
    sd = dict(llama["sd:ft1"])
    sd[name] = sd[name].copy()
    sd[name].reshape(-1)[0] = np.nan
    _save_single(sd, tmp_path / "nan.safetensors")
    raw = _recipe(llama, "task_arithmetic")
    raw["models"][1]["model"] = str(tmp_path / "nan.safetensors")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(raw))
    p0, p1 = _two_processes(recipe, tmp_path / "two")
    assert p1.returncode == 1 and repr(name) in p1.stderr and "non-finite" in p1.stderr
    assert p0.returncode == 1 and "process(es) [1] of the merge failed" in p0.stderr
    assert not (tmp_path / "two").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two")]
