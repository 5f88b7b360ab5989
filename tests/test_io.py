"""mergejax.io: atomic writes and the one safetensors reader/writer."""

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from mergejax.io import checkpoint
from mergejax.io.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from mergejax.io.safetensors_io import read_safetensors, write_safetensors


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    atomic_write_bytes(tmp_path / "sub" / "a.txt", b"two")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.txt"]
    assert (tmp_path / "sub" / "a.txt").read_text() == "two"


def test_atomic_dir_replaces_old_and_keeps_it_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("boom")
    assert (out / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out"]
    with atomic_dir(out) as tmp:
        (tmp / "g").write_text("new")
    assert [p.name for p in out.iterdir()] == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_checkpoint_round_trip_and_replace(tmp_path):
    tree = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    checkpoint.save(tmp_path / "c", tree, {"a": 1})
    checkpoint.save(tmp_path / "c", {"params": {"w": tree["params"]["w"] + 1}}, {"a": 2})
    assert checkpoint.exists(tmp_path / "c") and checkpoint.load_meta(tmp_path / "c") == {"a": 2}
    np.testing.assert_array_equal(checkpoint.load(tmp_path / "c")["params"]["w"],
                                  tree["params"]["w"] + 1)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_bf16_kept_or_upcast_exactly(tmp_path):
    x = np.array([1.5, -2.0, 3.140625, 1e-3], np.float32).astype(ml_dtypes.bfloat16)
    path = write_safetensors(tmp_path / "m.safetensors", {"x": x, "n": np.asarray(3)},
                             fmt="flax", metadata={"k": "v"})
    kept = read_safetensors(path)
    assert kept["x"].dtype == ml_dtypes.bfloat16 and kept["n"].shape == ()
    np.testing.assert_array_equal(kept["x"], x)
    up = read_safetensors(path, upcast_bf16=True)
    assert up["x"].dtype == np.float32
    np.testing.assert_array_equal(up["x"], x.astype(np.float32))
    # the bit pattern: bf16 is the top half of the float32
    np.testing.assert_array_equal(up["x"].view(np.uint32) >> 16, x.view(np.uint16))


def test_bf16_read_without_jax_imported_first(tmp_path):
    x = np.array([0.5, 2.0], np.float32).astype(ml_dtypes.bfloat16)
    path = write_safetensors(tmp_path / "m.safetensors", {"x": x}, fmt="pt")
    code = ("from mergejax.io.safetensors_io import read_safetensors; "
            f"a = read_safetensors({str(path)!r})['x']; print(a.dtype, a.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "bfloat16 [0.5, 2.0]"


def test_corrupt_file_names_the_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"bad\.safetensors: truncated or corrupt"):
        read_safetensors(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------------------------
# Weights checked on entry, outputs that would destroy something, stale temporaries, CLI errors


def test_check_tensors_dtypes_values_and_upcast():
    from mergejax.io.check import NonFiniteError, WeightDtypeError, check_tensors

    ok = check_tensors({"a": np.ones(2, np.float16), "b": np.ones(2, ml_dtypes.bfloat16),
                        "c": np.ones(2), "bn.num_batches_tracked": np.asarray(3)}, "f.pt")
    assert [v.dtype for v in ok.values()] == [np.float32, np.float32, np.float64, np.int64]
    kept = check_tensors({"a": np.ones(2, ml_dtypes.bfloat16)}, "f", upcast=False)
    assert kept["a"].dtype == ml_dtypes.bfloat16
    bad = np.ones((3, 4), np.float32)
    bad[1, 2] = np.nan
    bad[2, 0] = -np.inf
    with pytest.raises(NonFiniteError, match=r"f\.pt: tensor 'w' has 2 NaN/inf values of 12 "
                                             r"\(first at flat index 6\); .*1 more.*'v'"):
        check_tensors({"w": bad, "v": bad, "ok": np.ones(1)}, "f.pt")
    assert np.isnan(check_tensors({"w": bad}, "f", allow_nonfinite=True)["w"]).any()
    for value, what in ((np.ones(2, np.int8), "integer"), (np.ones(2, bool), "bool"),
                        (np.ones(2, np.complex64), "complex"), (np.ones(2, np.uint8),
                                                                "unsigned")):
        with pytest.raises(WeightDtypeError, match=f"f: tensor 'k' has {what}"):
            check_tensors({"k": value}, "f")


def test_checkpoint_load_checks_and_save_can_refuse(tmp_path):
    from mergejax.io.cli_errors import OutputExistsError

    tree = {"params": {"w": np.array([1.0, np.inf], np.float32)}}
    checkpoint.save(tmp_path / "c", tree)
    with pytest.raises(ValueError, match=r"checkpoint .*c: tensor 'params/w' has 1 NaN/inf"):
        checkpoint.load(tmp_path / "c")
    assert np.isinf(checkpoint.load(tmp_path / "c", allow_nonfinite=True)["params"]["w"][1])
    with pytest.raises(OutputExistsError, match="not empty"):
        checkpoint.save(tmp_path / "c", {"params": {"w": np.ones(2, np.float32)}},
                        overwrite=False)
    assert np.isinf(checkpoint.load(tmp_path / "c", allow_nonfinite=True)["params"]["w"][1])
    (tmp_path / "c" / "state").rename(tmp_path / "c" / "gone")
    (tmp_path / "c" / "state").mkdir()
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"cannot restore checkpoint"):
        checkpoint.load(tmp_path / "c")


def test_check_output_path(tmp_path):
    from mergejax.io.atomic import check_output_path
    from mergejax.io.cli_errors import OutputExistsError, UsageError

    src = tmp_path / "in" / "model.pt"
    src.parent.mkdir()
    src.write_bytes(b"x")
    assert check_output_path(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output_path(tmp_path / "empty")
    for out, why in ((src, "is the input"), (src.parent, "contains the input"),
                     (src / "x", "inside the input")):
        with pytest.raises(OutputExistsError, match=why):
            check_output_path(out, inputs=[src], overwrite=True)
    with pytest.raises(UsageError, match="not empty; pass --overwrite"):
        check_output_path(src.parent)
    with pytest.raises(UsageError, match="exists; pass --force"):
        check_output_path(src, flag="--force")
    assert check_output_path(src.parent, overwrite=True) == src.parent


def test_cli_errors_map_to_one_line_and_exit_codes(capsys, monkeypatch):
    from mergejax.io import cli_errors as E

    def fail(exc):
        def main(argv):
            raise exc
        return main

    monkeypatch.delenv("MERGEJAX_DEBUG", raising=False)
    assert E.run_cli(lambda argv: None, []) == 0
    assert E.run_cli(fail(E.UsageError("bad flag --x")), [], prog="p") == 2
    assert capsys.readouterr().err == "p: error: bad flag --x\n"
    assert E.run_cli(fail(FileNotFoundError("no file f")), []) == 1
    assert capsys.readouterr().err == "error: no file f\n"
    assert E.run_cli(fail(TypeError("oops")), []) == 1
    err = capsys.readouterr().err
    assert "internal error TypeError: oops" in err and "--debug" in err and len(
        err.splitlines()) == 1

    class Custom(ValueError):
        pass

    assert E.run_cli(fail(Custom("bad recipe")), [], usage=(Custom,)) == 2
    capsys.readouterr()
    assert E.run_cli(fail(ValueError("v")), ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MERGEJAX_DEBUG", "1")
    assert E.run_cli(fail(ValueError("v")), []) == 1
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(E.UsageError, match=r"unrecognized arguments: --nope \(see prog --help\)"):
        E.ArgumentParser(prog="prog").parse_args(["--nope"])


@pytest.mark.parametrize("nbytes", [1, 63, 64, 1000, 1 << 20])
def test_aligned_empty_starts_on_a_64_byte_boundary(nbytes):
    from mergejax.io.safetensors_io import ALIGNMENT, aligned_empty

    arrays = [aligned_empty(nbytes) for _ in range(4)]  # several, so luck cannot pass it
    for a in arrays:
        assert a.shape == (nbytes,) and a.dtype == np.uint8
        assert a.ctypes.data % ALIGNMENT == 0
