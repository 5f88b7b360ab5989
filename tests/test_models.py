"""Model shapes, taps and registry errors."""

import jax
import numpy as np
import pytest
from helpers import TINY, tiny

from mergejax import models, specs


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_and_taps_match_the_spec(name):
    model, variables, x = tiny(name)
    logits, taps = model.features(variables, x)
    assert logits.shape == (x.shape[0], 5)
    np.testing.assert_allclose(logits, model.apply(variables, x), atol=1e-6)
    spec = specs.for_model(model)
    for space in spec.spaces:  # every space is observable, at its width
        assert taps[space.tap].shape[-1] == space.width, space


def test_resnet20_layout_and_widths():
    model = models.create("resnet20", width=2, num_classes=7)
    v = model.init_shapes(np.zeros((1, 8, 8, 3)))
    p = v["params"]
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert p["layer2_0"]["shortcut_conv"]["kernel"].shape == (3, 3, 32, 64)
    assert "shortcut_conv" not in p["layer2_1"] and "shortcut_conv" not in p["layer1_0"]
    assert p["linear"]["kernel"].shape == (128, 7)
    assert sum(k.startswith("layer") for k in p) == 9
    assert set(v["batch_stats"]["bn1"]) == {"mean", "var"}


def test_train_mode_updates_batch_stats():
    model, variables, x = tiny("resnet20")
    _, new = model.apply_train(variables, x)
    before = variables["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(before, new["batch_stats"]["bn1"]["mean"])


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="resnet20"):
        models.create("resnet21")


def test_bad_model_argument_names_the_model():
    with pytest.raises(TypeError, match="mlp"):
        models.create("mlp", widht=3)


def test_equal_models_are_equal_and_hashable():
    a = models.create("resnet20", width=1, num_classes=5)
    b = models.create("resnet20", width=1, num_classes=5)
    assert a == b and hash(a) == hash(b)
    assert a != models.create("resnet20", width=2, num_classes=5)
    assert jax.tree.structure(a.init_shapes(np.zeros((1, 8, 8, 1)))) is not None
