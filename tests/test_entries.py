"""Method entries `name[hparam=value,...][@space][+variant]`: parsing, validation before any
run (the entry named), and the entry's hyperparameters reaching the method over config.merge."""

import re
from pathlib import Path

import pytest

from mergejax import experiment, merging, validation
from mergejax.config_lib import load_config_file
from mergejax.entries import MethodEntry, entry_hparams, parse_method, split_entry

ROOT = Path(__file__).resolve().parents[1]


def _config(name, arg="quick"):
    return load_config_file(ROOT / "configs" / f"{name}.py", arg)


@pytest.mark.parametrize("entry, expected", [
    ("average", MethodEntry("average", (), None, {})),
    ("zipit@stream2+repair", MethodEntry("zipit", ("repair",), "stream2", {})),
    ("mudsc[group_heads=False]+repair",
     MethodEntry("mudsc", ("repair",), None, {"group_heads": False})),
    ("zipit[alpha=0.5, beta=1]@stream1+repair+reset",
     MethodEntry("zipit", ("repair", "reset"), "stream1", {"alpha": 0.5, "beta": 1})),
    # commas, '+', '@' and ']' inside literal values do not split the entry
    ("x[a=(1, 2), b='p+q@r]', c=None]@s+repair",
     MethodEntry("x", ("repair",), "s", {"a": (1, 2), "b": "p+q@r]", "c": None})),
])
def test_split_entry(entry, expected):
    assert split_entry(entry) == expected


@pytest.mark.parametrize("entry, why", [
    ("mudsc[]", "empty"),
    ("mudsc[group_heads]", "hparam=value pairs only"),
    ("mudsc[group_heads=false]", "not a Python literal"),
    ("mudsc[fix_rate=0.5", "unclosed"),
    ("mudsc]", "without '['"),
    ("mudsc[fix_rate=0.5]x", "must follow the method name"),
    ("zipit@", "expected"),
    ("zipit++repair", "expected"),
])
def test_split_entry_rejects_bad_syntax(entry, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        split_entry(entry)


def test_parse_method_checks_values_like_config_hparams():
    assert parse_method("mudsc[fix_rate=1.0, matcher='permute']").hparams == {
        "fix_rate": 1.0, "matcher": "permute"}
    for entry, why in [("mudsc[group_heads=3]+repair", "group_heads=3: must be a bool"),
                       ("mudsc[fix_rate=1.5]", "fix_rate=1.5: must be a finite number in [0, 1]"),
                       ("zipit[bogus=1]", "bogus=1: unknown hyperparameter of 'zipit'"),
                       ("permute[lam=0.5]", "unknown hyperparameter of 'permute' (matching)")]:
        family = "matching" if entry.startswith("permute") else None
        with pytest.raises(ValueError, match=re.escape(why)) as info:
            parse_method(entry, family)
        assert repr(entry) in str(info.value)


def test_entry_hparams_override_config_section():
    config = _config("digits_mlp")
    with config.unlocked():
        config.merge.zipit.alpha = 0.7
        config.merge.zipit.beta = 2.0
    hp = entry_hparams(config, parse_method("zipit[alpha=0.1]+repair"), "matching")
    assert hp["alpha"] == 0.1 and hp["beta"] == 2.0
    assert entry_hparams(config, parse_method("zipit"), "matching")["alpha"] == 0.7


def test_validation_rejects_bad_entry_values_naming_each_entry(tmp_path):
    config = _config("digits_vit")
    with config.unlocked():
        config.merge.methods = ("average", "mudsc[group_heads=3]+repair",
                                "zipit[beta=-1.0]@stream", "permute[bogus=1]",
                                "zipit[alpha=0.5]@nowhere", "permute[group_heads=False]")
    with pytest.raises(validation.ConfigError) as info:
        experiment.run(config, tmp_path / "work")
    problems = info.value.problems
    assert problems[:3] == [
        "config.merge.methods[1]='mudsc[group_heads=3]+repair': group_heads=3: must be a bool "
        "(the default is True)",
        "config.merge.methods[2]='zipit[beta=-1.0]@stream': beta=-1.0: must be a finite "
        "number >= 0",
        "config.merge.methods[3]='permute[bogus=1]': bogus=1: unknown hyperparameter of "
        "'permute' (matching); valid: group_heads",
    ]
    assert problems[3].startswith("config.merge.methods[4]='zipit[alpha=0.5]@nowhere': model "
                                  "'vit_tiny' has no feature space 'nowhere'")
    assert len(problems) == 4  # the valid entries raise nothing
    assert not (tmp_path / "work").exists()  # refused before any run started


def test_validation_checks_entry_hparams_against_the_run_family():
    config = _config("digits_finetune_mlp")
    with config.unlocked():
        config.merge.methods = ("ties[lam=0.5]", "ties[group_heads=False]", "ties[density=2.0]")
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config)
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("config.merge.methods[1]='ties[group_heads=False]': "
                                  "group_heads=False: unknown hyperparameter of 'ties' "
                                  "(weight_space)")
    assert problems[1].startswith("config.merge.methods[2]='ties[density=2.0]': "
                                  "density=2.0: must be")


@pytest.mark.slow
def test_grouped_and_ungrouped_permute_on_a_tiny_vit_give_different_rows(tmp_path, monkeypatch):
    """The entry's group_heads reaches the method, over config.merge.permute.group_heads."""
    seen = []
    match = merging.match

    def spy(name, *args, hparams, **kwargs):
        seen.append((name, dict(hparams)))
        return match(name, *args, hparams=hparams, **kwargs)

    monkeypatch.setattr(merging, "match", spy)
    config = _config("digits_vit")
    with config.unlocked():
        config.merge.permute.group_heads = False
        config.merge.methods = ("permute", "permute[group_heads=True]")
    rows = {r["method"]: r for r in experiment.run(config, tmp_path)}
    assert seen == [("permute", {"group_heads": False}), ("permute", {"group_heads": True})]
    grouped, ungrouped = rows["permute[group_heads=True]"], rows["permute"]
    assert grouped["hparams"] == {"group_heads": True}
    assert ungrouped["hparams"] == {"group_heads": False}
    # moving whole heads and moving single dimensions are different merges of the same ViTs
    assert grouped["per_task_acc"] != ungrouped["per_task_acc"]


@pytest.mark.slow
def test_finetune_entry_fixes_a_searched_hparam(tmp_path):
    config = _config("digits_finetune_mlp")
    with config.unlocked():
        config.merge.methods = ("ties", "ties[lam=0.5]")
    rows = {r["method"]: r for r in experiment.run(config, tmp_path)}
    assert rows["ties"]["num_candidates"] > 1
    assert rows["ties[lam=0.5]"]["num_candidates"] == 1  # the entry's value is not searched
    assert rows["ties[lam=0.5]"]["hparams"]["lam"] == 0.5
