"""The method registry."""

import pytest

from mergejax import methods
from mergejax.methods import registry


def test_average_is_registered_for_both_families():
    assert "average" in methods.names()
    assert "average" in methods.names("matching") and "average" in methods.names("weight_space")
    assert set(methods.get("average").families) == {"weight_space", "matching"}


def test_unknown_method_lists_valid_names():
    with pytest.raises(KeyError, match="average"):
        methods.get("no_such_method")


def test_family_mismatch_says_which_families_exist():
    registry.register("_test_only_ws", "weight_space")(lambda base, fts, key=None: base)
    try:
        with pytest.raises(ValueError, match="supports weight_space"):
            methods.get("_test_only_ws").fn("matching")
        with pytest.raises(ValueError, match="already has"):
            registry.register("_test_only_ws", "weight_space")(lambda *a: None)
    finally:
        registry._METHODS._items.pop("_test_only_ws")
