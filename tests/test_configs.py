"""Every config file loads (full and `:quick`) and passes validation: a typo in a config, or a
field a refactor renamed, fails here before anyone launches it."""

from pathlib import Path

import pytest

from mergejax import experiment, validation  # noqa: F401  (experiment registers every kind)
from mergejax.config_lib import load_config_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
TFDS = ("cifar",)  # their data_dir must exist to validate; tested under mock data elsewhere


def test_there_are_configs():
    assert len(CONFIGS) >= 20 and "digits_resnet20.py" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_config_loads_and_validates(name, arg):
    config = load_config_file(ROOT / "configs" / name, arg)
    assert "launch.py --config=configs/" + name in (ROOT / "configs" / name).read_text()
    if name.startswith(TFDS):
        config.data.data_dir = ""  # the default location; not read by validation
    validation.validate(config)
