"""Bad-input cases for files, kernels and the two file CLIs (`mergejax.converters`,
`mergejax.recipe`), as a table `CASES` for tests/test_bad_inputs.py.

Each case is `pytest.param(fn, id=...)`; `fn(tmp_path)` builds its inputs under `tmp_path`,
performs the bad action and asserts (a) the exit code or exception type, (b) that the message
names the culprit (argument, file, key), (c) that nothing was written, deleted or left
half-written (`snapshot` of the folder before and after). CLI cases run a subprocess (about 3 s
each: jax is imported); everything else runs in process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import snapshot

ROOT = Path(__file__).resolve().parents[1]
ARCH = ["--arch", "mlp", "--num-classes", "3", "--model-arg", "hidden=[8]",
        "--input-shape", "4,4,3"]
KWARGS = dict(num_classes=3, hidden=(8,))
SHAPE = (4, 4, 3)


# ------------------------------------------------------------------------------------------------
# helpers


def _run(module: str, *args, env: dict | None = None, timeout: float = 180):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _convert(*args, **kw):
    return _run("mergejax.converters", *args, **kw)


def _recipe_cli(*args, **kw):
    return _run("mergejax.recipe", *args, **kw)


def _one_line(r) -> str:
    """stderr of a failed CLI run: exactly one line, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def _variables(seed: int = 0):
    import jax

    from mergejax import models

    model = models.create("mlp", **KWARGS)
    return jax.tree.map(np.asarray, model.init(jax.random.key(seed), np.zeros((1, *SHAPE),
                                                                             np.float32)))


def _state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A torch-layout state_dict of the tiny MLP (keys dense.0.weight, ..., linear.bias)."""
    from mergejax.converters import to_torch

    return to_torch(_variables(seed), "mlp", input_shape=SHAPE, **KWARGS)


def _save_torch(sd: dict, path: Path) -> Path:
    import torch

    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
    return path


def _save_st(sd: dict, path: Path) -> Path:
    import safetensors.numpy

    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    return path


def _save(sd: dict, path: Path) -> Path:
    return _save_torch(sd, path) if path.suffix == ".pt" else _save_st(sd, path)


def _bad_sd(kind: str) -> dict:
    """The tiny MLP's state_dict with `dense.0.weight` broken as `kind`."""
    sd = _state_dict()
    w = sd["dense.0.weight"].copy()
    if kind == "nan":
        w[0, :3] = np.nan
    elif kind == "inf":
        w[1, 2] = np.inf
    elif kind == "-inf":
        w[1, 2] = -np.inf
    elif kind == "int":
        w = np.arange(w.size, dtype=np.int32).reshape(w.shape)
    elif kind == "bool":
        w = w > 0
    elif kind == "complex":
        w = w.astype(np.complex64)
    sd["dense.0.weight"] = w
    return sd


def _stale(folder: Path, name: str, *, is_dir: bool, age_s: float = 7200) -> Path:
    """A leftover of a killed atomic write (`.<name>.tmp-<8 hex>`), `age_s` old."""
    p = folder / name
    if is_dir:
        (p / "state").mkdir(parents=True)
        (p / "state" / "big").write_bytes(b"0" * 1000)
    else:
        p.write_bytes(b"half")
    old = time.time() - age_s
    os.utime(p, (old, old))
    return p


# ------------------------------------------------------------------------------------------------
# converters CLI: nothing deleted that was not asked for


