"""State_dict files: safetensors without torch, torch pickles refused unless plain tensors,
clear errors for damaged files, atomic writes."""

import sys

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
import torch_models as tm

from mergejax.converters import from_torch, load_state_dict, save_state_dict, to_torch

SD = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
      "bn.num_batches_tracked": np.asarray(5, np.int64),
      "linear.bias": np.array([-1.5, 2.25], np.float32)}


class Marker:
    """Unpickling this calls `open(path, "w")`, creating `path`: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class Custom:
    """An innocent custom class: still not a tensor or a plain container."""

    def __init__(self):
        self.lr = 0.1


def _assert_same(got, want):
    assert sorted(got) == sorted(want)  # safetensors stores keys sorted, not in insertion order
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_round_trip(tmp_path, suffix):
    path = save_state_dict(SD, tmp_path / f"m{suffix}", {"arch": "x"})
    _assert_same(load_state_dict(path), SD)
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix}"]  # no temp file left


def test_safetensors_needs_no_torch(tmp_path, monkeypatch):
    sd = {k: v.numpy() for k, v in tm.randomize(tm.ZipItResNet(8, 1, 4)).state_dict().items()}
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises ImportError
    with pytest.raises(ImportError):
        import torch  # noqa: F401
    path = save_state_dict(sd, tmp_path / "r.safetensors", {"arch": "resnet"})
    variables = from_torch(load_state_dict(path), "resnet", depth=8, width=1, num_classes=4)
    back = to_torch(variables, "resnet", depth=8, width=1, num_classes=4, num_batches_tracked=7)
    _assert_same(back, sd)
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "arch": "resnet"}


def test_bf16_is_upcast_exactly(tmp_path):
    t = torch.randn(3, 4).to(torch.bfloat16)
    safetensors.torch.save_file({"w": t, "b": torch.ones(2)}, tmp_path / "h.safetensors")
    torch.save({"w": t}, tmp_path / "h.pt")
    for name in ("h.safetensors", "h.pt"):
        got = load_state_dict(tmp_path / name)["w"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, t.float().numpy())


def test_wrapped_checkpoint_and_data_parallel_prefix(tmp_path):
    torch.save({"epoch": 4, "optimizer": {"lr": 0.1},
                "model": {f"module.{k}": torch.from_numpy(v) for k, v in SD.items()}},
               tmp_path / "ckpt.pth")
    _assert_same(load_state_dict(tmp_path / "ckpt.pth"), SD)


def test_non_tensor_entries_are_rejected(tmp_path):
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd\.pt.*not tensors.*'epoch'"):
        load_state_dict(tmp_path / "odd.pt")


def test_pickle_with_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"w": torch.zeros(2), "x": Marker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as e:
        load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()
    msg = str(e.value)
    assert "evil.pt" in msg and "safetensors" in msg and "it calls io.open" in msg
    # The marker works: an unrestricted load (what we refuse to do) would have run it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_custom_class_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "opt": Custom()}, tmp_path / "custom.pt")
    with pytest.raises(ValueError, match=r"(?s)refused to load .*custom\.pt.*Custom.*"
                                         r"st\.save_file"):
        load_state_dict(tmp_path / "custom.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_error_names_the_file(tmp_path, suffix):
    path = save_state_dict(SD, tmp_path / f"whole{suffix}")
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"cut\{suffix}: truncated or corrupt"):
        load_state_dict(cut)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all" * 4)
    with pytest.raises(ValueError, match=r"junk\.bin"):
        load_state_dict(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_state_dict(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="unknown checkpoint suffix"):
        load_state_dict(tmp_path / "weights.npz")


def test_nothing_written_on_failure(tmp_path, monkeypatch):
    old = save_state_dict(SD, tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not tensors"):
        save_state_dict({"w": np.zeros(2), "step": "ten"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown suffix"):
        save_state_dict(SD, tmp_path / "m.npz")

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"w": np.ones(3, np.float32)}, tmp_path / "m.safetensors")
    monkeypatch.setattr(torch, "save", lambda obj, f: half_write(obj, f))
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(SD, tmp_path / "new.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert (tmp_path / "m.safetensors").read_bytes() == old
