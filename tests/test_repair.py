"""REPAIR: pre-activation taps, exact targets, no-ops, agreement gains, BatchNorm equivalence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Problem, tiny

from mergejax import data, distributed, models, specs
from mergejax.repair import batch_stats_fn, repair, reset_batch_stats
from mergejax.train import TrainSettings, train


@functools.cache
def _taps(model):
    return jax.jit(lambda v, x: model.features(v, x)[1])


def _pre_moments(model, variables, tap, batches):
    """float64 (mean, biased std) per channel of `tap` over all batches, straight from numpy."""
    feats = [np.asarray(_taps(model)(variables, x)[tap], np.float64) for x in batches]
    feats = np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.mean(0), feats.std(0)


def _random_mlps(n, hidden=(16, 12)):
    model = models.create("mlp", num_classes=5, hidden=hidden)
    shape = (4, 8, 8, 1)
    eps = [jax.tree.map(np.array, model.init(jax.random.key(s), jnp.zeros(shape)))
           for s in range(n)]
    rng = np.random.default_rng(0)
    # Non-zero biases make the target means non-trivial.
    for v in eps:
        for i in range(len(hidden)):
            v["params"][f"dense_{i}"]["bias"] = rng.normal(0, 0.5, hidden[i]).astype(np.float32)
    batches = [rng.normal(size=(b, 8, 8, 1)).astype(np.float32) for b in (32, 20, 32)]
    return model, specs.for_model(model), eps, batches


def _weighted_perm_transforms(spec, n_models, weights, seed=0):
    """M = [w_1 P_1 .. w_N P_N], U = [P_1^T; ..; P_N^T] with P_1 = I, random P_i otherwise."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in spec.spaces:
        perms = [np.eye(s.width)] + [np.eye(s.width)[rng.permutation(s.width)]
                                      for _ in range(n_models - 1)]
        merge = np.concatenate([w * p for w, p in zip(weights, perms)], axis=1)
        unmerge = np.concatenate([p.T for p in perms], axis=0)
        out[s.name] = (merge.astype(np.float32), unmerge.astype(np.float32))
    return out


def _cheap_variables(model, x, seed=0):
    """Random variables of `model` without its (slow, for VGG on CPU) initialisers."""
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(model.init_shapes(x))
    leaves = []
    for path, s in flat:
        fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
        value = rng.normal(0, 1 / np.sqrt(fan_in), s.shape)
        if jax.tree_util.keystr(path).endswith("'var']"):
            value = rng.uniform(0.5, 2.0, s.shape)
        leaves.append(value.astype(np.float32))
    return jax.tree.unflatten(treedef, leaves)


def test_pre_activation_taps_feed_the_post_activation_taps():
    for name, kwargs in (("mlp", dict(hidden=(16, 12))), ("vgg11", dict(batch_norm=False)),
                         ("vgg11", dict(batch_norm=True))):
        model = models.create(name, num_classes=5, **kwargs)
        x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
        v = _cheap_variables(model, x)
        taps = _taps(model)(v, x)
        for s in specs.for_model(model).spaces:
            pre, post = taps[s.pre_tap], taps[s.tap]
            assert pre.shape[-1] == s.width
            assert 0.1 < np.mean(pre > 0) < 0.9  # the ReLU does something
            act = jax.nn.relu(pre)
            if act.shape != post.shape:  # VGG: a 2x2 max pool follows this ReLU
                act = jax.lax.reduce_window(act, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                            (1, 2, 2, 1), "VALID")
            np.testing.assert_array_equal(act, post)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 0.3, 0.5)])
def test_repaired_pre_activations_equal_the_interpolated_targets(weights):
    model, spec, eps, batches = _random_mlps(len(weights))
    transforms = _weighted_perm_transforms(spec, len(weights), weights)
    merged = specs.apply_merge(spec, eps, transforms, tails="average")[0]
    out = repair(model, spec, eps, merged, transforms, batches)
    for s in spec.spaces:
        stats = [_pre_moments(model, v, s.pre_tap, batches) for v in eps]
        merge = np.asarray(transforms[s.name][0], np.float64)
        target_mu = merge @ np.concatenate([m for m, _ in stats])
        target_sigma = merge @ np.concatenate([sd for _, sd in stats])
        mu, sigma = _pre_moments(model, out, s.pre_tap, batches)
        np.testing.assert_allclose(mu, target_mu, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(sigma, target_sigma, rtol=1e-4, atol=1e-4)
        # without repair the merge shrinks the spread (the collapse REPAIR undoes)
        _, sigma_plain = _pre_moments(model, merged, s.pre_tap, batches)
        assert np.mean(sigma_plain) < 0.95 * np.mean(target_sigma)
    np.testing.assert_array_equal(out["params"]["linear"]["kernel"],
                                  merged["params"]["linear"]["kernel"])


def test_repair_of_a_model_merged_with_itself_changes_nothing():
    model, spec, eps, batches = _random_mlps(1)
    transforms = specs.identity_transforms(spec, 2)
    merged = specs.apply_merge(spec, [eps[0], eps[0]], transforms, tails="average")[0]
    out = repair(model, spec, [eps[0], eps[0]], merged, transforms, batches)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 out, merged)


