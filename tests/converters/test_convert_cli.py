"""`python -m mergejax.converters`: to-flax then to-torch gives back the same tensors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_models as tm

from mergejax import models
from mergejax.converters import architectures, load_state_dict
from mergejax.io import checkpoint


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mergejax.converters", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_help_lists_architectures():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for arch in architectures():
        assert arch in out.stdout


@pytest.mark.slow
def test_round_trip_through_orbax(tmp_path):
    net = tm.randomize(tm.MLP(48, (8, 6), 3), num_batches_tracked=0)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    torch.save({"state_dict": net.state_dict(), "epoch": 2}, tmp_path / "in.pth")
    out = _cli("to-flax", "--arch", "mlp", "--num-classes", "3", "--model-arg", "hidden=[8,6]",
               "--input-shape", "4,4,3", tmp_path / "in.pth", tmp_path / "ckpt")
    assert out.returncode == 0, out.stderr
    meta = checkpoint.load_meta(tmp_path / "ckpt")
    assert meta["arch"] == "mlp" and meta["model_kwargs"] == {"num_classes": 3, "hidden": [8, 6]}

    # The orbax checkpoint is an ordinary mergejax one: same logits as torch.
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    logits = models.create("mlp", num_classes=3, hidden=(8, 6)).apply(
        checkpoint.load(tmp_path / "ckpt"), x)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)

    out = _cli("to-torch", tmp_path / "ckpt", tmp_path / "out.safetensors")  # kwargs from meta
    assert out.returncode == 0, out.stderr
    back = load_state_dict(tmp_path / "out.safetensors")
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_bad_input_exits_with_a_message(tmp_path):
    torch.save(tm.randomize(tm.ZipItResNet(8, 1, 4)).state_dict(), tmp_path / "r.pt")
    out = _cli("to-flax", "--arch", "resnet", "--model-arg", "depth=8", "--width", "1",
               "--num-classes", "5", tmp_path / "r.pt", tmp_path / "ckpt")
    assert out.returncode == 1
    assert "linear.weight: checkpoint (4, 64), model expects (5, 64)" in out.stderr
    assert not (tmp_path / "ckpt").exists()
