"""Tests of `zip_match` (ZipIt! greedy matching) against the reference's golden outputs and a
numpy transcription of the published loop (`zipit_oracle.py`).

Shapes are reused on purpose (O = 16/32/66 for 2 models, 24/48/99 for 3): one compile per
(O, n_out, rule); alpha and beta are runtime arguments and do not recompile.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.kernels.zip_match import _zip_match, zip_match

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from zipit_oracle import zipit_oracle  # noqa: E402

DATA = pathlib.Path(__file__).parents[1] / "data"
CASES = json.loads((DATA / "zipit_matching.json").read_text())
CASE_IDS = [c["key"] for c in CASES]
ALPHA_BETA = [(0.3, 0.125), (0.5, 1.0), (0.0, 0.0), (1.0, 0.5), (0.0001, 0.075), (-0.5, 0.3)]


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA / "zipit_matching.npz") as z:
        return {k: z[k] for k in z.files}


def _run(corr, case_or_alpha, beta=None, num_models=None, rule="reference"):
    if isinstance(case_or_alpha, dict):
        c = case_or_alpha
        alpha, beta, num_models = c["alpha"], c["beta"], c["num_models"]
    else:
        alpha = case_or_alpha
    merge, unmerge = zip_match(
        jnp.asarray(corr), alpha=alpha, beta=beta, num_models=num_models, rule=rule
    )
    return np.asarray(merge), np.asarray(unmerge)


def _assert_same(got, want):
    (gm, gu), (wm, wu) = got, want
    assert gu.dtype == np.float32 and gm.dtype == np.float32
    np.testing.assert_array_equal(gu, wu)
    np.testing.assert_allclose(gm, wm, rtol=0, atol=1e-6)


def _random_corr(rng, num_models, n, samples=40):
    """Correlation of N models whose features are noisy permuted copies of model 0's."""
    base = rng.standard_normal((samples, n))
    feats = [base + 0.3 * rng.standard_normal((samples, n))]
    for _ in range(num_models - 1):
        feats.append(base[:, rng.permutation(n)] + rng.uniform(0.2, 1.5) * rng.standard_normal(
            (samples, n)))
    return np.corrcoef(np.concatenate(feats, 1).T).astype(np.float32)


def _tied_corr(rng, o):
    """Symmetric, unit diagonal, entries on a 0.25 grid in [-0.5, 0.75]: many exact ties."""
    a = rng.integers(-2, 4, size=(o, o)).astype(np.float32) * 0.25
    a = np.triu(a, 1)
    a = a + a.T
    np.fill_diagonal(a, 1.0)
    return a


