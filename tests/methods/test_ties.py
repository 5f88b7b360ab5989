"""TIES-Merging: golden parity with tall_masks, exact top-k, sign election, properties."""


import jax
import numpy as np
import pytest
from helpers import flat

from mergejax import methods
from mergejax.methods import task_vectors as tv
from mergejax.methods.task_arithmetic import task_arithmetic
from mergejax.methods.ties import ties, ties_merge_task_vectors, trim_topk

KS = ("0.5", "5", "20", "100")


def one_leaf(rows):
    return [{"w": np.asarray(r)} for r in rows]


def two_leaves(rows, cut=1234):
    return [{"a": np.asarray(r[:cut]), "b": {"c": np.asarray(r[cut:])}} for r in rows]


def ref_topk(x, density):
    """tall_masks topk_values_mask on one row, with np.partition."""
    x = np.asarray(x)
    if density >= 1:
        return x
    d = x.size
    kth = d - int(d * density)
    thr = np.partition(np.abs(x).ravel(), kth - 1)[kth - 1]
    return np.where(np.abs(x) >= thr, x, 0)


@pytest.mark.parametrize("K", KS)
def test_topk_matches_golden(golden, K):
    got = trim_topk(one_leaf(golden["task_vectors"]), tv.density_from_k(float(K)))
    np.testing.assert_array_equal(np.stack([flat(g) for g in got]), golden[f"topk/K{K}"])


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("fn", ["dis-mean", "dis-sum", "dis-max"])
def test_ties_matches_golden(golden, K, fn):
    d = tv.density_from_k(float(K))
    ref = golden[f"ties/K{K}/{fn}"]
    got = ties_merge_task_vectors(one_leaf(golden["task_vectors"]), density=d, disjoint=fn)
    np.testing.assert_array_equal(flat(got), ref)
    # Global trimming does not depend on how the model is split into leaves.
    got2 = ties_merge_task_vectors(two_leaves(golden["task_vectors"]), density=d, disjoint=fn)
    np.testing.assert_array_equal(flat(got2), ref)


def test_majority_zero_sign_rule_is_exercised_by_golden(golden):
    # At K=20 the golden data has zero-sum columns with non-zero entries and a negative
    # majority, so mergekit's +1 rule gives a different answer there (and only there).
    tvs = one_leaf(golden["task_vectors"])
    pos = flat(ties_merge_task_vectors(tvs, density=0.2, disjoint="mean", zero_sign="positive"))
    ref = golden["ties/K20/dis-mean"]
    trimmed = golden["topk/K20"]
    ambiguous = (trimmed.sum(0) == 0) & (trimmed != 0).any(0)
    assert ambiguous.any()
    assert not np.array_equal(pos, ref)
    np.testing.assert_array_equal(pos[~ambiguous], ref[~ambiguous])


def test_per_tensor_scope_differs_from_global_on_golden(golden):
    tvs = two_leaves(golden["task_vectors"])
    got = flat(ties_merge_task_vectors(tvs, density=0.2, disjoint="sum", scope="tensor"))
    assert not np.array_equal(got, golden["ties/K20/dis-sum"])
    # ... and equals trimming each leaf separately.
    trimmed = trim_topk(tvs, 0.2, scope="tensor")
    for t, tr in enumerate(trimmed):
        np.testing.assert_array_equal(tr["a"], ref_topk(tvs[t]["a"], 0.2))
        np.testing.assert_array_equal(tr["b"]["c"], ref_topk(tvs[t]["b"]["c"], 0.2))