def to_flax_into_non_empty_dir(tmp_path):
    src = _save_torch(_state_dict(), tmp_path / "in.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    r = _convert("to-flax", *ARCH, src, out)
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert str(out) in line and "not empty" in line and "--overwrite" in line, line
    assert snapshot(tmp_path) == before


def to_flax_into_the_inputs_own_folder(tmp_path):
    """The issue's worst case: OUT_DIR = the folder holding IN, even with --overwrite."""
    folder = tmp_path / "models"
    folder.mkdir()
    src = _save_torch(_state_dict(), folder / "in.pt")
    (folder / "other.pt").write_bytes(src.read_bytes())
    before = snapshot(tmp_path)
    r = _convert("to-flax", *ARCH, "--overwrite", src, folder)
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert "contains the input" in line and str(src) in line, line
    assert snapshot(tmp_path) == before


def to_flax_overwrite_replaces_and_cleans_stale_temporaries(tmp_path):
    """--overwrite replaces a non-empty OUT_DIR (input untouched); the stale temporaries of a
    killed earlier run beside the output are removed, nothing else is."""
    from mergejax.io import checkpoint

    src = _save_torch(_state_dict(), tmp_path / "in.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    stale_dir = _stale(tmp_path, ".out.tmp-0123abcd", is_dir=True)
    stale_file = _stale(tmp_path, ".x.safetensors.tmp-deadbeef", is_dir=False)
    lookalikes = [_stale(tmp_path, n, is_dir=False) for n in
                  ("out.tmp-0123abcd", ".out.tmp-0123abcde", ".out.tmp-xyz", ".out.bak")]
    before_src = snapshot(src)
    r = _convert("to-flax", *ARCH, "--overwrite", src, out)
    assert r.returncode == 0, r.stderr
    assert checkpoint.exists(out) and not (out / "old.txt").exists()
    assert snapshot(src) == before_src
    assert not stale_dir.exists() and not stale_file.exists()
    assert all(p.exists() for p in lookalikes)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.pt", "out", *(p.name for p in lookalikes)])


def to_torch_output_inside_input(tmp_path):
    from mergejax.io import checkpoint

    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, _variables(), {"arch": "mlp", "model_kwargs": {"num_classes": 3,
                                                                         "hidden": [8]},
                                         "input_shape": list(SHAPE)})
    before = snapshot(tmp_path)
    r = _convert("to-torch", "--overwrite", ckpt, ckpt / "state" / "out.safetensors")
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert "inside the input" in line and str(ckpt) in line, line
    assert snapshot(tmp_path) == before


def to_flax_nan_checkpoint_exits_1(tmp_path):
    src = _save_st(_bad_sd("nan"), tmp_path / "nan.safetensors")
    before = snapshot(tmp_path)
    r = _convert("to-flax", *ARCH, src, tmp_path / "out")
    assert r.returncode == 1, r.stderr
    line = _one_line(r)
    assert str(src) in line and "'dense.0.weight'" in line and "3 NaN/inf" in line, line
    assert "--allow-nonfinite" in line or "allow_nonfinite" in line, line
    assert snapshot(tmp_path) == before


def to_flax_allow_nonfinite_lets_nan_through(tmp_path):
    from mergejax.io import checkpoint

    src = _save_torch(_bad_sd("nan"), tmp_path / "nan.pt")
    r = _convert("to-flax", *ARCH, "--allow-nonfinite", src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    w = checkpoint.load(tmp_path / "out", allow_nonfinite=True)["params"]["dense_0"]["kernel"]
    assert np.isnan(w).sum() == 3
    with pytest.raises(ValueError, match="'params/dense_0/kernel' has 3 NaN/inf"):
        checkpoint.load(tmp_path / "out")  # reading it back is checked again


def cli_usage_error_one_line_and_debug(tmp_path):
    src = _save_torch(_state_dict(), tmp_path / "in.pt")
    before = snapshot(tmp_path)
    r = _convert("to-flax", "--arch", "mlp", "--widht", "2", src, tmp_path / "out")
    assert r.returncode == 2
    line = _one_line(r)
    assert "--widht" in line and "--help" in line, line
    r = _convert("to-flax", "--arch", "mlp", "--widht", "2", src, tmp_path / "out",
                 env={"MERGEJAX_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr and "--widht" in r.stderr
    r = _convert("to-torch", "--debug", tmp_path / "absent", tmp_path / "o.safetensors")
    assert r.returncode == 1 and "Traceback" in r.stderr and "absent" in r.stderr, r.stderr
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# weights checked on entry: every reader, .pt and .safetensors


def _load_case(kind: str, suffix: str, culprit: str):
    def case(tmp_path):
        from mergejax.converters import load_state_dict
        from mergejax.io.check import NonFiniteError, WeightDtypeError

        path = _save(_bad_sd(kind), tmp_path / f"m{suffix}")
        before = snapshot(tmp_path)
        err = NonFiniteError if kind in ("nan", "inf", "-inf") else WeightDtypeError
        with pytest.raises(err) as info:
            load_state_dict(path)
        msg = str(info.value)
        assert str(path) in msg and "'dense.0.weight'" in msg and culprit in msg, msg
        assert snapshot(tmp_path) == before
    return case


def known_integer_buffer_and_half_precision_are_fine(tmp_path):
    """The positive control: BatchNorm's int64 num_batches_tracked is kept (dropped by the
    converter's layout), float16/bfloat16 become float32; an int running_mean is refused."""
    import torch

    from mergejax.converters import load_state_dict
    from mergejax.io.check import WeightDtypeError

    sd = {"bn.num_batches_tracked": torch.tensor(7), "w": torch.ones(2, dtype=torch.float16),
          "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "ok.pt")
    got = load_state_dict(tmp_path / "ok.pt")
    assert got["bn.num_batches_tracked"].dtype == np.int64
    assert got["w"].dtype == got["b"].dtype == np.float32
    torch.save({**sd, "bn.running_mean": torch.zeros(2, dtype=torch.int64)}, tmp_path / "b.pt")
    before = snapshot(tmp_path)
    with pytest.raises(WeightDtypeError, match=r"b\.pt: tensor 'bn\.running_mean' has integer"):
        load_state_dict(tmp_path / "b.pt")
    assert snapshot(tmp_path) == before


def api_load_checks_and_allows(tmp_path):
    import mergejax as mj
    from mergejax.io import checkpoint

    pt = _save_torch(_bad_sd("inf"), tmp_path / "inf.pt")
    ckpt = tmp_path / "ckpt"
    v = _variables()
    v["params"]["linear"]["bias"] = np.full(3, np.nan, np.float32)
    checkpoint.save(ckpt, v)
    before = snapshot(tmp_path)
    model = mj.model("mlp", **KWARGS)
    with pytest.raises(ValueError) as info:
        mj.load(pt, model, input_shape=SHAPE)
    assert str(pt) in str(info.value) and "'dense.0.weight' has 1 NaN/inf" in str(info.value)
    with pytest.raises(ValueError) as info:
        mj.load(ckpt, model, input_shape=SHAPE)
    assert str(ckpt) in str(info.value) and "'params/linear/bias' has 3 NaN/inf" in str(
        info.value)
    got = mj.load(pt, model, input_shape=SHAPE, allow_nonfinite=True)
    assert np.isinf(got["params"]["dense_0"]["kernel"]).sum() == 1
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# recipes


def _flat_st(path: Path, seed: int, *, scale: float = 1.0, nan: bool = False) -> Path:
    from mergejax.specs import flatten

    flat = {k: np.asarray(a, np.float32) * np.float32(scale)
            for k, a in flatten(_variables(seed)).items()}
    if nan:
        flat["params/dense_0/kernel"][0, 0] = np.nan
    return _save_st(flat, path)


def _write_recipe(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def recipe_nan_input_refuses_to_write(tmp_path):
    a = _flat_st(tmp_path / "a.safetensors", 0)
    b = _flat_st(tmp_path / "b.safetensors", 1, nan=True)
    recipe = _write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(a)}, {"model": str(b)}]})
    before = snapshot(tmp_path)
    r = _recipe_cli(recipe, "--out-dir", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    line = _one_line(r)
    assert str(b) in line and "'params/dense_0/kernel' has 1 NaN/inf" in line, line
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def recipe_non_finite_output_is_never_written(tmp_path):
    """Finite inputs, but out_dtype float16 overflows to inf: refused naming the tensor."""
    from mergejax import recipe as R

    a = _flat_st(tmp_path / "a.safetensors", 0, scale=1e6)
    b = _flat_st(tmp_path / "b.safetensors", 1, scale=1e6)
    raw = {"merge_method": "linear", "out_dtype": "float16",
           "models": [{"model": str(a)}, {"model": str(b)}]}
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        R.run(R.parse(raw), tmp_path / "out")
    msg = str(info.value)
    assert "merged output" in msg and "'params/" in msg and "nothing was written" in msg, msg
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def recipe_out_dir_inside_input_or_not_empty(tmp_path):
    from mergejax.io import checkpoint

    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, _variables(), {"model": "mlp"})
    b = _flat_st(tmp_path / "b.safetensors", 1)
    recipe = _write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(ckpt)}, {"model": str(b)}]})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    r = _recipe_cli(recipe, "--out-dir", ckpt / "merged", "--overwrite")
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert "--out-dir" in line and "inside the input" in line and str(ckpt) in line, line
    r = _recipe_cli(recipe, "--out-dir", tmp_path / "full")
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert "not empty" in line and "--overwrite" in line and "full" in line, line
    r = _recipe_cli(recipe)  # no --out-dir: a usage error
    assert r.returncode == 2 and "--out-dir" in _one_line(r)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# stale temporaries


