"""Fixtures shared by the weight-space method tests."""

from pathlib import Path

import numpy as np
import pytest

TALL_GOLDEN = Path(__file__).parent.parent / "data" / "tall_weightspace.npz"


@pytest.fixture(scope="module")
def golden():
    """The TALL-masks repository's outputs on fixed inputs, copied into tests/data."""
    return dict(np.load(TALL_GOLDEN))
