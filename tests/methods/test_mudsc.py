"""MuDSC end to end: fix_rate end points, planted permutations, group spaces, shapes."""

import dataclasses

import numpy as np
import pytest
from helpers import Problem, tiny

from mergejax import methods, specs


def _batches(x, seed=0):
    rng = np.random.default_rng(seed)
    batches = [x] + [x + 0.5 * rng.normal(size=x.shape).astype(np.float32) for _ in range(2)]
    return lambda: iter(batches)


def _no_data():
    raise AssertionError("fix_rate=1 must not read activations")


@pytest.fixture(scope="module")
def resnet_pair():
    """Two differently initialised tiny ResNet-20s (statistics collected once, cached)."""
    model, va, x = tiny("resnet20", seed=0)
    _, vb, _ = tiny("resnet20", seed=1)
    spec = specs.for_model(model)
    return Problem(model, spec, [va, vb], spec.space_names, _batches(x)), x


def _assert_same(got, want):
    assert set(got) == set(want)
    for space in want:
        for g, w in zip(got[space], want[space]):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=space)


def test_registered_with_its_hyperparameters():
    method = methods.get("mudsc")
    assert method.families == ("matching",)
    assert method.hparams == dict(fix_rate=0.5, matcher="zip", alpha=0.5, beta=1.0, iters=100,
                                  tol=5, use_cos=False, rule="reference", group_heads=True)
    assert "fix_rate" in method.search


@pytest.mark.parametrize("matcher, plain, hparams", [
    ("zip", "zipit", dict(alpha=0.3, beta=0.125)),
    ("permute", "permute", {}),
])
def test_fix_rate_zero_is_the_activation_only_matcher(resnet_pair, matcher, plain, hparams):
    problem, _ = resnet_pair
    want = problem.run(plain, **hparams)
    got = problem.run("mudsc", fix_rate=0.0, matcher=matcher, **hparams)
    _assert_same(got, want)
    if matcher == "zip":  # ...and the weight term does change the result
        mixed = problem.run("mudsc", fix_rate=0.5, matcher=matcher, iters=2, **hparams)
        assert any(not np.array_equal(np.asarray(mixed[s][1]), np.asarray(want[s][1]))
                   for s in want)


def test_end_to_end_on_resnet20_keeps_shapes(resnet_pair):
    problem, x = resnet_pair
    transforms = problem.run("mudsc", **{**methods.get("mudsc").hparams, "iters": 3})
    assert set(transforms) == set(problem.spaces)
    for space, (merge, unmerge) in transforms.items():
        n = problem.spec.space(space).width
        assert merge.shape == (n, 2 * n) and unmerge.shape == (2 * n, n)
        np.testing.assert_array_equal(np.asarray(unmerge).sum(axis=1), 1)
    merged = specs.apply_merge(problem.spec, problem.endpoints, transforms)
    for tree in merged:
        for path, leaf in specs.flatten(tree).items():
            assert leaf.shape == np.shape(specs.flatten(problem.endpoints[0])[path]), path
    logits = np.asarray(problem.model.apply(merged[0], x))
    assert logits.shape == (x.shape[0], 5) and np.isfinite(logits).all()


def _planted_mlp(seed=3, spec=None):
    model, v, x = tiny("mlp")
    spec = spec or specs.for_model(model)
    rng = np.random.default_rng(seed)
    perms = {s.name: rng.permutation(s.width) for s in spec.spaces}
    [pv] = specs.apply_merge(specs.for_model(model), [v], specs.permutation_transforms(perms))
    return model, spec, v, pv, perms, x


@pytest.mark.parametrize("matcher", ["permute", "zip"])
def test_pure_weight_matching_recovers_a_permuted_copy(matcher):
    model, spec, v, pv, perms, x = _planted_mlp()
    problem = Problem(model, spec, [v, pv], spec.space_names, _no_data)
    transforms = problem.run("mudsc", fix_rate=1.0, matcher=matcher)
    for space, (_, unmerge) in transforms.items():
        n = spec.space(space).width
        np.testing.assert_array_equal(np.asarray(unmerge)[:n], np.eye(n), err_msg=space)
        # pv feature k is v feature perms[k]: merged feature r takes pv's argsort(perms)[r]
        want = np.eye(n)[np.argsort(perms[space])].T
        np.testing.assert_array_equal(np.asarray(unmerge)[n:], want, err_msg=space)
    merged = specs.apply_merge(spec, [v, pv], transforms)
    np.testing.assert_allclose(np.asarray(model.apply(merged[0], x)),
                               np.asarray(model.apply(v, x)), rtol=1e-4, atol=1e-4)


def test_same_key_same_result():
    model, spec, v, pv, _, _ = _planted_mlp()
    _, vb, _ = tiny("mlp", seed=1)
    problem = Problem(model, spec, [v, vb], spec.space_names, _no_data)
    _assert_same(problem.run("mudsc", fix_rate=1.0, iters=4),
                 problem.run("mudsc", fix_rate=1.0, iters=4))


@pytest.mark.parametrize("matcher", ["permute", "zip"])
def test_grouped_spaces_use_the_group_matchers(matcher):
    model, _, _ = tiny("mlp")
    plain = specs.for_model(model)
    groups = {"hidden0": 4, "hidden1": 3}  # widths 16 and 12: groups of 4 channels
    spec = dataclasses.replace(plain, spaces=tuple(
        dataclasses.replace(s, groups=groups[s.name]) for s in plain.spaces))
    _, va, _ = tiny("mlp", seed=0)
    _, vb, _ = tiny("mlp", seed=1)
    problem = Problem(model, spec, [va, vb], spec.space_names, _no_data)
    transforms = problem.run("mudsc", fix_rate=1.0, matcher=matcher, iters=3)
    for space, (_, unmerge) in transforms.items():
        n, g = spec.space(space).width, groups[space]
        og = n // g
        u = np.asarray(unmerge)
        for j in range(g):  # merged block j: A's group j and exactly one group of B
            rows = np.flatnonzero(u[:, j * og:(j + 1) * og].sum(axis=1))
            assert set(rows[rows < n] // og) <= {j}, space
            assert len(set((rows[rows >= n] - n) // og)) == 1, space
