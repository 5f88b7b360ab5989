"""`statistics.collect`'s one-device path (forward and updates fused in one jitted step) gives
the same moments as its sharded path, on a ViT (concatenated taps) and a ResNet (BatchNorm)."""

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


@pytest.mark.parametrize("name, kwargs, shape", [
    ("vit", dict(num_classes=3, width=16, depth=2, heads=4, patch=2, mlp_ratio=2.0), (8, 8, 1)),
    ("resnet20", dict(num_classes=3, width=1), (8, 8, 3))])
def test_fused_one_device_step_equals_the_sharded_path(name, kwargs, shape):
    model = models.create(name, **kwargs)
    spec = specs.for_model(model)
    rng = np.random.default_rng(0)
    endpoints = [model.init(jax.random.key(i), np.zeros((1, *shape), np.float32))
                 for i in range(2)]
    batches = [rng.normal(size=(n, *shape)).astype(np.float32) for n in (8, 8, 5)]
    assert jax.device_count() > 1  # conftest's fake devices: collect shards over all of them
    want = collect(model, spec, endpoints, batches, mesh=data_mesh())
    got = _fused(model, spec, endpoints, batches)
    assert set(got) == set(want)
    for space in want:
        for field in ("mean", "cov", "corr"):
            np.testing.assert_allclose(np.asarray(getattr(got[space], field)),
                                       np.asarray(getattr(want[space], field)),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{space} {field}")
