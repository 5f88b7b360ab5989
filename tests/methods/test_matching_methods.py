"""Matching methods end to end on tiny models: shapes, self-merges and planted permutations."""

import jax
import numpy as np
import pytest
from helpers import Problem, tiny

from mergejax import methods, specs
from mergejax.statistics import StatisticsCache, collect


def _problem(model, endpoints, x, spaces=None):
    spec = specs.for_model(model)
    rng = np.random.default_rng(0)
    noisy = [x + 0.5 * rng.normal(size=x.shape).astype(np.float32) for _ in range(3)]
    return Problem(model, spec, endpoints, spaces or spec.space_names,
                           lambda: iter([x, *noisy]))


def _plain(name, seed=0):
    """A tiny model with its initial BatchNorm statistics (few dead units)."""
    model, v, x = tiny(name, seed)
    fresh = model.init(jax.random.key(seed), x[:1])
    return model, {**v, **{k: fresh[k] for k in fresh if k != "params"}}, x


def _dead_units(problem):
    stats = problem.statistics()
    return sum(int((np.diag(np.asarray(m.corr)) == 0).sum()) for m in stats.values())


def _logits(model, merged, x):
    return np.asarray(model.apply(merged, x))


@pytest.mark.parametrize("name", ["average", "permute", "zipit", "weight_matching"])
def test_merging_a_model_with_itself_returns_it(name):
    # Seed 4's MLP has no dead unit on these inputs: a dead unit correlates 0 with everything,
    # so ZipIt! (rightly) prefers re-merging merged features to pairing it with its twin.
    model, v, x = _plain("mlp", seed=4)
    problem = _problem(model, [v, v], x)
    assert _dead_units(problem) == 0
    transforms = problem.run(name)
    for space, (_, unmerge) in transforms.items():  # every feature merged with its twin only
        n = problem.spec.space(space).width
        np.testing.assert_array_equal(np.asarray(unmerge)[:n], np.asarray(unmerge)[n:])
    merged = specs.apply_merge(problem.spec, [v, v], transforms)
    # ZipIt!'s merge divides by (count + 1e-5): relative error ~5e-6 per layer
    np.testing.assert_allclose(_logits(model, merged[0], x), _logits(model, v, x),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["permute", "zipit", "weight_matching"])
def test_merging_with_a_permuted_copy_recovers_the_model(name):
    model, v, x = _plain("resnet20")
    spec = specs.for_model(model)
    rng = np.random.default_rng(7)
    perms = {s.name: rng.permutation(s.width) for s in spec.spaces}
    [pv] = specs.apply_merge(spec, [v], specs.permutation_transforms(perms))
    problem = _problem(model, [v, pv], x)
    # ResNet streams have dead units at random init; alpha=0 stops ZipIt! from re-merging
    # merged features, so dead units pair with dead units (harmless) instead.
    hparams = {"alpha": 0.0} if name == "zipit" else {}
    transforms = problem.run(name, **hparams)
    merged = specs.apply_merge(spec, [v, pv], transforms)
    np.testing.assert_allclose(_logits(model, merged[0], x), _logits(model, v, x),
                               rtol=1e-3, atol=1e-3)


def test_statistics_of_a_model_with_itself():
    model, v, x = tiny("resnet20")
    spec = specs.for_model(model)
    stats = collect(model, spec, [v, v], [x, x[::-1]], spaces=["stream1", "layer3_2/inner"])
    for name, m in stats.items():
        n = spec.space(name).width
        assert m.corr.shape == (2 * n, 2 * n)
        np.testing.assert_allclose(m.corr[:n, n:], m.corr[:n, :n], atol=1e-5)
        live = np.diag(m.cov[:n, :n]) > 0
        np.testing.assert_allclose(np.diag(m.corr)[:n][live], 1.0, atol=1e-4)
        # against numpy on the tap activations
        _, taps = model.features(v, np.concatenate([x, x[::-1]]))
        feats = np.asarray(taps[spec.space(name).tap]).reshape(-1, n).astype(np.float64)
        np.testing.assert_allclose(m.cov[:n, :n], np.cov(feats.T, bias=True), atol=1e-4)


def test_non_finite_activations_name_the_tap():
    model, v, x = tiny("mlp")
    bad = jax.tree.map(lambda a: a, v)
    bad["params"]["dense_0"]["bias"] = np.full_like(v["params"]["dense_0"]["bias"], np.nan)
    with pytest.raises(ValueError, match="hidden0"):
        collect(model, specs.for_model(model), [v, bad], [x])


def test_partial_zip_gives_per_model_tails():
    model, va, x = tiny("resnet20", seed=0)
    _, vb, _ = tiny("resnet20", seed=1)
    spec = specs.for_model(model)
    problem = _problem(model, [va, vb], x, spaces=spec.prefix("stream1"))
    transforms = problem.run("zipit")
    assert set(transforms) == set(spec.prefix("stream1"))
    a, b = specs.apply_merge(spec, [va, vb], transforms)
    np.testing.assert_array_equal(a["params"]["conv1"]["kernel"], b["params"]["conv1"]["kernel"])
    assert not np.allclose(a["params"]["layer3_0"]["conv1"]["kernel"],
                           b["params"]["layer3_0"]["conv1"]["kernel"])


def test_a_statistics_cache_collects_each_space_once():
    model, va, x = _plain("mlp", seed=4)
    _, vb, _ = _plain("mlp", seed=1)
    spec = specs.for_model(model)
    calls = []
    cache = StatisticsCache(model, spec, [va, vb], lambda: calls.append(1) or iter([x]))
    assert set(cache.get(spec.prefix("hidden0"))) == {"hidden0"}
    stats = cache.get(spec.space_names)
    assert set(stats) == {"hidden0", "hidden1"} and len(calls) == 2  # only hidden1 was new
    assert cache.get(spec.space_names)["hidden1"] is stats["hidden1"] and len(calls) == 2


@pytest.mark.parametrize("name", ["average", "weight_matching"])
def test_methods_that_read_no_activations_never_run_the_models(name):
    model, va, x = _plain("mlp", seed=4)
    _, vb, _ = _plain("mlp", seed=1)
    spec = specs.for_model(model)

    def no_data():
        raise AssertionError(f"{name} must not read activations")

    transforms = Problem(model, spec, [va, vb], spec.space_names, no_data).run(name)
    assert set(transforms) == set(spec.space_names)


def test_hyperparameter_defaults_come_from_the_signature():
    zipit = methods.get("zipit")
    assert zipit.hparams == {"alpha": 0.3, "beta": 0.125, "rule": "reference",
                             "group_heads": True}
    assert "search" not in methods.get("ties").hparams and methods.get("ties").search
    with pytest.raises(TypeError, match="ZipIt!'s name for 'alpha'"):
        zipit.check_hparams("matching", {"a": 0.5})
    assert methods.get("mudsc").reads({"fix_rate": 1.0}) == "weights"
    assert methods.get("mudsc").reads({"fix_rate": 0.5}) == "both"
