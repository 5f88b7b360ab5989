"""MuDSC kernels: weight-space similarity conventions, dual-space mix, group matching."""

import numpy as np
import pytest

from mergejax.kernels.assignment import solve_assignment
from mergejax.kernels.dual_space import (
    combine_similarity,
    group_permute_match,
    group_zip_match,
    matched_similarity,
    stack_models,
    weight_rows,
    weight_similarity,
)
from mergejax.kernels.permute_match import permute_match
from mergejax.kernels.transforms import merge_from_unmerge
from mergejax.kernels.zip_match import zip_match
from mergejax.specs import Axis, MergeSpec, Space

# A 3-layer chain h0 -> h1 -> h2 (Dense kernels (in, out) and a bias on h1).
WIDTH = 4
CHAIN = MergeSpec(
    spaces=(Space("h0", WIDTH, None), Space("h1", WIDTH, None), Space("h2", WIDTH, None)),
    leaves={
        "params/d1/kernel": (Axis(0, "h0", False), Axis(1, "h1", True)),
        "params/d1/bias": (Axis(0, "h1", True),),
        "params/d2/kernel": (Axis(0, "h1", False), Axis(1, "h2", True)),
        "params/d3/kernel": (Axis(0, "h2", False),),  # a head on h2
    },
)


def _chain_params(rng, n=WIDTH):
    return {"params/d1/kernel": rng.normal(size=(n, n)), "params/d1/bias": rng.normal(size=n),
            "params/d2/kernel": rng.normal(size=(n, n)),
            "params/d3/kernel": rng.normal(size=(n, 3))}


def _uneven_zip_transform():
    """A zip-like (merge, unmerge) for N=2, n=4 whose clusters have 3, 1, 2 and 2 members, so
    N * M_i and U_i^T differ (they agree on clusters of exactly N members)."""
    clusters = [[0, 1, 4], [2], [3, 5], [6, 7]]  # rows 0-3 model A, 4-7 model B
    unmerge = np.zeros((8, 4), np.float32)
    for c, members in enumerate(clusters):
        unmerge[members, c] = 1.0
    return merge_from_unmerge(unmerge), unmerge


def test_weight_rows_use_merge_on_inputs_and_unmerge_on_outputs():
    rng = np.random.default_rng(0)
    params = [_chain_params(rng) for _ in range(2)]
    t0, t2 = _uneven_zip_transform(), _uneven_zip_transform()
    rows = weight_rows(CHAIN, stack_models(params), "h1", {"h0": t0, "h2": t2})
    expected = []
    for i, p in enumerate(params):
        m0 = 2 * t0[0][:, i * WIDTH:(i + 1) * WIDTH]  # N * M_i on the consumed h0 axis
        u2 = t2[1][i * WIDTH:(i + 1) * WIDTH]  # U_i on the produced h2 axis
        expected.append(np.concatenate([
            p["params/d1/bias"][:, None],
            (m0 @ p["params/d1/kernel"]).T,  # rows along h1 = columns of the kernel
            p["params/d2/kernel"] @ u2,
        ], axis=1))
    # leaves are concatenated in sorted path order: d1/bias, d1/kernel, d2/kernel
    np.testing.assert_allclose(rows, np.concatenate(expected), rtol=1e-5, atol=1e-5)
    sim = weight_similarity(CHAIN, stack_models(params), "h1", {"h0": t0, "h2": t2})
    np.testing.assert_allclose(sim, np.corrcoef(np.concatenate(expected)), atol=1e-5)
    cos = weight_similarity(CHAIN, stack_models(params), "h1", {"h0": t0, "h2": t2},
                            use_cos=True)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, unit @ unit.T, atol=1e-5)