def test_global_vs_per_tensor_topk_on_two_tensor_toy():
    # Leaf "small" holds only small values: a global top-50% keeps none of them, a per-tensor
    # top-50% keeps half of each leaf.
    tau = {"small": np.array([0.1, 0.2, 0.3, 0.4], np.float32),
           "large": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
    (g,) = trim_topk([tau], 0.5, scope="global")
    (p,) = trim_topk([tau], 0.5, scope="tensor")
    # d=8, kth = 8 - 4 = 4th smallest = 0.4 -> keeps 0.4 and all of "large" (ties kept).
    f32 = np.float32
    np.testing.assert_array_equal(g["small"], f32([0, 0, 0, 0.4]))
    np.testing.assert_array_equal(g["large"], tau["large"])
    # Per tensor (d=4): kth = 4 - 2 = 2nd smallest, so 3 entries survive (tall_masks rule).
    np.testing.assert_array_equal(p["small"], f32([0, 0.2, 0.3, 0.4]))
    np.testing.assert_array_equal(p["large"], f32([0, 2.0, 3.0, 4.0]))


def test_global_threshold_over_leaves_matches_partition():
    rng = np.random.default_rng(0)
    trees = [{"a": rng.standard_normal((150, 200)).astype(np.float32),
              "b": np.round(rng.standard_normal(30_000), 1).astype(np.float32),
              "c": rng.standard_normal(7).astype(np.float32)} for _ in range(2)]
    trimmed = trim_topk(trees, 0.3)
    for t, tree in enumerate(trees):
        np.testing.assert_array_equal(flat(trimmed[t]), ref_topk(flat(tree), 0.3))


def _models(taus, base=None):
    rng = np.random.default_rng(1)
    shape = np.shape(taus[0])
    base = rng.standard_normal(shape).astype(np.float32) if base is None else base
    # Dyadic values: base + tau and (base + tau) - base are exact in float32.
    base = np.round(base * 64) / 64
    return {"w": base.astype(np.float32)}, [{"w": (base + np.asarray(t)).astype(np.float32)}
                                           for t in taus]


def test_no_trim_and_agreeing_signs_equals_task_arithmetic():
    rng = np.random.default_rng(2)
    mag = np.round(rng.uniform(0.25, 1, (3, 40)) * 64) / 64
    sign = rng.choice([-1.0, 1.0], 40)
    base, fts = _models([m * sign for m in mag])
    T, lam = 3, 0.5
    ta = task_arithmetic(base, fts, lam=lam)
    np.testing.assert_allclose(ties(base, fts, lam=lam, density=1.0, disjoint="sum")["w"],
                               ta["w"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ties(base, fts, lam=lam, density=1.0, disjoint="mean")["w"],
                               task_arithmetic(base, fts, lam=lam / T)["w"], rtol=0, atol=1e-6)


def test_sign_election_by_mass_not_count():
    # column 0: (+3, -1, -1) sums to +1: '+' wins by mass though '-' wins by count;
    # column 1: (+1, +1, -3) sums to -1: '-' wins by mass, only -3 agrees.
    taus = one_leaf(np.array([[3.0, 1.0], [-1.0, 1.0], [-1.0, -3.0]], np.float32))
    for fn in ("mean", "sum", "max"):
        got = ties_merge_task_vectors(taus, density=1.0, disjoint=fn)["w"]
        np.testing.assert_array_equal(got, [3.0, -3.0])


def test_zero_sum_resolution_majority_vs_positive():
    # Coordinate 0 sums to exactly 0; coordinates 1-3 elect '-', so the majority sign is '-'.
    taus = one_leaf(np.array([[1.0, -1.0, -2.0, -1.0], [-1.0, -1.0, 0.0, -3.0]], np.float32))
    maj = ties_merge_task_vectors(taus, density=1.0, disjoint="mean")["w"]
    pos = ties_merge_task_vectors(taus, density=1.0, disjoint="mean", zero_sign="positive")["w"]
    assert maj[0] == -1.0 and pos[0] == 1.0
    np.testing.assert_array_equal(maj[1:], pos[1:])
    np.testing.assert_array_equal(maj[1:], [-1.0, -2.0, -2.0])
    # The majority is taken over the whole model, across leaves.
    split = [{"x": t["w"][:1], "y": t["w"][1:]} for t in taus]
    assert ties_merge_task_vectors(split, density=1.0)["x"][0] == -1.0


def test_disjoint_mean_counts_agreeing_nonzero_entries():
    taus = one_leaf(np.array([[2.0, 0.0], [0.0, 0.0], [4.0, 0.0]], np.float32))
    got = ties_merge_task_vectors(taus, density=1.0, disjoint="mean")["w"]
    np.testing.assert_array_equal(got, [3.0, 0.0])


def test_ties_method_is_base_plus_lam_merged_and_keeps_structure():
    rng = np.random.default_rng(3)
    base = {"l1": {"kernel": rng.standard_normal((6, 5)).astype(np.float32)},
            "l2": [rng.standard_normal(4).astype(np.float32)]}
    fts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), base)
           for _ in range(3)]
    out = ties(base, fts, lam=0.7, density=0.3)
    assert jax.tree.structure(out) == jax.tree.structure(base)
    taus = [jax.tree.map(lambda f, b: np.asarray(f) - b, f, base) for f in fts]
    merged = ties_merge_task_vectors(taus, density=0.3)
    expect = jax.tree.map(lambda b, m: b + np.float32(0.7) * np.asarray(m), base, merged)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_order_invariance():
    rng = np.random.default_rng(4)
    base = {"a": rng.standard_normal((20, 10)).astype(np.float32),
            "b": rng.standard_normal(30).astype(np.float32)}
    fts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), base)
           for _ in range(3)]
    for scope in ("global", "tensor"):
        a = ties(base, fts, density=0.4, scope=scope)
        b = ties(base, fts[::-1], density=0.4, scope=scope)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_bad_inputs():
    base = {"a": np.zeros(4, np.float32), "b": np.zeros(3, np.float32)}
    ft = {"a": np.ones(4, np.float32), "b": np.ones(3, np.float32)}
    for d in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            ties(base, [ft], density=d)
    with pytest.raises(ValueError, match="disjoint"):
        ties(base, [ft], disjoint="median")
    with pytest.raises(ValueError, match="scope"):
        ties(base, [ft], scope="row")
    with pytest.raises(ValueError, match="zero_sign"):
        ties(base, [ft], zero_sign="minority")
    with pytest.raises(ValueError, match="'b'"):
        ties(base, [{"a": ft["a"], "c": ft["b"]}])
    with pytest.raises(ValueError, match="'b'.*shape"):
        ties(base, [{"a": ft["a"], "b": np.ones(4, np.float32)}])
    with pytest.raises(ValueError, match="'a'.*model 1.*non-finite"):
        ties(base, [ft, {"a": np.array([0, np.nan, 0, 0], np.float32), "b": ft["b"]}])


def test_registered():
    m = methods.get("ties")
    assert m.families == ("weight_space",)
    assert m.hparams == {"lam": 1.0, "density": 0.2, "disjoint": "mean",
                         "zero_sign": "majority", "scope": "global"}
    assert m.search["lam"][0] == 0.8 and m.search["lam"][-1] == 2.5
