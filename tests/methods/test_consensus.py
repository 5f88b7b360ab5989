"""Consensus merging: golden masks, k=0 / k>T limits, equivalence with TA / TIES."""


import jax
import numpy as np
import pytest
from helpers import random_trees

from mergejax import methods
from mergejax.methods.consensus import consensus, consensus_mask
from mergejax.methods.tall_masks import multitask_vector, task_masks
from mergejax.methods.task_arithmetic import task_arithmetic
from mergejax.methods.ties import ties


@pytest.mark.parametrize("merged", ["sum", "ties20"])
@pytest.mark.parametrize("lam", ["0.2", "0.4", "0.6", "1.0"])
def test_consensus_masks_match_golden(golden, merged, lam):
    base = {"w": golden["ptm"]}
    fts = [{"w": r} for r in golden["finetuned"]]
    mtv = {"w": golden[f"tall/{merged}/merged_tv"]}
    for k in (0, 1, 2, 5):
        got = consensus_mask(base, fts, mtv, mask_lam=float(lam), k=k)["w"]
        np.testing.assert_array_equal(got, golden[f"consensus/{merged}/lambda{lam}/k{k}"])


def _models(n=3, seed=0):
    return random_trees({"a": (12, 9), "b": (17,)}, n, seed)


def _close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_k_zero_is_task_arithmetic_or_ties():
    base, fts = _models()
    _close(consensus(base, fts, k=0, lam=0.4), task_arithmetic(base, fts, lam=0.4))
    _close(consensus(base, fts, k=0, lam=0.4, merged="ties", density=0.3),
           ties(base, fts, lam=0.4, density=0.3, disjoint="sum"))


def test_k_above_task_count_is_the_base():
    base, fts = _models()
    for k in (4, 10):
        for x, y in zip(jax.tree.leaves(consensus(base, fts, k=k, lam=0.7)),
                        jax.tree.leaves(base)):
            np.testing.assert_array_equal(np.asarray(x), y)


def test_default_k2_drops_selfish_and_catastrophic_weights():
    base, fts = _models()
    mtv = multitask_vector(base, fts)
    masks = task_masks(base, fts, mtv, lam=0.6)
    out = consensus(base, fts, lam=0.5)  # k=2, mask_lam=0.6 by default
    for key in base:
        count = sum(np.asarray(m[key]).astype(int) for m in masks)
        assert (count < 2).any() and (count >= 2).any()
        expect = base[key] + np.float32(0.5) * np.where(count >= 2, np.asarray(mtv[key]), 0)
        np.testing.assert_array_equal(out[key], expect)
        k1 = np.asarray(consensus_mask(base, fts, mtv, k=1)[key])
        np.testing.assert_array_equal(k1, count >= 1)  # k=1 removes only unused weights


def test_order_invariance():
    base, fts = _models()
    _close(consensus(base, fts, lam=0.6), consensus(base, fts[::-1], lam=0.6), atol=1e-5)


def test_per_task_mask_lambdas():
    base, fts = _models()
    mtv = multitask_vector(base, fts)
    lams = [0.2, 0.6, 1.0]
    got = consensus_mask(base, fts, mtv, mask_lam=lams, k=2)
    masks = [task_masks(base, fts, mtv, lam=lam)[t] for t, lam in enumerate(lams)]
    for key in base:
        count = sum(np.asarray(m[key]).astype(int) for m in masks)
        np.testing.assert_array_equal(got[key], count >= 2)


def test_bad_inputs():
    base, fts = _models(2)
    for k in (-1, 1.5, True):
        with pytest.raises(ValueError, match="integer >= 0"):
            consensus(base, fts, k=k)
    with pytest.raises(ValueError, match=r"mask_lam must be in \[0, inf\)"):
        consensus(base, fts, mask_lam=-1)
    with pytest.raises(ValueError, match="'b'"):
        consensus(base, [fts[0], {"a": fts[1]["a"]}])


def test_registered():
    m = methods.get("consensus")
    assert m.hparams["k"] == 2 and m.hparams["merged"] == "sum"
    assert "lam" in m.search
