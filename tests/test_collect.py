"""`statistics.collect`'s one-device path (forward and updates fused in one jitted step) gives
the same moments as its sharded path, on a ViT (concatenated taps) and a ResNet (BatchNorm); on
transformers, whose stream and attention taps are folded part by part (`sow_rows`), both equal
float64 numpy statistics of the concatenated taps that `Model.features` returns."""

import jax
import numpy as np
import pytest

from mergejax import models, specs
from mergejax.kernels.sharding import data_mesh
from mergejax.kernels.statistics import FeatureStats
from mergejax.statistics import collect, fused_step_fn


def _fused(model, spec, endpoints, batches):
    """What `collect` does without a mesh, step by step."""
    wanted = [s for s in spec.spaces if s.tap is not None]
    states = {s.name: FeatureStats.init(len(endpoints) * s.width) for s in wanted}
    step = fused_step_fn(model, tuple((s.name, s.tap) for s in wanted))
    for x in batches:
        states = step(states, list(endpoints), x)
    return {s.name: states[s.name].finalize(name=s.tap, widths=[s.width] * len(endpoints))
            for s in wanted}


def _two_endpoints(name, kwargs, shape, sizes, seed):
    """Model `name`, its spec, two endpoints from keys 0 and 1, and N(0, 1) image batches of
    `sizes` images of `shape` (rng `seed`)."""
    model = models.create(name, **kwargs)
    rng = np.random.default_rng(seed)
    endpoints = [model.init(jax.random.key(i), np.zeros((1, *shape), np.float32))
                 for i in range(2)]
    batches = [rng.normal(size=(n, *shape)).astype(np.float32) for n in sizes]
    return model, specs.for_model(model), endpoints, batches


VIT = ("vit", dict(num_classes=3, width=16, depth=2, heads=4, patch=2, mlp_ratio=2.0), (8, 8, 1))
TRANSFORMERS = [
    VIT,
    ("cct", dict(num_classes=3, width=16, depth=2, heads=4, mlp_ratio=2.0, conv_layers=2),
     (16, 16, 3))]


@pytest.mark.parametrize("name, kwargs, shape", [
    VIT, ("resnet20", dict(num_classes=3, width=1), (8, 8, 3))])
def test_fused_one_device_step_equals_the_sharded_path(name, kwargs, shape):
    model, spec, endpoints, batches = _two_endpoints(name, kwargs, shape, (8, 8, 5), seed=0)
    assert jax.device_count() > 1  # conftest's fake devices: collect shards over all of them
    want = collect(model, spec, endpoints, batches, mesh=data_mesh())
    got = _fused(model, spec, endpoints, batches)
    assert set(got) == set(want)
    for space in want:
        for field in ("mean", "cov", "corr"):
            np.testing.assert_allclose(np.asarray(getattr(got[space], field)),
                                       np.asarray(getattr(want[space], field)),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{space} {field}")


def test_sharded_step_has_no_collective_and_keeps_one_state_per_device():
    # Why collect never waits for a step on CPU meshes: with no all-reduce in the program, a
    # launch blocked behind the in-flight limit cannot starve a collective of its threads.
    import re

    from mergejax import distributed

    model = models.create("resnet20", num_classes=3, width=1)
    spec = specs.for_model(model)
    x = np.zeros((16, 8, 8, 3), np.float32)
    endpoints = [model.init(jax.random.key(i), x[:1]) for i in range(2)]
    mesh = data_mesh()
    wanted = [s for s in spec.spaces if s.tap is not None]
    states = {s.name: FeatureStats.init(2 * s.width, mesh) for s in wanted}
    step = fused_step_fn(model, tuple((s.name, s.tap) for s in wanted), mesh)
    xs, mask = distributed.put_batch(x, mesh)
    hlo = step.lower(states, distributed.replicate(endpoints, mesh), xs, mask).compile().as_text()
    assert not re.search(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute",
                         hlo)
    out = step(states, distributed.replicate(endpoints, mesh), xs, mask)
    for s in wanted:
        assert out[s.name].count.shape == (mesh.devices.size,)
        # 16 images of 8x8 (or the stage's smaller grid) split evenly over the devices
        counts = np.asarray(out[s.name].count)
        assert (counts == counts[0]).all() and counts.sum() > 0


@pytest.mark.parametrize("name, kwargs, shape", TRANSFORMERS)
def test_transformer_parts_are_the_features_rows(name, kwargs, shape):
    model = models.create(name, **kwargs)
    x = np.random.default_rng(1).normal(size=(3, *shape)).astype(np.float32)
    variables = model.init(jax.random.key(0), x[:1])
    logits, taps = jax.jit(model.features)(variables, x)
    logits_p, parts = jax.jit(model.feature_parts)(variables, x)
    np.testing.assert_array_equal(logits_p, logits)
    assert set(parts) == set(taps)
    stream_parts = kwargs["depth"] + 1 if name == "vit" else 2 * kwargs["depth"] + 1
    assert len(parts["stream"]) == stream_parts
    assert len(parts["blocks_1/attn/qko"]) == 3  # queries, keys, attention output
    assert len(parts["head_input"]) == 1
    for tap, value in taps.items():
        np.testing.assert_array_equal(np.concatenate(parts[tap], axis=1), value, err_msg=tap)


@pytest.mark.parametrize("name, kwargs, shape", TRANSFORMERS)
def test_transformer_moments_equal_numpy_on_the_concatenated_taps(name, kwargs, shape):
    model, spec, endpoints, batches = _two_endpoints(name, kwargs, shape, (6, 5), seed=2)
    features = jax.jit(model.features)
    rows = {}  # tap -> [(rows, 2C) per batch], both models' features side by side
    for x in batches:
        per_model = [features(v, x)[1] for v in endpoints]
        for tap in per_model[0]:
            rows.setdefault(tap, []).append(np.concatenate(
                [np.asarray(t[tap], np.float64).reshape(-1, t[tap].shape[-1])
                 for t in per_model], axis=1))
    for got in (collect(model, spec, endpoints, batches),
                collect(model, spec, endpoints, batches, mesh=data_mesh())):
        assert set(got) == {s.name for s in spec.spaces if s.tap is not None}
        for space, moments in got.items():
            x = np.concatenate(rows[spec.space(space).tap])
            np.testing.assert_allclose(moments.mean, x.mean(0), rtol=1e-5, atol=1e-5,
                                       err_msg=space)
            np.testing.assert_allclose(moments.cov, np.cov(x, rowvar=False, bias=True),
                                       rtol=1e-4, atol=1e-5, err_msg=space)
