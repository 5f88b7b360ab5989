"""torch model -> from_torch -> Flax gives the same logits; conversions round-trip exactly."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import test_vit_converters
import torch
import torch_models as tm
from flax import traverse_util
from helpers import random_batch_stats

from mergejax import models
from mergejax.converters import architectures, from_torch, to_torch

DATA = Path(__file__).parent.parent / "data"

# (arch, flax kwargs, converter kwargs, torch model factory, input (H, W, C)). Tiny widths;
# input sizes chosen so pooling / padding / flatten orders are exercised (tv_vgg at 64 and 96
# pools 2x2 and 3x3 maps up to 7x7 with overlapping windows; resnet50 at 40 hits odd sizes).
CASES = {
    "mlp": ("mlp", dict(hidden=(16, 8), num_classes=5), dict(input_shape=(4, 4, 3)),
            lambda: tm.MLP(48, (16, 8), 5), (4, 4, 3)),
    "mlp-nonsquare": ("mlp", dict(hidden=(12,), num_classes=3), dict(input_shape=(3, 5, 2)),
                      lambda: tm.MLP(30, (12,), 3), (3, 5, 2)),
    "resnet20-w1": ("resnet20", dict(width=1, num_classes=5), {},
                    lambda: tm.ZipItResNet(20, 1, 5), (8, 8, 3)),
    "resnet20-w2": ("resnet20", dict(width=2, num_classes=3), {},
                    lambda: tm.ZipItResNet(20, 2, 3), (16, 16, 3)),
    "resnet8-w1": ("resnet", dict(depth=8, width=1, num_classes=4), {},
                   lambda: tm.ZipItResNet(8, 1, 4), (8, 8, 3)),
    "vgg11-bn": ("vgg11", dict(width=1, num_classes=5, batch_norm=True), {},
                 lambda: tm.KuangliuVGG(11, 1, 5, True), (32, 32, 3)),
    "vgg11": ("vgg11", dict(width=1, num_classes=5, batch_norm=False), {},
              lambda: tm.KuangliuVGG(11, 1, 5, False), (32, 32, 3)),
    "vgg16-bn": ("vgg16", dict(width=1, num_classes=5, batch_norm=True), {},
                 lambda: tm.KuangliuVGG(16, 1, 5, True), (32, 32, 3)),
    "vgg16": ("vgg16", dict(width=1, num_classes=5, batch_norm=False), {},
              lambda: tm.KuangliuVGG(16, 1, 5, False), (32, 32, 3)),
    "resnet50-w1/16": ("resnet50", dict(width=1 / 16, num_classes=7), {},
                       lambda: tm.TorchvisionResNet50(1 / 16, (3, 4, 6, 3), 7), (32, 32, 3)),
    "resnet50-w1/8-short": ("resnet50", dict(width=1 / 8, stage_sizes=(1, 2, 1, 1), num_classes=3),
                            {}, lambda: tm.TorchvisionResNet50(1 / 8, (1, 2, 1, 1), 3),
                            (40, 40, 3)),
    "tv_vgg16": ("tv_vgg16", dict(width=1 / 16, hidden=16, num_classes=5), {},
                 lambda: tm.TorchvisionVGG(16, False, 1 / 16, 16, 5), (64, 64, 3)),
    "tv_vgg16_bn": ("tv_vgg16_bn", dict(width=1 / 16, hidden=16, num_classes=5), {},
                    lambda: tm.TorchvisionVGG(16, True, 1 / 16, 16, 5), (96, 96, 3)),
    "tv_vgg16_bn-w1/8": ("tv_vgg16_bn", dict(width=1 / 8, hidden=8, num_classes=3), {},
                         lambda: tm.TorchvisionVGG(16, True, 1 / 8, 8, 3), (32, 32, 3)),
}


def _torch_model(make, x_nhwc):
    """A random torch model in eval mode and its logits on `x_nhwc` given as NCHW. The head is
    rescaled so the logits are O(1): deep residual stacks grow them, and the 1e-4 tolerance is
    meant relative to unit logits."""
    net = tm.randomize(make())
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits = net(x)
        head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        scale = max(1.0, float(logits.abs().max()))
        head.weight /= scale
        head.bias /= scale
        logits = net(x)
    return net, logits.numpy()


def test_every_registered_layout_is_tested():
    """Here, or in the family's own file: ViTs in test_vit_converters.py, CCTs in
    test_cct_converter.py."""
    elsewhere = set(test_vit_converters.ARCHS) | {a for a in architectures()
                                                  if a.startswith("cct")}
    assert {case[0] for case in CASES.values()} == set(architectures()) - elsewhere


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_logits_match(case):
    arch, kwargs, conv_kwargs, make, shape = CASES[case]
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    net, expected = _torch_model(make, x)
    variables = from_torch(net.state_dict(), arch, **conv_kwargs, **kwargs)
    logits = np.asarray(jax.jit(models.create(arch, **kwargs).apply)(variables, x))
    assert np.abs(expected).max() > 0.1  # a real signal, not a vanished one
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

    # Back to torch: the exact tensors, loadable by the torch model itself.
    sd = net.state_dict()
    back = to_torch(variables, arch, num_batches_tracked=7, **conv_kwargs, **kwargs)
    assert list(back) == list(sd)  # torch's key order, num_batches_tracked included
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
        assert back[key].dtype == value.numpy().dtype, key
    net.load_state_dict(to_torch(variables, arch, as_torch=True, **conv_kwargs, **kwargs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_flax_torch_flax_is_exact(case):
    arch, kwargs, conv_kwargs, _, shape = CASES[case]
    # Random values in the model's own shapes (model.init runs eagerly: seconds per model).
    template = models.create(arch, **kwargs).init_shapes(np.zeros((1, *shape), np.float32))
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), template)
    variables = random_batch_stats(variables, seed=3)
    again = from_torch(to_torch(variables, arch, **conv_kwargs, **kwargs), arch, **conv_kwargs,
                       **kwargs)
    flat, flat_again = (traverse_util.flatten_dict(v) for v in (variables, again))
    assert flat.keys() == flat_again.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(flat_again[path], value, err_msg="/".join(path))
        assert flat_again[path].dtype == value.dtype


def test_golden_zipit_resnet20():
    """The ZipIt! repository's own resnet20(w=1, num_classes=5) and its logits."""
    (meta,) = json.loads((DATA / "zipit_resnet20.json").read_text())
    golden = np.load(DATA / "zipit_resnet20.npz")
    prefix = f"{meta['prefix']}/state_dict/"
    sd = {k[len(prefix):]: golden[k] for k in golden.files if k.startswith(prefix)}
    kwargs = dict(width=meta["width"], num_classes=meta["num_classes"])
    variables = from_torch(sd, "resnet20", **kwargs)
    x = golden[f"{meta['prefix']}/input_nchw"].transpose(0, 2, 3, 1)
    logits = models.create("resnet20", **kwargs).apply(variables, x)
    np.testing.assert_allclose(logits, golden[f"{meta['prefix']}/logits"], atol=1e-4, rtol=0)