def test_permuted_neighbours_reduce_to_git_rebasin_alignment():
    """With the true permutations on the neighbours, B's rows are A's rows permuted: the cross
    block has correlation 1 on the planted matching and the LAP finds it."""
    rng = np.random.default_rng(1)
    n = 6
    spec = MergeSpec(tuple(Space(s, n, None) for s in ("h0", "h1", "h2")), CHAIN.leaves)
    pa = _chain_params(rng, n)
    perm = {s: rng.permutation(n) for s in ("h0", "h1", "h2")}  # B feature k = A feature p[k]
    pb = {"params/d1/kernel": pa["params/d1/kernel"][perm["h0"]][:, perm["h1"]],
          "params/d1/bias": pa["params/d1/bias"][perm["h1"]],
          "params/d2/kernel": pa["params/d2/kernel"][perm["h1"]][:, perm["h2"]],
          "params/d3/kernel": pa["params/d3/kernel"][perm["h2"]]}
    # matching (merge, unmerge) of the neighbours, as permute_match returns them
    transforms = {}
    for s in ("h0", "h2"):
        unmerge = np.concatenate([np.eye(n), np.eye(n)[np.argsort(perm[s])].T]).astype(np.float32)
        transforms[s] = (merge_from_unmerge(unmerge), unmerge)
    sim = weight_similarity(spec, stack_models([pa, pb]), "h1", transforms)
    col = np.argsort(perm["h1"])  # B feature col[r] is A feature r
    np.testing.assert_allclose(sim[np.arange(n), n + col], 1.0, atol=1e-5)
    np.testing.assert_array_equal(solve_assignment(sim[:n, n:], maximize=True), col)
    # without the neighbours' matrices the rows are misaligned
    assert np.asarray(weight_similarity(spec, stack_models([pa, pb]), "h1", {}))[
        np.arange(n), n + col].min() < 0.99


def test_combine_similarity_end_points_are_exact():
    rng = np.random.default_rng(2)
    s_w, s_a = rng.normal(size=(2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(combine_similarity(s_w, s_a, 0.0), s_a)
    np.testing.assert_array_equal(combine_similarity(s_w, s_a, 1.0), s_w)
    np.testing.assert_allclose(combine_similarity(s_w, s_a, 0.25), 0.25 * s_w + 0.75 * s_a,
                               rtol=1e-6)
    np.testing.assert_array_equal(combine_similarity(None, s_a, 0.5), s_a)
    with pytest.raises(ValueError):
        combine_similarity(s_w, s_a, 1.5)


def test_matched_similarity_is_mean_matched_correlation_for_permutations():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 16))
    corr = np.corrcoef(x.T).astype(np.float32)
    _, unmerge = permute_match(corr, num_models=2)
    col = np.argmax(unmerge[8:], axis=0)
    assert matched_similarity(corr, unmerge) == pytest.approx(corr[np.arange(8), 8 + col].mean())
    assert matched_similarity(corr, np.eye(16)) == 0.0  # nothing matched


def _random_corr(seed, n_total, samples=40):
    x = np.random.default_rng(seed).normal(size=(samples, n_total))
    return np.corrcoef(x.T).astype(np.float32)


@pytest.mark.parametrize("num_models", [2, 3])
def test_groups_of_one_equal_the_plain_matchers(num_models):
    corr = _random_corr(4, 8 * num_models)
    for got, want in [
        (group_permute_match(corr, groups=1, num_models=num_models),
         permute_match(corr, num_models=num_models)),
        (group_zip_match(corr, groups=1, alpha=0.5, beta=1.0, num_models=num_models),
         zip_match(corr, alpha=0.5, beta=1.0, num_models=num_models)),
    ]:
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def _grouped_copy(seed, groups=4, og=3, samples=60):
    """Features of A and of B = A with whole groups and channels within groups permuted."""
    rng = np.random.default_rng(seed)
    n = groups * og
    x = rng.normal(size=(samples, n))
    group_perm = rng.permutation(groups)
    perm = np.concatenate([group_perm[j] * og + rng.permutation(og) for j in range(groups)])
    corr = np.corrcoef(np.concatenate([x, x[:, perm]], axis=1).T).astype(np.float32)
    return corr, perm, n, og


def _cross_col(unmerge, n):
    """For each merged feature r, model B's member (unmerge of a permutation-like match)."""
    return np.argmax(np.asarray(unmerge)[n:], axis=0)


