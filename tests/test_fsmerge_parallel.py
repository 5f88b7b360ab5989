"""FS-Merge and distillation fits are data-parallel: each batch is padded to the `data` mesh
size (padded rows weigh 0) and sharded, parameters replicated. On the suite's 8 fake devices a
fit gives the loss history and the folded parameters of the same fit on a 1-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import fsmerge, models, specs
from mergejax.fsmerge.fit import device_batch
from mergejax.kernels.sharding import DATA, data_mesh

BATCH = 45  # not a multiple of 8: every step pads 3 rows on the 8-device mesh


@pytest.fixture(scope="module")
def mlp():
    model = models.create("mlp", num_classes=5, hidden=(16, 12))
    init = jax.jit(model.init)
    ends = [jax.tree.map(np.asarray, init(jax.random.key(s), jnp.zeros((1, 8, 8, 1))))
            for s in (0, 1)]
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(24, 8, 8, 1)).astype(np.float32) for _ in range(2)]
    return model, specs.for_model(model), ends, images


def _meshes():
    if jax.device_count() < 8:
        pytest.skip("needs the suite's 8 fake devices (tests/conftest.py)")
    return data_mesh(jax.devices()[:1]), data_mesh()


def _assert_same_fit(one, many):
    (mu1, h1), (mu8, h8) = one, many
    assert len(h1["loss"]) == len(h8["loss"])
    np.testing.assert_allclose(h8["loss"], h1["loss"], rtol=1e-5, atol=1e-7)
    assert h1["loss"][-1] < h1["loss"][0]  # the fit moved, so the comparison is not trivial
    flat1, flat8 = specs.flatten(mu1), specs.flatten(mu8)
    for k in flat1:
        np.testing.assert_allclose(flat8[k], flat1[k], atol=1e-5, err_msg=k)


def test_device_batch_pads_with_zero_weight_and_shards_over_data():
    _, mesh = _meshes()
    batch = {"x": np.arange(BATCH * 2, dtype=np.float32).reshape(BATCH, 2),
             "ids": np.ones(BATCH, np.int32)}
    out = device_batch(batch, mesh)
    assert out["x"].shape == (48, 2) and out["x"].sharding.spec[0] == DATA
    weight = np.asarray(out["weight"])
    np.testing.assert_array_equal(weight, (np.arange(48) < BATCH).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out["x"])[:BATCH], batch["x"])
    replicated = device_batch(batch, mesh, pad=False)  # BatchNorm in train mode: no padding
    assert replicated["x"].shape == (BATCH, 2) and replicated["x"].sharding.is_fully_replicated
    assert np.asarray(replicated["weight"]).min() == 1


@pytest.mark.parametrize("objective", ["global", "local"])
def test_fs_merge_fit_on_8_devices_equals_one_device(mlp, objective):
    model, spec, ends, images = mlp
    one, many = _meshes()
    s = fsmerge.setup(model, spec, ends, images, key=jax.random.key(0), init="average",
                      objective=objective, steps=12, batch_size=BATCH, augment=1, lr=1e-2)
    fits = [fsmerge.fit_setup(s, mesh=mesh) for mesh in (one, many)]
    _assert_same_fit(*fits)
    folds = [fsmerge.fold_setup(s, mu) for mu, _ in fits]
    for tree1, tree8 in zip(*folds):
        flat1, flat8 = specs.flatten(tree1), specs.flatten(tree8)
        for k in flat1:
            np.testing.assert_allclose(flat8[k], flat1[k], atol=1e-5, err_msg=k)


def test_distill_on_8_devices_equals_one_device(mlp):
    model, _, ends, images = mlp
    one, many = _meshes()
    runs = [fsmerge.distill(model, ends, images, key=jax.random.key(0), steps=12,
                            batch_size=BATCH, augment=1, lr=1e-2, mesh=mesh)
            for mesh in (one, many)]
    for (_, trees1, h1, p1), (_, trees8, h8, p8) in [runs]:
        np.testing.assert_allclose(h8["loss"], h1["loss"], rtol=1e-5, atol=1e-7)
        assert h1["loss"][-1] < h1["loss"][0]
        np.testing.assert_allclose(p8, p1, atol=1e-5)
        for tree1, tree8 in zip(trees1, trees8):
            flat1, flat8 = specs.flatten(tree1), specs.flatten(tree8)
            for k in flat1:
                np.testing.assert_allclose(flat8[k], flat1[k], atol=1e-5, err_msg=k)