def stale_temporaries_removed_only_ours(tmp_path):
    from mergejax.io.atomic import remove_stale_temporaries

    stale = [_stale(tmp_path, ".ckpt.tmp-0123abcd", is_dir=True),
             _stale(tmp_path, ".results.json.tmp-89abcdef", is_dir=False)]
    young = _stale(tmp_path, ".run.tmp-00000000", is_dir=True, age_s=0)
    others = [_stale(tmp_path, n, is_dir=False) for n in
              ("ckpt.tmp-0123abcd", ".ckpt.tmp-0123abcdX", ".ckpt.tmp-XYZWXYZW", "keep.txt")]
    (tmp_path / "ckpt").mkdir()
    old_copy = _stale(tmp_path, ".ckpt.old-11111111", is_dir=True)  # ckpt exists: stale
    only_copy = _stale(tmp_path, ".model.old-22222222", is_dir=True)  # the only copy: restored
    removed = remove_stale_temporaries(tmp_path, older_than_s=60)
    assert sorted(removed) == sorted([*stale, old_copy, only_copy])
    assert not any(p.exists() for p in [*stale, old_copy, only_copy])
    assert young.exists() and all(p.exists() for p in others)
    assert (tmp_path / "model" / "state" / "big").stat().st_size == 1000
    assert remove_stale_temporaries(tmp_path / "absent") == []


