"""Git Re-Basin weight matching: planted permutations, monotone objective, determinism."""

import numpy as np
import pytest
from helpers import tiny

from mergejax import models, specs
from mergejax.kernels.weight_matching import weight_matching


def _params(v):
    return {k: a for k, a in specs.flatten(v).items() if k.startswith("params/")}


def _planted(name, seed):
    model, v, _ = tiny(name)
    spec = specs.for_model(model)
    rng = np.random.default_rng(seed)
    perms = {s.name: rng.permutation(s.width) for s in spec.spaces}
    [pv] = specs.apply_merge(spec, [v], specs.permutation_transforms(perms))
    return spec, v, pv, perms


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vgg11"])
def test_recovers_a_planted_permutation(name):
    spec, v, pv, perms = _planted(name, seed=3)
    found, history = weight_matching(spec, _params(v), _params(pv), seed=0, return_history=True)
    for s in spec.space_names:  # pv = take(v, perm): aligning pv back needs the inverse
        np.testing.assert_array_equal(found[s], np.argsort(perms[s]), err_msg=s)
    assert all(b >= a - 1e-3 * abs(a) for a, b in zip(history, history[1:]))  # never decreases
    assert history[-1] > history[0]


def test_identical_models_give_identity_and_seeds_are_deterministic():
    model, v, _ = tiny("resnet20")
    spec = specs.for_model(model)
    found = weight_matching(spec, _params(v), _params(v), seed=1)
    for s in spec.spaces:
        np.testing.assert_array_equal(found[s.name], np.arange(s.width))
    _, va, _ = tiny("mlp", seed=0)
    _, vb, _ = tiny("mlp", seed=1)
    mspec = specs.for_model(models.create("mlp", num_classes=5, hidden=(16, 12)))
    r1 = weight_matching(mspec, _params(va), _params(vb), seed=5)
    r2 = weight_matching(mspec, _params(va), _params(vb), seed=5)
    for s in r1:
        np.testing.assert_array_equal(r1[s], r2[s])


def test_objective_never_decreases_on_unrelated_models():
    _, va, _ = tiny("resnet20", seed=0)
    _, vb, _ = tiny("resnet20", seed=1)
    spec = specs.for_model(models.create("resnet20", width=1, num_classes=5))
    _, history = weight_matching(spec, _params(va), _params(vb), seed=0, return_history=True)
    assert len(history) >= 2
    assert all(b >= a - 1e-4 * abs(a) for a, b in zip(history, history[1:]))


def test_shape_mismatch_names_the_leaf():
    spec, v, pv, _ = _planted("mlp", 0)
    bad = _params(pv)
    bad["params/dense_0/bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="params/dense_0/bias"):
        weight_matching(spec, _params(v), bad)
