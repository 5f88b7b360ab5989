"""`merge_from_unmerge`: ZipIt!'s merge formula, numpy and jax alike."""

import jax.numpy as jnp
import numpy as np

from mergejax.kernels.transforms import ZIPIT_EPS, merge_from_unmerge


def test_merge_averages_each_cluster():
    # 2 models x 3 features -> 4 merged features: clusters {0, 3}, {1}, {2, 4}, {5}
    unmerge = np.zeros((6, 4), np.float32)
    for k, c in [(0, 0), (3, 0), (1, 1), (2, 2), (4, 2), (5, 3)]:
        unmerge[k, c] = 1.0
    merge = merge_from_unmerge(unmerge)
    assert merge.shape == (4, 6) and merge.dtype == np.float32
    sizes = unmerge.sum(0)
    np.testing.assert_array_equal(merge, unmerge.T / (sizes[:, None] + np.float32(ZIPIT_EPS)))
    np.testing.assert_allclose(merge.sum(1), sizes / (sizes + ZIPIT_EPS), rtol=1e-7)
    got = merge_from_unmerge(jnp.asarray(unmerge))
    assert isinstance(got, type(jnp.zeros(1)))
    np.testing.assert_array_equal(np.asarray(got), merge)
