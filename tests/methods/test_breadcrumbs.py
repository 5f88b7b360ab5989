"""Model Breadcrumbs: paper (per-row) and mergekit (per-tensor) masks, gamma=0 pitfall."""

import jax
import numpy as np
import pytest

from mergejax import methods
from mergejax.methods.breadcrumbs import breadcrumbs, breadcrumbs_mask
from mergejax.methods.ties import trim_topk


def np_rows(x, density, gamma):
    """rezazzr/breadcrumbs TaskVectorMiddleKeep (remove_first) with argsort, no ties."""
    x = np.asarray(x)
    if x.ndim == 0:
        return x
    n = x.shape[-1]
    n_rm, n_keep = int(n * gamma), int(n * density)
    rows = x.reshape(-1, n)
    out = np.zeros_like(rows)
    for r, row in enumerate(rows):
        order = np.argsort(-np.abs(row))  # descending |x|
        kept = order[n_rm:n_rm + n_keep]
        out[r, kept] = row[kept]
    return out.reshape(x.shape)


def np_tensor(x, density, gamma):
    """mergekit magnitude_outliers, with the n_top = 0 slice done right."""
    x = np.asarray(x)
    if density >= 1:
        return x
    n = x.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = np.argsort(np.abs(x).ravel())  # ascending
    mask = np.zeros(n, bool)
    mask[order[n_bot:n - n_top]] = True
    return np.where(mask.reshape(x.shape), x, 0)


def _tau(seed=0):
    rng = np.random.default_rng(seed)
    return {"k": rng.standard_normal((7, 200)).astype(np.float32),
            "v": rng.standard_normal(90).astype(np.float32),
            "s": np.float32(rng.standard_normal())}


@pytest.mark.parametrize("density,gamma", [(0.1, 0.01), (0.3, 0.05), (0.95, 0.1), (0.5, 0.0)])
def test_row_scope_matches_official_algorithm(density, gamma):
    tau = _tau()
    (out,) = breadcrumbs_mask([tau], density=density, gamma=gamma, scope="row")
    for k in tau:
        np.testing.assert_array_equal(out[k], np_rows(tau[k], density, gamma))


@pytest.mark.parametrize("density,gamma", [(0.1, 0.01), (0.3, 0.05), (0.95, 0.1), (0.5, 0.0)])
def test_tensor_scope_matches_mergekit(density, gamma):
    tau = _tau(1)
    tau["big"] = np.random.default_rng(2).standard_normal(20_000).astype(np.float32)  # radix
    (out,) = breadcrumbs_mask([tau], density=density, gamma=gamma, scope="tensor")
    for k in tau:
        np.testing.assert_array_equal(out[k], np_tensor(tau[k], density, gamma))


def test_gamma_zero_is_plain_magnitude_trim_not_zeros():
    # mergekit's `indices[n_bot:-n_top]` is empty when n_top = 0 and would zero the tensor.
    tau = _tau(3)
    (out,) = breadcrumbs_mask([tau], density=0.2, gamma=0.0, scope="tensor")
    x = tau["k"]
    keep = int(0.2 * x.size)
    assert np.count_nonzero(out["k"]) == keep
    top = np.sort(np.abs(x).ravel())[-keep:]
    np.testing.assert_array_equal(np.sort(np.abs(out["k"][out["k"] != 0])), top)
    # Same kept set as the TIES trim on this tie-free data, up to tall_masks' one extra entry.
    (ties_trim,) = trim_topk([{"k": x}], 0.2, scope="tensor")
    assert np.count_nonzero(ties_trim["k"]) == keep + 1
    assert np.all((out["k"] != 0) <= (ties_trim["k"] != 0))


def test_density_one_is_identity():
    tau = _tau(4)
    (t_out,) = breadcrumbs_mask([tau], density=1.0, gamma=0.3, scope="tensor")
    (r_out,) = breadcrumbs_mask([tau], density=1.0, gamma=0.0, scope="row")
    for k in tau:
        np.testing.assert_array_equal(t_out[k], tau[k])
        np.testing.assert_array_equal(r_out[k], tau[k])


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_top_gamma_outliers_are_never_kept(scope):
    x = _tau(5)["k"]
    (out,) = breadcrumbs_mask([{"k": x}], density=0.3, gamma=0.05, scope=scope)
    kept = out["k"] != 0
    if scope == "tensor":
        top = np.abs(x) >= np.sort(np.abs(x).ravel())[-int(0.05 * x.size)]
    else:
        n_rm = int(0.05 * x.shape[-1])
        top = np.abs(x) >= np.sort(np.abs(x), axis=-1)[:, -n_rm][:, None]
    assert top.any() and not (kept & top).any()


def test_method_is_task_arithmetic_on_masked_vectors_and_order_invariant():
    rng = np.random.default_rng(6)
    base = _tau(7)
    fts = [jax.tree.map(lambda x: (x + rng.standard_normal(np.shape(x))).astype(np.float32),
                        base) for _ in range(3)]
    taus = [jax.tree.map(lambda f, b: f - b, f, base) for f in fts]
    masked = breadcrumbs_mask(taus, density=0.2, gamma=0.02)
    out = breadcrumbs(base, fts, lam=0.6, density=0.2, gamma=0.02)
    for k in base:
        expect = base[k] + np.float32(0.6) * (masked[0][k] + masked[1][k] + masked[2][k])
        np.testing.assert_allclose(out[k], expect, rtol=0, atol=1e-6)
        np.testing.assert_allclose(
            breadcrumbs(base, fts[::-1], lam=0.6, density=0.2, gamma=0.02)[k], out[k],
            rtol=0, atol=1e-6)
    ties_like = breadcrumbs(base, fts, lam=0.6, density=0.2, gamma=0.02, merge="ties")
    assert not np.allclose(ties_like["k"], out["k"])


def test_bad_inputs():
    tau = _tau()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        breadcrumbs_mask([tau], density=0.0)
    for g in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
            breadcrumbs_mask([tau], gamma=g)
    with pytest.raises(ValueError, match="scope"):
        breadcrumbs_mask([tau], scope="global")
    with pytest.raises(ValueError, match="merge"):
        breadcrumbs(tau, [tau], merge="dare")


def test_registered():
    m = methods.get("breadcrumbs")
    assert m.hparams == {"lam": 1.0, "density": 0.1, "gamma": 0.01, "scope": "row",
                         "merge": "task_arithmetic", "weights": None, "disjoint": "mean",
                         "zero_sign": "majority"}
    assert "lam" in m.search