def _check_invariants(merge, unmerge, allow_dropped=False):
    o, n_out = unmerge.shape
    assert merge.shape == (n_out, o)
    assert set(np.unique(unmerge)) <= {0.0, 1.0}
    rows = unmerge.sum(1)
    if allow_dropped:
        assert set(np.unique(rows)) <= {0.0, 1.0}
    else:
        np.testing.assert_array_equal(rows, 1.0)
    k = unmerge.sum(0)
    assert (k >= 1).all()  # every column is a surviving feature (at least itself)
    # columns are ordered by their lowest member (a merged feature keeps its lower index)
    first = unmerge.argmax(0)
    assert (np.diff(first) > 0).all()
    np.testing.assert_array_equal(merge, (unmerge / (k + np.float32(1e-5))).T)
    np.testing.assert_allclose(merge @ unmerge, np.diag(k / (k + 1e-5)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# golden outputs of gstoica27/ZipIt's match_tensors_zipit


@pytest.mark.parametrize("idx", range(len(CASES)), ids=CASE_IDS)
def test_golden_reference(golden, idx):
    c = CASES[idx]
    k = c["key"]
    got = _run(golden[f"{k}/correlation"], c)
    _assert_same(got, (golden[f"{k}/zip_merge"], golden[f"{k}/zip_unmerge"]))
    _check_invariants(*got, allow_dropped=c["reference_drops_features"] > 0)
    assert int((got[1].sum(1) == 0).sum()) == c["reference_drops_features"]


def test_oracle_reproduces_golden(golden):
    """The numpy transcription used below as ground truth is itself exact on all cases."""
    for c in CASES:
        k = c["key"]
        got = zipit_oracle(golden[f"{k}/correlation"], c["alpha"], c["beta"], c["num_models"])
        _assert_same(got, (golden[f"{k}/zip_merge"], golden[f"{k}/zip_unmerge"]))


def test_golden_paper_rule(golden):
    """rule="paper": identical to the reference for 2 models; for 3 models it follows the
    origin-blocking oracle, differs from the reference on some alpha = 0 cases and never drops
    a feature. (Widths 8 and 16 only, to save compiles; width 33 is covered by the oracle
    tests' padding paths through the reference rule.)"""
    differs = 0
    for c in (c for c in CASES if c["width"] in (8, 16)):
        k = c["key"]
        ref = (golden[f"{k}/zip_merge"], golden[f"{k}/zip_unmerge"])
        got = _run(golden[f"{k}/correlation"], c, rule="paper")
        _check_invariants(*got)
        if c["num_models"] == 2:
            _assert_same(got, ref)
        else:
            want = zipit_oracle(
                golden[f"{k}/correlation"], c["alpha"], c["beta"], c["num_models"], rule="paper"
            )
            _assert_same(got, want)
            differs += not np.array_equal(got[1], ref[1])
    assert differs >= 2  # at least the dropping cases


# ---------------------------------------------------------------------------------------------
# agreement with the oracle


def _check_vs_oracle(corr, num_models, rule):
    for alpha, beta in ALPHA_BETA:
        got = _run(corr, alpha, beta, num_models, rule)
        _assert_same(got, zipit_oracle(corr, alpha, beta, num_models, rule=rule))
        _check_invariants(*got, allow_dropped=rule == "reference")


@pytest.mark.parametrize("rule", ["reference", "paper"])
@pytest.mark.parametrize("num_models,n", [(2, 16), (3, 16)])
def test_random_vs_oracle(rule, num_models, n):
    rng = np.random.default_rng(100 * num_models + n)
    for _ in range(3):
        _check_vs_oracle(_random_corr(rng, num_models, n), num_models, rule)


@pytest.mark.parametrize("rule", ["reference", "paper"])
@pytest.mark.parametrize("num_models,n", [(2, 16), (3, 16)])
def test_ties_vs_oracle(rule, num_models, n):
    rng = np.random.default_rng(7 + num_models)
    for _ in range(4):
        _check_vs_oracle(_tied_corr(rng, num_models * n), num_models, rule)


def test_asymmetric_input_vs_oracle():
    """The input is used as given: a non-symmetric matrix still follows the row-major rule."""
    rng = np.random.default_rng(3)
    corr = _tied_corr(rng, 32) + np.triu(rng.integers(0, 2, (32, 32)) * 0.125, 1)
    corr = corr.astype(np.float32)
    for alpha, beta in ALPHA_BETA:
        _assert_same(_run(corr, alpha, beta, 2), zipit_oracle(corr, alpha, beta, 2))


@pytest.mark.parametrize("rule", ["reference", "paper"])
def test_large_tile_storage(rule):
    """The (O/B, O, B) storage with the tile used at large O (B = 64: here one padded tile)."""
    rng = np.random.default_rng(11)
    corr = _tied_corr(rng, 48)
    for alpha, beta, budget in [(0.3, 0.125, 1), (0.0, 0.0, 0)]:
        got = _zip_match(jnp.asarray(corr), jnp.float32(alpha), jnp.int32(budget), n_out=16,
                         num_models=3, rule=rule, tile=64)
        want = zipit_oracle(corr, alpha, beta, 3, rule=rule)
        _assert_same(tuple(np.asarray(x) for x in got), want)


def test_reduction_argument():
    """A merged width other than n (reduction r given explicitly, N given separately)."""
    rng = np.random.default_rng(5)
    corr = _random_corr(rng, 2, 16)
    got = zip_match(jnp.asarray(corr), reduction=0.75, num_models=2)
    assert got[1].shape == (32, 8)
    _assert_same(tuple(np.asarray(x) for x in got), zipit_oracle(corr, 0.3, 0.125, 2, 0.75))


# ---------------------------------------------------------------------------------------------
# semantics


def test_permuted_copy_pairs_twins():
    """Model B = model A with permuted features: every feature is merged with its twin."""
    rng = np.random.default_rng(0)
    n = 16
    x = rng.standard_normal((200, n))
    perm = rng.permutation(n)
    corr = np.corrcoef(np.concatenate([x, x[:, perm]], 1).T).astype(np.float32)
    merge, unmerge = _run(corr, 0.3, 0.125, 2)
    _check_invariants(merge, unmerge)
    col_a = unmerge[:n].argmax(1)
    col_b = unmerge[n:].argmax(1)
    np.testing.assert_array_equal(col_b, col_a[perm])  # B's feature k is A's feature perm[k]
    np.testing.assert_array_equal(unmerge.sum(0), 2.0)
    np.testing.assert_array_equal(col_a, np.arange(n))  # columns in A's order


def test_beta_zero_still_allows_one_same_model_merge():
    """Reference quirk: the budget is checked after a same-model merge (beta = 0 allows one)."""
    n = 8
    corr = np.full((2 * n, 2 * n), 0.1, np.float32)
    np.fill_diagonal(corr, 1.0)
    corr[0, 1] = corr[1, 0] = 0.9  # model 0's features 0 and 1: the most similar pair overall
    corr[2, 3] = corr[3, 2] = 0.8  # a second same-model pair: blocked after the first merge
    for c in range(n):
        corr[c, n + c] = corr[n + c, c] = 0.5
    merge, unmerge = _run(corr, 0.3, 0.0, 2)
    _assert_same((merge, unmerge), zipit_oracle(corr, 0.3, 0.0, 2))
    assert unmerge[0].argmax() == unmerge[1].argmax()  # the one allowed same-model merge
    assert unmerge[2].argmax() != unmerge[3].argmax()  # the budget is spent


def test_reference_drops_and_paper_does_not(golden):
    dropping = [c for c in CASES if c["reference_drops_features"] > 0]
    assert dropping
    for c in dropping:
        k = c["key"]
        _, u_ref = _run(golden[f"{k}/correlation"], c)
        _, u_pap = _run(golden[f"{k}/correlation"], c, rule="paper")
        assert int((u_ref.sum(1) == 0).sum()) == c["reference_drops_features"]
        np.testing.assert_array_equal(u_pap.sum(1), 1.0)


@pytest.mark.parametrize("rule", ["reference", "paper"])
def test_nothing_allowed(rule):
    """Every similarity -inf from the start: the reference drops the first remaining feature
    each step (16 of 24 here, the last 8 survive alone); the paper rule merges the first two."""
    corr = np.full((24, 24), -np.inf, np.float32)
    np.fill_diagonal(corr, 1.0)
    got = _run(corr, 0.3, 0.125, 3, rule)
    _assert_same(got, zipit_oracle(corr, 0.3, 0.125, 3, rule=rule))
    _check_invariants(*got, allow_dropped=rule == "reference")
    if rule == "reference":
        np.testing.assert_array_equal(got[1][16:], np.eye(8, dtype=np.float32))


def test_jit_equals_eager(golden):
    """Same result compiled (as called, and inside a user's jit) and executed op by op."""
    c = next(c for c in CASES if c["width"] == 8 and c["num_models"] == 2 and c["alpha"] == 0)
    corr = jnp.asarray(golden[f"{c['key']}/correlation"])
    kw = dict(alpha=c["alpha"], beta=c["beta"], num_models=2)
    direct = zip_match(corr, **kw)
    jitted = jax.jit(lambda s: zip_match(s, **kw))(corr)
    with jax.disable_jit():
        eager = zip_match(corr, **kw)
    for got in (jitted, eager):
        _assert_same(tuple(np.asarray(a) for a in got), tuple(np.asarray(a) for a in direct))


def test_bad_arguments():
    corr = jnp.eye(6)
    with pytest.raises(ValueError, match="rule"):
        zip_match(corr, rule="nope")
    with pytest.raises(ValueError, match="multiple"):
        zip_match(corr, num_models=4)
    with pytest.raises(ValueError, match="square"):
        zip_match(jnp.ones((4, 6)))