def test_group_permute_recovers_a_grouped_permutation():
    corr, perm, n, og = _grouped_copy(5)
    merge, unmerge = group_permute_match(corr, groups=n // og)
    col = _cross_col(unmerge, n)
    np.testing.assert_array_equal(col, np.argsort(perm))  # B feature col[r] = A feature r
    np.testing.assert_array_equal(np.asarray(unmerge)[:n], np.eye(n))
    np.testing.assert_allclose(np.asarray(merge), np.asarray(unmerge).T / (2 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("num_models", [2, 3])
def test_group_permute_moves_groups_as_contiguous_blocks(num_models):
    groups, og = 4, 3
    n = groups * og
    corr = _random_corr(6, num_models * n)
    _, unmerge = group_permute_match(corr, groups=groups, num_models=num_models)
    for i in range(1, num_models):
        col = np.argmax(np.asarray(unmerge)[i * n:(i + 1) * n], axis=0)
        assert sorted(col) == list(range(n))
        blocks = (col // og).reshape(groups, og)  # model i's group behind each of A's groups
        assert (blocks == blocks[:, :1]).all()
        assert sorted(blocks[:, 0]) == list(range(groups))
    # an ungrouped permutation of the same scores does cross group boundaries
    free = _cross_col(permute_match(corr, num_models=num_models)[1][: 2 * n], n) // og
    assert not (free.reshape(groups, og) == free.reshape(groups, og)[:, :1]).all()


def _member_groups(unmerge, n, og):
    """Per merged column, the set of (model, group) its members come from."""
    u = np.asarray(unmerge)
    return [{(k // n, (k % n) // og) for k in np.flatnonzero(u[:, c])} for c in range(u.shape[1])]


def _respects_a_group_pairing(members):
    """True if no column mixes two groups of one model and A's groups pair one-to-one with B's."""
    pairs = set()
    for s in members:
        a = {g for m, g in s if m == 0}
        b = {g for m, g in s if m == 1}
        if len(a) > 1 or len(b) > 1:
            return False
        pairs |= {(x, y) for x in a for y in b}
    return (len({x for x, _ in pairs}) == len(pairs)
            and len({y for _, y in pairs}) == len(pairs))


@pytest.mark.parametrize("alpha, beta", [(0.5, 1.0), (0.1, 0.2)])
def test_group_zip_keeps_each_merged_group_contiguous(alpha, beta):
    groups, og = 4, 3
    n = groups * og
    corr = _random_corr(7, 2 * n)
    merge, unmerge = group_zip_match(corr, groups=groups, alpha=alpha, beta=beta)
    u = np.asarray(unmerge)
    assert u.shape == (2 * n, n) and merge.shape == (n, 2 * n)
    np.testing.assert_array_equal(u.sum(axis=1), 1)  # every feature in exactly one column
    members = _member_groups(u, n, og)
    assert _respects_a_group_pairing(members)
    for j in range(groups):  # merged group j is the block j*og:(j+1)*og, around A's group j
        block = set().union(*members[j * og:(j + 1) * og])
        assert {g for m, g in block if m == 0} == {j}
        assert len({g for m, g in block if m == 1}) == 1
    # plain zip on the same matrix does mix groups
    assert not _respects_a_group_pairing(
        _member_groups(zip_match(corr, alpha=alpha, beta=beta)[1], n, og))


def test_group_zip_recovers_a_grouped_copy():
    corr, perm, n, og = _grouped_copy(8)
    _, unmerge = group_zip_match(corr, groups=n // og, alpha=0.5, beta=1.0)
    u = np.asarray(unmerge)
    # every merged feature is a cross pair (A feature r, its copy in B), columns in A's order
    np.testing.assert_array_equal(u[:n], np.eye(n))
    np.testing.assert_array_equal(_cross_col(u, n), np.argsort(perm))


def test_bad_group_counts_are_rejected():
    corr = _random_corr(9, 12)
    with pytest.raises(ValueError, match="divisor"):
        group_permute_match(corr, groups=4)
    with pytest.raises(ValueError, match="divisor"):
        group_zip_match(corr, groups=5)