# ------------------------------------------------------------------------------------------------
# kernels: never hang, never guess


def zip_match_nan_finishes(tmp_path):
    """A NaN correlation used to loop forever (SIGINT ignored): now a ValueError naming corr,
    and under jit (values unknown) an all-NaN result. In a subprocess with a timeout, so a
    regression fails this case instead of hanging the suite."""
    code = textwrap.dedent("""
        import jax, numpy as np
        from mergejax.kernels import zip_match
        corr = np.eye(8, dtype=np.float32); corr[3, 7] = np.nan
        try:
            zip_match(corr)
        except ValueError as e:
            print("RAISED", e)
        m, u = jax.jit(lambda c: zip_match(c))(corr)
        print("JIT", bool(np.isnan(np.asarray(u)).all()), bool(np.isnan(np.asarray(m)).all()))
    """)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert "RAISED zip_match: corr has 1 non-finite" in r.stdout and "[3, 7]" in r.stdout, r.stdout
    assert "JIT True True" in r.stdout, r.stdout
    assert time.monotonic() - start < 120
    assert snapshot(tmp_path) == {}


def _kernel_case(call, *culprits):
    def case(tmp_path):
        with pytest.raises(ValueError) as info:
            call()
        for c in culprits:
            assert c in str(info.value), (c, str(info.value))
        assert snapshot(tmp_path) == {}
    return case


def _corr(n=8, value=None, at=(2, 5)):
    c = np.eye(n, dtype=np.float32) * 0.5
    if value is not None:
        c[at] = value
    return c


def _zip(corr, **kw):
    from mergejax.kernels import zip_match

    return lambda: zip_match(corr, **kw)