def test_zero_variance_channels_are_left_untouched():
    model, spec, eps, batches = _random_mlps(2)
    for v in eps:  # channel 3 of hidden0 becomes its bias: constant pre-activation
        v["params"]["dense_0"]["kernel"][:, 3] = 0.0
    transforms = _weighted_perm_transforms(spec, 2, (0.5, 0.5))
    transforms["hidden0"] = specs.identity_transforms(spec, 2, ["hidden0"])["hidden0"]
    merged = specs.apply_merge(spec, eps, transforms, tails="average")[0]
    out = repair(model, spec, eps, merged, transforms, batches)
    for leaf in ("kernel", "bias"):
        got = out["params"]["dense_0"][leaf][..., 3]
        np.testing.assert_array_equal(got, merged["params"]["dense_0"][leaf][..., 3])
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(out))


def test_partial_merge_repairs_the_shared_trunk_of_every_head():
    model, spec, eps, batches = _random_mlps(2)
    transforms = _weighted_perm_transforms(spec, 2, (0.5, 0.5))
    del transforms["hidden1"]  # cut after hidden0: dense_1 and the heads stay per model
    merged = specs.apply_merge(spec, eps, transforms)
    out = repair(model, spec, eps, merged, transforms, batches)
    assert isinstance(out, list) and len(out) == 2
    d0 = [o["params"]["dense_0"] for o in out]
    jax.tree.map(np.testing.assert_array_equal, d0[0], d0[1])
    assert not np.allclose(d0[0]["kernel"], merged[0]["params"]["dense_0"]["kernel"])
    for o, m in zip(out, merged):  # tails untouched (their space is not merged)
        jax.tree.map(np.testing.assert_array_equal, o["params"]["dense_1"], m["params"]["dense_1"])


@pytest.fixture(scope="module")
def digits_mlps():
    ds = data.load("digits")
    x, y = ds.splits["train"]
    model = models.create("mlp", num_classes=10, hidden=(64, 64))
    settings = TrainSettings(epochs=10, batch_size=64, lr=0.05, warmup_epochs=0.5)
    eps = [train(model, x, y, settings, seed=s)[0] for s in (0, 1)]
    return model, eps, [x[i:i + 256] for i in range(0, len(x), 256)], ds.splits["test"]


@pytest.mark.parametrize("method", ["average", "permute"])
def test_repair_brings_a_merged_mlp_closer_to_the_ensemble(digits_mlps, method):
    model, eps, batches, (xt, _) = digits_mlps
    spec = specs.for_model(model)
    transforms = Problem(model, spec, eps, spec.space_names, lambda: batches).run(method)
    merged = specs.apply_merge(spec, eps, transforms, tails="average")[0]
    repaired = repair(model, spec, eps, merged, transforms, batches)
    ensemble = np.mean([np.asarray(model.apply(v, xt)) for v in eps], axis=0)
    plain_z, repaired_z = np.asarray(model.apply(merged, xt)), np.asarray(model.apply(repaired, xt))
    mse_plain = np.mean((plain_z - ensemble) ** 2)
    mse_repaired = np.mean((repaired_z - ensemble) ** 2)
    # Seen: MSE average 24.5 -> 13.8, permute 3.5 -> 1.6; agreement 0.77 -> 0.90, 0.97 -> 0.97.
    assert mse_repaired < 0.8 * mse_plain, (mse_plain, mse_repaired)
    agree = [np.mean(z.argmax(1) == ensemble.argmax(1)) for z in (plain_z, repaired_z)]
    assert agree[1] >= agree[0], agree


def test_batchnorm_models_get_exactly_a_batchnorm_reset():
    model, a, x = tiny("resnet20", seed=0)
    _, b, _ = tiny("resnet20", seed=1)
    spec = specs.for_model(model)
    transforms = specs.identity_transforms(spec, 2)
    merged = specs.apply_merge(spec, [a, b], transforms)
    batches = [x, x[::-1] * 0.5]
    out = repair(model, spec, [a, b], merged, transforms, batches)
    for o, m in zip(out, merged):
        expected = reset_batch_stats(model, m, batches)
        jax.tree.map(np.testing.assert_array_equal, o, expected)
        assert not np.allclose(o["batch_stats"]["bn1"]["mean"], m["batch_stats"]["bn1"]["mean"])
    single = repair(model, spec, [a, b], merged[0], transforms, batches)
    jax.tree.map(np.testing.assert_array_equal, single, out[0])


def test_batch_stats_fn_ignores_masked_rows_and_counts_positions():
    """Padded rows under mask False change nothing; positions are each BatchNorm's H * W
    (8x8 input: 64 in the first stage, 16 and 4 after each stride-2 stage); the stacked fn
    gives each model's own statistics."""
    model, a, x = tiny("resnet20", seed=0)
    _, b, _ = tiny("resnet20", seed=1)
    mesh = distributed.mesh()
    fn = batch_stats_fn(model, mesh)
    junk = np.concatenate([x, 100.0 + x[:2]])
    mask = np.arange(len(junk)) < len(x)
    want, positions = fn(a, x, None)
    got, masked_positions = fn(a, junk, mask)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
    positions = {k: int(v) for k, v in positions.items()}
    assert {k: int(v) for k, v in masked_positions.items()} == positions
    assert sorted(set(positions.values())) == [4, 16, 64] and positions[("bn1",)] == 64
    stacked, _ = batch_stats_fn(model, mesh, stacked=True)(
        jax.tree.map(lambda u, v: np.stack([u, v]), a, b), junk, mask)
    for k, v in enumerate((a, b)):
        own = fn(v, x, None)[0]
        jax.tree.map(lambda g, w, k=k: np.testing.assert_allclose(g[k], w, rtol=1e-5,
                                                                  atol=1e-6), stacked, own)
