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


def test_checks_report_ranges_choices_and_non_finite_values():
    zipit = methods.get("zipit")
    assert zipit.problems(zipit.hparams) == {}
    bad = zipit.problems({"alpha": float("nan"), "beta": -1e9, "rule": "fast"})
    assert bad == {"alpha": "must be finite", "beta": "must be a finite number >= 0",
                   "rule": "must be one of 'reference', 'paper'"}
    assert methods.get("ties").problems({"density": 2.0}) == {
        "density": "must be a finite number in (0, 1]"}
    assert "integer" in methods.get("consensus").problems({"k": 1.5})["k"]
    assert methods.get("tall_masks").problems({"lam": [0.2, -1.0]})  # per-task values
    assert methods.get("average").problems({"weights": None}) == {}  # None is the default
    for name in methods.names():  # every default and every searched value is valid
        method = methods.get(name)
        assert method.problems(method.hparams) == {}, name
        for k, grid in method.search.items():
            assert all(not method.problems({k: v}) for v in grid), (name, k)


def test_checks_must_name_hyperparameters_and_parse():
    with pytest.raises(ValueError, match="not hyperparameters"):
        registry.register("_test_checks", "weight_space", checks={"lamda": "finite"})(
            lambda base, fts, *, key=None, lam=1.0: base)
    with pytest.raises(ValueError, match="bad check"):
        registry.register("_test_checks", "weight_space", checks={"lam": "0..1"})
    assert "_test_checks" not in methods.names()
