"""Merge specs and apply_merge: the invariants every matching method relies on."""

import jax
import numpy as np
import pytest
from helpers import TINY, tiny

from mergejax import specs


def _random_perms(spec, seed):
    rng = np.random.default_rng(seed)
    return {s.name: rng.permutation(s.width) for s in spec.spaces}


@pytest.mark.parametrize("name", sorted(TINY))
def test_permuting_through_the_spec_keeps_logits(name):
    model, v, x = tiny(name)
    spec = specs.for_model(model)
    [permuted] = specs.apply_merge(spec, [v], specs.permutation_transforms(_random_perms(spec, 1)))
    assert not np.allclose(permuted["params"][model.head]["kernel"],
                           v["params"][model.head]["kernel"])  # something really moved
    np.testing.assert_allclose(model.apply(permuted, x), model.apply(v, x), atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_merging_a_model_with_itself_returns_it(name):
    model, v, _ = tiny(name)
    spec = specs.for_model(model)
    merged = specs.apply_merge(spec, [v, v], specs.identity_transforms(spec, 2))
    for m in merged:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), m, v)


def test_identity_merge_of_a_permuted_copy_recovers_the_model():
    model, v, x = tiny("resnet20")
    spec = specs.for_model(model)
    perms = _random_perms(spec, 2)
    [pv] = specs.apply_merge(spec, [v], specs.permutation_transforms(perms))
    # Undo model 1's permutation inside the merge: its unmerge block is P^T, merge block P.
    transforms = {}
    for s in spec.spaces:
        p = np.eye(s.width, dtype=np.float32)[perms[s.name]]
        unmerge = np.concatenate([np.eye(s.width), p]).astype(np.float32)
        transforms[s.name] = (unmerge.T / 2, unmerge)
    merged = specs.apply_merge(spec, [v, pv], transforms)
    np.testing.assert_allclose(model.apply(merged[0], x), model.apply(v, x), atol=1e-5)


def test_tails_stay_per_model_and_partial_zip_keeps_later_layers():
    model, va, x = tiny("resnet20", seed=0)
    _, vb, _ = tiny("resnet20", seed=1)
    spec = specs.for_model(model)
    spaces = spec.prefix("stream1")
    merged = specs.apply_merge(spec, [va, vb], specs.identity_transforms(spec, 2, spaces))
    a, b = merged
    # trunk shared, averaged
    pa, pb = va["params"], vb["params"]
    np.testing.assert_allclose(a["params"]["conv1"]["kernel"],
                               (pa["conv1"]["kernel"] + pb["conv1"]["kernel"]) / 2, atol=1e-6)
    np.testing.assert_array_equal(a["params"]["conv1"]["kernel"], b["params"]["conv1"]["kernel"])
    # past the cut: each model's own weights (identity unmerge)
    np.testing.assert_allclose(a["params"]["layer3_2"]["conv2"]["kernel"],
                               va["params"]["layer3_2"]["conv2"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(b["params"]["linear"]["kernel"], vb["params"]["linear"]["kernel"])
    avg = specs.apply_merge(spec, [va, vb], specs.identity_transforms(spec, 2), tails="average")
    np.testing.assert_allclose(avg[0]["params"]["linear"]["bias"],
                               (pa["linear"]["bias"] + pb["linear"]["bias"]) / 2)


def test_a_cut_through_a_residual_stream_is_refused():
    model, va, _ = tiny("resnet20")
    spec = specs.for_model(model)
    # stream2 merged but the inner space of its first block is not: layer2_0/conv2 produces
    # stream2 while consuming an unmerged space.
    with pytest.raises(ValueError, match="layer2_0/conv2"):
        specs.apply_merge(spec, [va, va], specs.identity_transforms(spec, 2, ["stream2"]))


def test_spec_check_names_leaf_and_shapes():
    model, v, _ = tiny("mlp")
    spec = specs.for_model(model)
    bad = jax.tree.map(lambda a: a, v)
    bad["params"]["dense_1"]["kernel"] = np.zeros((16, 13), np.float32)
    with pytest.raises(ValueError, match=r"params/dense_1/kernel.*\(16, 13\).*\(16, 12\)"):
        spec.check(bad)
    extra = {**v, "params": {**v["params"], "surprise": {"kernel": np.zeros(3)}}}
    with pytest.raises(ValueError, match="surprise"):
        spec.check(extra)


def test_transform_shapes_are_checked():
    model, v, _ = tiny("mlp")
    spec = specs.for_model(model)
    with pytest.raises(ValueError, match="hidden0"):
        specs.apply_merge(spec, [v, v], {"hidden0": (np.eye(16), np.eye(16))})


def test_spec_builder_refuses_one_space_on_two_axes():
    b = specs.SpecBuilder()
    b.space("s", 4, None)
    with pytest.raises(ValueError, match="two of its axes"):
        b.leaf("params/x/kernel", specs.Axis(0, "s", False), specs.Axis(1, "s", True))


def test_unknown_architecture_lists_those_with_specs():
    class Fake:
        name = "transformer"

    with pytest.raises(KeyError, match="resnet20"):
        specs.for_model(Fake())


def test_models_of_different_widths_are_refused_with_the_methods_named():
    from mergejax import models

    narrow = models.create("mlp", num_classes=5, hidden=(16, 12))
    wide = models.create("mlp", num_classes=5, hidden=(16, 24))
    va = narrow.init(jax.random.key(0), np.zeros((1, 8, 8, 1)))
    vb = wide.init(jax.random.key(0), np.zeros((1, 8, 8, 1)))
    spec = specs.for_model(narrow)
    with pytest.raises(ValueError, match=r"dense_1/kernel.*zipit.*different widths"):
        specs.apply_merge(spec, [va, vb], specs.identity_transforms(spec, 2))
