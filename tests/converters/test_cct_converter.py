"""Compact-Transformers CCT: a torch CCT (tests/converters/torch_cct.py) -> from_torch -> the
torch logits; conversions round-trip exactly; the named sizes have the published key layout."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch_cct
from flax import traverse_util

from mergejax import models
from mergejax.converters import (
    ConversionError,
    architectures,
    from_torch,
    load_state_dict,
    to_torch,
)
from mergejax.converters.cct_layout import infer_input_shape
from mergejax.io import checkpoint
from mergejax.models.cct import sine_positions

# name: (Flax kwargs, torch kwargs, image side, input channels). Tiny widths; both tokenizer
# depths, the 7x7 stride-2 convolution, every kind of positions, odd image sides.
CASES = {
    "learnable-3x2": (dict(width=16, depth=2, heads=4, mlp_ratio=2.0, conv_layers=2,
                           conv_width=8, num_classes=5),
                      dict(dim=16, depth=2, heads=4, mlp_ratio=2.0, conv_layers=2, conv_width=8,
                           num_classes=5), 12, 3),
    "sine-3x1": (dict(width=8, depth=1, heads=2, mlp_ratio=1.0, conv_layers=1, num_classes=3,
                      positional="sine"),
                 dict(dim=8, depth=1, heads=2, mlp_ratio=1.0, conv_layers=1, num_classes=3,
                      positional="sine"), 9, 1),
    "none-7x2": (dict(width=12, depth=2, heads=3, mlp_ratio=1.5, conv_layers=2, kernel_size=7,
                      conv_width=4, num_classes=4, positional="none"),
                 dict(dim=12, depth=2, heads=3, mlp_ratio=1.5, conv_layers=2, kernel_size=7,
                      conv_width=4, num_classes=4, positional="none"), 29, 3),
}
# the registered layouts these tests convert (test_convert_parity checks the others)
TESTED = {"cct", "cct_2_3x2", "cct_4_3x2", "cct_6_3x1", "cct_6_3x2", "cct_7_3x1", "cct_7_3x2",
          "cct_7_7x2", "cct_14_7x2"}


def _randomize(net, seed=0):
    """Random weights keeping activations O(1) (He-normal convs and linears, random LayerNorm
    affine parameters, random learnable positions) and O(1) logits; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g)
                                    * (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=g) * 0.2 - 0.1)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=g) * 0.4 - 0.2)
        pos = net.classifier.positional_emb
        if pos is not None and pos.requires_grad:
            pos.copy_(torch.randn(pos.shape, generator=g))
    return net.eval()


