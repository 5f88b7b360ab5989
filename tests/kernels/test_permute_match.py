"""permute_match: parity with ZipIt!'s match_tensors_permute on the golden cases, and structure."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.kernels.assignment import assignment_score
from mergejax.kernels.permute_match import permute_match

DATA = Path(__file__).resolve().parents[1] / "data"
CASES = json.loads((DATA / "zipit_matching.json").read_text())


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA / "zipit_matching.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_golden_parity(golden, case):
    k, num, n = case["key"], case["num_models"], case["width"]
    corr = golden[f"{k}/correlation"]
    assert corr.shape == (num * n, num * n)
    merge, unmerge = permute_match(corr, num_models=num)
    assert merge.dtype == unmerge.dtype == np.float32
    np.testing.assert_array_equal(merge, golden[f"{k}/permute_merge"])
    np.testing.assert_array_equal(unmerge, golden[f"{k}/permute_unmerge"])


def _blocks_objective(corr, unmerge, num, n):
    """Sum over models i >= 1 of the assignment total of corr[:n, block i]."""
    total = 0.0
    for i in range(1, num):
        col = np.argmax(np.asarray(unmerge)[i * n : (i + 1) * n], axis=0)
        total += assignment_score(corr[:n, i * n : (i + 1) * n], col)
    return total


@pytest.mark.parametrize("backend", ["auto", "optax"])
def test_other_backends_same_optimum(golden, backend):
    """Same matrices on untied data; on tied data another optimum may win, with the same total."""
    for case in CASES[::3]:
        k, num, n = case["key"], case["num_models"], case["width"]
        corr = golden[f"{k}/correlation"]
        merge, unmerge = permute_match(corr, num_models=num, backend=backend)
        ref_unmerge = golden[f"{k}/permute_unmerge"]
        if case["kind"] == "random":
            np.testing.assert_array_equal(unmerge, ref_unmerge)
            np.testing.assert_array_equal(merge, golden[f"{k}/permute_merge"])
        got = _blocks_objective(corr, unmerge, num, n)
        assert got == pytest.approx(_blocks_objective(corr, ref_unmerge, num, n), rel=1e-6)


def test_structure_and_known_permutation():
    rng = np.random.default_rng(0)
    num, n = 3, 40
    perms = [np.arange(n)] + [rng.permutation(n) for _ in range(num - 1)]
    feats = rng.standard_normal((500, n))
    # Model i's feature perms[i][r] is a noisy copy of model 0's feature r.
    models = []
    for p in perms:
        x = np.empty_like(feats)
        x[:, p] = feats + 0.1 * rng.standard_normal(feats.shape)
        models.append(x)
    corr = np.corrcoef(np.concatenate(models, axis=1), rowvar=False).astype(np.float32)
    merge, unmerge = permute_match(corr, num_models=num, backend="auto")
    assert merge.shape == (n, num * n) and unmerge.shape == (num * n, n)
    for i, p in enumerate(perms):
        block = unmerge[i * n : (i + 1) * n]
        np.testing.assert_array_equal(block, np.eye(n, dtype=np.float32)[p].T)
    expected = np.float32(1) / (np.float32(num) + np.float32(1e-5))
    np.testing.assert_array_equal(merge, unmerge.T * expected)
    # Merging then unmerging the stacked features of identical models is the identity (up to eps).
    np.testing.assert_allclose(merge @ unmerge, np.eye(n) * num * expected, rtol=1e-6)


def test_jax_input_and_jit(golden):
    case = next(c for c in CASES if c["num_models"] == 3 and c["kind"] == "random")
    k = case["key"]
    corr = jnp.asarray(golden[f"{k}/correlation"])
    merge, unmerge = permute_match(corr, num_models=3)
    assert isinstance(merge, jax.Array)
    np.testing.assert_array_equal(np.asarray(unmerge), golden[f"{k}/permute_unmerge"])
    for backend in ("optax", "scipy"):
        f = jax.jit(lambda c, b=backend: permute_match(c, num_models=3, backend=b))
        merge, unmerge = f(corr)
        np.testing.assert_array_equal(np.asarray(merge), golden[f"{k}/permute_merge"])
        np.testing.assert_array_equal(np.asarray(unmerge), golden[f"{k}/permute_unmerge"])


def test_single_model_and_integer_input():
    merge, unmerge = permute_match(np.eye(4, dtype=np.int32), num_models=1)
    np.testing.assert_array_equal(unmerge, np.eye(4, dtype=np.float32))
    assert merge.dtype == np.float32
    np.testing.assert_array_equal(merge, np.eye(4, dtype=np.float32) / np.float32(1 + 1e-5))


@pytest.mark.parametrize(
    "corr,num,match",
    [
        (np.ones((6, 4)), 2, r"square .* num_models = 2; got \(6, 4\)"),
        (np.ones((9, 9)), 2, r"got \(9, 9\)"),
        (np.ones(4), 2, r"got \(4,\)"),
        (np.ones((4, 4)), 0, "positive int"),
        (np.ones((4, 4)), 2.0, "positive int"),
    ],
)
def test_errors(corr, num, match):
    with pytest.raises(ValueError, match=match):
        permute_match(corr, num_models=num)


def test_nonfinite_block_raises():
    corr = np.eye(6, dtype=np.float32)
    corr[1, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        permute_match(corr, num_models=2)