def _other_kernels_case(tmp_path):
    """The other matchers and helpers check the same way, naming themselves and the argument."""
    from mergejax import kernels as K
    from mergejax.kernels import topk

    bad = _corr(8, np.nan)
    for call, culprits in [
        (lambda: K.permute_match(bad), ("permute_match", "corr", "[2, 5]")),
        (lambda: K.group_zip_match(bad, groups=2), ("group_zip_match", "corr")),
        (lambda: K.group_permute_match(bad, groups=2), ("group_permute_match", "corr")),
        (lambda: K.group_zip_match(_corr(8), groups=2, alpha=float("inf")),
         ("group_zip_match", "alpha")),
        (lambda: K.solve_assignment(bad[:4, 4:] + bad[:4, :4]), ("solve_assignment", "score")),
        (lambda: K.merge_from_unmerge(np.full((4, 2), np.nan, np.float32)),
         ("merge_from_unmerge", "unmerge")),
        (lambda: topk.keep_topk(np.array([1.0, np.nan], np.float32), 0.5), ("keep_topk", "x")),
        (lambda: topk.keep_topk(np.ones(4, np.float32), float("nan")), ("topk_kth", "density")),
        (lambda: K.combine_similarity(_corr(4), _corr(4), float("nan")), ("fix_rate",)),
        (lambda: K.covariance_to_correlation(np.full((3, 3), np.inf, np.float32)),
         ("covariance_to_correlation", "cov")),
        (lambda: K.FeatureStats.init(4).update(np.ones((2, 4), np.int32)),
         ("FeatureStats.update", "features", "int32")),
        (lambda: K.FeatureStats.init(0), ("FeatureStats.init", "dim")),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        for c in culprits:
            assert c in str(info.value), (c, str(info.value))
    assert snapshot(tmp_path) == {}


CASES = [
    pytest.param(to_flax_into_non_empty_dir, id="io-to-flax-into-non-empty-dir"),
    pytest.param(to_flax_into_the_inputs_own_folder, id="io-to-flax-into-input-folder"),
    pytest.param(to_flax_overwrite_replaces_and_cleans_stale_temporaries,
                 id="io-to-flax-overwrite-and-stale-temporaries"),
    pytest.param(to_torch_output_inside_input, id="io-to-torch-output-inside-input"),
    pytest.param(to_flax_nan_checkpoint_exits_1, id="io-to-flax-nan-exit-1"),
    pytest.param(to_flax_allow_nonfinite_lets_nan_through, id="io-to-flax-allow-nonfinite"),
    pytest.param(cli_usage_error_one_line_and_debug, id="io-cli-usage-error-and-debug"),
    pytest.param(_load_case("nan", ".pt", "3 NaN/inf"), id="io-nan-pt"),
    pytest.param(_load_case("nan", ".safetensors", "3 NaN/inf"), id="io-nan-safetensors"),
    pytest.param(_load_case("inf", ".pt", "1 NaN/inf"), id="io-inf-pt"),
    pytest.param(_load_case("-inf", ".safetensors", "1 NaN/inf"), id="io-neg-inf-safetensors"),
    pytest.param(_load_case("int", ".pt", "integer dtype int32"), id="io-int-pt"),
    pytest.param(_load_case("int", ".safetensors", "integer dtype int32"),
                 id="io-int-safetensors"),
    pytest.param(_load_case("bool", ".pt", "bool dtype"), id="io-bool-pt"),
    pytest.param(_load_case("bool", ".safetensors", "bool dtype"), id="io-bool-safetensors"),
    pytest.param(_load_case("complex", ".pt", "complex dtype complex64"), id="io-complex-pt"),
    pytest.param(known_integer_buffer_and_half_precision_are_fine,
                 id="io-int-buffer-kept-half-upcast"),
    pytest.param(api_load_checks_and_allows, id="io-api-load-nonfinite"),
    pytest.param(recipe_nan_input_refuses_to_write, id="io-recipe-nan-input"),
    pytest.param(recipe_non_finite_output_is_never_written, id="io-recipe-nonfinite-output"),
    pytest.param(recipe_out_dir_inside_input_or_not_empty, id="io-recipe-out-dir-refused"),
    pytest.param(stale_temporaries_removed_only_ours, id="io-stale-temporaries"),
    pytest.param(zip_match_nan_finishes, id="kernel-zip-nan-no-hang"),
    pytest.param(_kernel_case(_zip(_corr(8, np.inf)), "zip_match", "corr", "1 non-finite",
                              "[2, 5]"), id="kernel-zip-inf-corr"),
    pytest.param(_kernel_case(_zip(np.full((8, 8), np.nan, np.float32)), "zip_match", "corr",
                              "64 non-finite"), id="kernel-zip-all-nan"),
    pytest.param(_kernel_case(_zip(_corr(), alpha=float("nan")), "zip_match", "alpha",
                              "finite"), id="kernel-zip-alpha-nan"),
    pytest.param(_kernel_case(_zip(_corr(), beta=-1e9), "zip_match", "beta", ">= 0"),
                 id="kernel-zip-beta-negative"),
    pytest.param(_kernel_case(_zip(_corr(), num_models=0), "zip_match", "num_models"),
                 id="kernel-zip-num-models-0"),
    pytest.param(_kernel_case(_zip(np.ones((4, 6), np.float32)), "zip_match", "corr",
                              "square"), id="kernel-zip-non-square"),
    pytest.param(_kernel_case(_zip(np.eye(8, dtype=np.int32)), "zip_match", "corr",
                              "floating", "int32"), id="kernel-zip-integer-dtype"),
    pytest.param(_kernel_case(_zip(np.zeros((0, 0), np.float32)), "zip_match", "corr",
                              "n >= 1"), id="kernel-zip-empty"),
    pytest.param(_other_kernels_case, id="kernel-other-matchers"),
]