def _case(name, seed=0):
    kwargs, torch_kwargs, side, channels = CASES[name]
    net = _randomize(torch_cct.CCT(img_size=side, in_channels=channels, **torch_kwargs), seed)
    x = np.random.default_rng(1).normal(size=(3, side, side, channels)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    return kwargs, net, x, expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_logits_match_and_convert_back_exactly(name):
    kwargs, net, x, expected = _case(name)
    side, channels = CASES[name][2:]
    variables = from_torch(net.state_dict(), "cct", input_shape=(side, side, channels), **kwargs)
    logits = np.asarray(jax.jit(models.create("cct", **kwargs).apply)(variables, x))
    assert np.abs(expected).max() > 0.1  # a real signal
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

    sd = net.state_dict()
    back = to_torch(variables, "cct", input_shape=(side, side, channels), **kwargs)
    assert list(back) == list(sd)  # torch's key order
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
        assert back[key].dtype == value.numpy().dtype, key
    net.load_state_dict(to_torch(variables, "cct", input_shape=(side, side, channels),
                                 as_torch=True, **kwargs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_flax_torch_flax_is_exact(name):
    kwargs, _, side, channels = CASES[name]
    shape = (side, side, channels)
    template = models.create("cct", **kwargs).init_shapes(np.zeros((1, *shape), np.float32))
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), template)
    again = from_torch(to_torch(variables, "cct", input_shape=shape, **kwargs), "cct",
                       input_shape=shape, **kwargs)
    flat, flat_again = (traverse_util.flatten_dict(v) for v in (variables, again))
    assert flat.keys() == flat_again.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(flat_again[path], value, err_msg="/".join(path))


def test_fused_qkv_rows_are_q_then_k_then_v():
    kwargs, net, _, _ = _case("learnable-3x2")
    variables = from_torch(net.state_dict(), "cct", input_shape=(12, 12, 3), **kwargs)
    qkv = net.classifier.blocks[1].self_attn.qkv.weight.detach().numpy()  # (3D, D)
    attn = variables["params"]["blocks_1"]["attn"]
    for j, n in enumerate("qkv"):
        np.testing.assert_array_equal(attn[n]["kernel"], qkv[16 * j:16 * (j + 1)].T)
        assert set(attn[n]) == {"kernel"}  # no bias, as torch's qkv


def test_sine_table_matches_the_repository_s():
    np.testing.assert_allclose(sine_positions(49, 24), torch_cct.sine_table(49, 24).numpy(),
                               atol=1e-6, rtol=0)


def test_input_shape_is_inferred_from_the_positions():
    """A 28x28 MNIST CCT (7x7 tokens) converts without input_shape; the inferred side is the
    largest with that grid, here the image side itself."""
    kwargs = dict(width=8, depth=1, heads=2, conv_layers=2, conv_width=4, num_classes=3)
    net = _randomize(torch_cct.CCT(img_size=28, in_channels=1, dim=8, depth=1, heads=2,
                                   conv_layers=2, conv_width=4, num_classes=3))
    sd = net.state_dict()
    m = models.create("cct", **kwargs).module
    assert infer_input_shape(m, {k: tuple(v.shape) for k, v in sd.items()}) == (28, 28, 1)
    variables = from_torch(sd, "cct", **kwargs)
    assert variables["params"]["positional_emb"].shape == (1, 49, 8)
    assert variables["params"]["tokenizer"]["conv_0"]["kernel"].shape == (3, 3, 1, 4)
    # a checkpoint of another width names the tensors at fault
    with pytest.raises(ConversionError, match="classifier.norm.weight"):
        from_torch(sd, "cct", **{**kwargs, "width": 16, "heads": 2})


# The repository's named sizes (src/cct.py): cct_L (layers, heads, mlp ratio, width) with a
# kxC tokenizer (kernel k, C convolutions), their image size and class count.
_SIZES = {2: (2, 1.0, 128), 4: (2, 1.0, 128), 6: (4, 2.0, 256), 7: (4, 2.0, 256),
          14: (6, 3.0, 384)}
NAMED = {f"cct_{L}_{k}x{c}": (dict(depth=L, heads=_SIZES[L][0], mlp_ratio=_SIZES[L][1],
                                   dim=_SIZES[L][2], kernel_size=k, conv_layers=c,
                                   num_classes=classes), side)
         for L, k, c, side, classes in ((2, 3, 2, 32, 10), (4, 3, 2, 32, 10), (6, 3, 1, 32, 10),
                                        (6, 3, 2, 32, 10), (7, 3, 1, 32, 10), (7, 3, 2, 32, 10),
                                        (7, 7, 2, 224, 102), (14, 7, 2, 224, 1000))}


def test_every_cct_layout_is_tested_here():
    assert TESTED == {"cct", *NAMED} == {a for a in architectures() if a.startswith("cct")}


@pytest.mark.parametrize("arch", sorted(NAMED))
def test_named_sizes_have_the_published_keys_and_shapes(arch):
    torch_kwargs, side = NAMED[arch]
    net = torch_cct.CCT(img_size=side, **torch_kwargs)
    sd = net.state_dict()
    template = models.create(arch).init_shapes(np.zeros((1, side, side, 3), np.float32))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    back = to_torch(variables, arch)  # input shape: the registered default
    assert list(back) == list(sd)
    assert {k: v.shape for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.slow
def test_cli_round_trip_of_a_named_size(tmp_path):
    """`python -m mergejax.converters` on a CCT-2/3x2 checkpoint (the size read off the
    tensors): the orbax checkpoint gives the torch logits, and to-torch gives the tensors back."""
    net = _randomize(torch_cct.CCT(img_size=32, dim=128, depth=2, heads=2, mlp_ratio=1.0,
                                   conv_layers=2))
    torch.save(net.state_dict(), tmp_path / "cct.pt")
    cli = lambda *a: subprocess.run([sys.executable, "-m", "mergejax.converters", *map(str, a)],
                                    capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "JAX_PLATFORMS": "cpu"})
    out = cli("to-flax", "--arch", "cct_2_3x2", tmp_path / "cct.pt", tmp_path / "ckpt")
    assert out.returncode == 0, out.stderr
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    logits = models.create("cct_2_3x2").apply(checkpoint.load(tmp_path / "ckpt"), x)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    out = cli("to-torch", tmp_path / "ckpt", tmp_path / "back.safetensors")
    assert out.returncode == 0, out.stderr
    back = load_state_dict(tmp_path / "back.safetensors")
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
