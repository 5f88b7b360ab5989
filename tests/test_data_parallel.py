"""Data parallelism: every stage on the suite's 8 fake CPU devices gives the one-device numbers.

Batches of 12 on 8 devices are padded to 16 with 4 masked rows, so equality with a one-device
mesh (no padding) also proves that padded rows carry zero weight everywhere (loss, train-mode
BatchNorm, statistics, BatchNorm reset, REPAIR moments, evaluation).
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import tiny
from jax.sharding import PartitionSpec as P

from mergejax import distributed, evaluation, specs, statistics
from mergejax.kernels.sharding import data_mesh
from mergejax.models import Model
from mergejax.repair import channel_moments, repair, reset_batch_stats
from mergejax.search.batched import stacked_logits
from mergejax.train import TrainSettings, train

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _eight_devices():
    """Every test runs on all 8 fake devices, whatever MERGEJAX_DATA_DEVICES says."""
    with distributed.use_mesh(data_mesh()):
        yield


def _one_device():
    return distributed.use_mesh(data_mesh(jax.devices()[:1]))


def _batches(x, size=12):
    return [x[i:i + size] for i in range(0, len(x), size)]


def _images(n=36, shape=(8, 8, 1), seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **TOL),
                 a, b)


def test_put_batch_pads_shards_and_masks():
    m = distributed.mesh()
    assert m.devices.size == 8 and distributed.local_rows(16, m) == slice(0, 16)
    x = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    (xs, ys), mask = distributed.put_batch((x, np.arange(12)), m)
    assert xs.shape == (16, 3) and xs.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(xs)[:12], x)
    np.testing.assert_array_equal(np.asarray(xs)[12:], 0)
    np.testing.assert_array_equal(np.asarray(mask), np.arange(16) < 12)
    _, none = distributed.put_batch(x[:8], m)
    assert none is None  # nothing padded, nothing to mask
    with _one_device():
        assert distributed.mesh().devices.size == 1
        assert distributed.put_batch(x)[1] is None
    assert distributed.mesh() is m  # the same object after the override


class _ConvBN(nn.Module):
    """conv -> BatchNorm -> relu -> mean pool -> dense: the smallest net with train-mode BN."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
        return nn.Dense(5, name="head")(nn.relu(x).mean(axis=(1, 2)))


def test_training_with_batchnorm_matches_one_device():
    model = Model("conv_bn", _ConvBN(), {}, "head")
    x = _images(24) + 3.0  # padded zero rows would pull the BatchNorm mean towards 0
    y = np.random.default_rng(1).integers(0, 5, 24)
    settings = TrainSettings(epochs=2, batch_size=12, lr=0.05, warmup_epochs=0.0)
    got, losses = train(model, x, y, settings, seed=0)  # batches of 12 padded to 16
    with _one_device():
        want, want_losses = train(model, x, y, settings, seed=0)
    _close(got, want)
    np.testing.assert_allclose(losses, want_losses, **TOL)


def test_statistics_bn_reset_and_evaluation_match_one_device():
    model, variables, _ = tiny("resnet20")
    other = tiny("resnet20", seed=1)[1]
    spec = specs.for_model(model)
    batches = _batches(_images())
    spaces = [s.name for s in spec.spaces if s.tap is not None][:3]

    def stages():
        moments = statistics.collect(model, spec, [variables, other], batches, spaces=spaces)
        reset = [reset_batch_stats(model, variables, batches, estimator=e)
                 for e in ("population", "per_batch")]
        logits = evaluation.logits(model, variables, _images(20, seed=2), batch_size=12)
        stacked = stacked_logits(model, [variables, other], _images(20, seed=2), batch_size=12)
        return moments, reset, logits, stacked

    got = stages()
    with _one_device():
        want = stages()
    _close(got, want)
    np.testing.assert_allclose(got[3][0], got[2], **TOL)  # vmapped = plain forward


def test_repair_moments_match_one_device_and_numpy():
    model, _, _ = tiny("mlp")
    spec = specs.for_model(model)
    x = _images()
    batches = _batches(x)
    a, b = (model.init(jax.random.key(s), x[:1]) for s in (0, 1))
    taps = [s.pre_tap for s in spec.spaces if s.pre_tap is not None]
    moments = channel_moments(model, a, taps, batches)
    # oracle: numpy over all 36 images at once
    feats = model.features(a, x)[1]
    for t in taps:
        f = np.asarray(feats[t], np.float64).reshape(-1, feats[t].shape[-1])
        np.testing.assert_allclose(moments[t][0], f.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moments[t][1], f.std(0), rtol=1e-5, atol=1e-6)
    transforms = {s.name: (np.hstack([np.eye(s.width), np.eye(s.width)]) / 2,
                           np.vstack([np.eye(s.width), np.eye(s.width)]))
                  for s in spec.spaces if s.pre_tap is not None}
    merged = jax.tree.map(lambda u, v: (np.asarray(u) + np.asarray(v)) / 2, a, b)
    got = repair(model, spec, [a, b], merged, transforms, batches)
    with _one_device():
        want = repair(model, spec, [a, b], merged, transforms, batches)
    _close(got, want)


@pytest.mark.slow
def test_results_json_identical_on_one_and_eight_devices(tmp_path):
    import json
    from pathlib import Path

    from mergejax import experiment
    from mergejax.config_lib import load_config_file

    config = load_config_file(Path(__file__).resolve().parents[1] / "configs/digits_mlp.py",
                              "quick")
    with config.unlocked():
        config.merge.methods = ("zipit+repair",)
        if "diagnostics" in config:
            config.diagnostics.enabled = False
    experiment.run(config, tmp_path / "eight")
    with _one_device():
        experiment.run(config, tmp_path / "one")

    def rows(name):
        return [{k: v for k, v in r.items() if k not in ("run", "seconds")}
                for r in json.loads((tmp_path / name / "results.json").read_text())]

    assert rows("eight") == rows("one")
