"""TALL masks: golden parity with tall_masks, reconstruction properties, 1-bit storage."""


import jax
import numpy as np
import pytest
from helpers import flat

from mergejax import methods
from mergejax.methods import task_vectors as tv
from mergejax.methods.tall_masks import (
    multitask_vector,
    packed_task_masks,
    reconstruct,
    tall_masks,
    task_masks,
)

LAMBDAS = ("0.2", "0.4", "0.6", "1.0")


@pytest.mark.parametrize("merged", ["sum", "ties20"])
def test_multitask_vector_matches_golden(golden, merged):
    taus = [{"w": r} for r in golden["task_vectors"]]
    got = multitask_vector(None, taus, merged="sum" if merged == "sum" else "ties", density=0.2)
    np.testing.assert_array_equal(flat(got), golden[f"tall/{merged}/merged_tv"])


@pytest.mark.parametrize("merged", ["sum", "ties20"])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_masks_match_golden(golden, merged, lam):
    base = {"w": golden["ptm"]}
    fts = [{"w": r} for r in golden["finetuned"]]
    masks = task_masks(base, fts, {"w": golden[f"tall/{merged}/merged_tv"]}, lam=float(lam))
    np.testing.assert_array_equal(np.stack([flat(m) for m in masks]),
                                  golden[f"tall/{merged}/lambda{lam}"])
    # Split into two leaves: same masks (the rule is elementwise).
    cut = 777
    split = lambda x: {"a": x[:cut], "b": x[cut:]}  # noqa: E731
    masks2 = task_masks(split(golden["ptm"]), [split(r) for r in golden["finetuned"]],
                        split(golden[f"tall/{merged}/merged_tv"]), lam=float(lam))
    np.testing.assert_array_equal(np.stack([flat(m) for m in masks2]),
                                  golden[f"tall/{merged}/lambda{lam}"])


def _dyadic_models(supports, seed=0):
    """Base and task vectors on a 1/64 grid, so every sum/difference is exact in float32."""
    rng = np.random.default_rng(seed)
    shape = supports[0].shape
    base = (rng.integers(-64, 64, shape) / 64).astype(np.float32)
    taus = [np.where(s, rng.integers(1, 32, shape) * rng.choice([-1, 1], shape) / 64, 0)
            .astype(np.float32) for s in supports]
    return ({"w": base}, [{"w": base + t} for t in taus], taus)


def test_one_task_reconstructs_the_finetuned_model_exactly():
    support = np.random.default_rng(1).random(300) < 0.7
    base, fts, taus = _dyadic_models([support])
    (mask,) = task_masks(base, fts, multitask_vector(base, fts), lam=0.6)
    np.testing.assert_array_equal(mask["w"], taus[0] != 0)  # strict: tau = 0 never selected
    (rec,) = tall_masks(base, fts, lam=0.6)
    np.testing.assert_array_equal(rec["w"], fts[0]["w"])


def test_disjoint_supports_reconstruct_every_task_exactly():
    owner = np.random.default_rng(2).integers(0, 4, 400)  # 3 tasks + unused coordinates
    supports = [owner == t for t in range(3)]
    base, fts, taus = _dyadic_models(supports, seed=3)
    masks = task_masks(base, fts, multitask_vector(base, fts), lam=0.4)
    recs = tall_masks(base, fts, lam=0.4)
    assert isinstance(recs, list) and len(recs) == 3
    for t in range(3):
        np.testing.assert_array_equal(masks[t]["w"], supports[t])
        np.testing.assert_array_equal(recs[t]["w"], fts[t]["w"])


def test_reconstruction_is_base_plus_masked_multitask_vector():
    rng = np.random.default_rng(4)
    base = {"a": rng.standard_normal((20, 10)).astype(np.float32),
            "b": rng.standard_normal(13).astype(np.float32)}
    fts = [jax.tree.map(lambda x: (x + rng.standard_normal(x.shape)).astype(np.float32), base)
           for _ in range(3)]
    for merged in ("sum", "ties"):
        mtv = multitask_vector(base, fts, merged=merged)
        masks = task_masks(base, fts, mtv, lam=0.3)
        recs = tall_masks(base, fts, lam=0.3, merged=merged)
        for t in range(3):
            for k in base:
                expect = np.where(masks[t][k], base[k] + np.asarray(mtv[k]), base[k])
                np.testing.assert_array_equal(recs[t][k], expect)
                np.testing.assert_array_equal(reconstruct(base, mtv, masks[t])[k], expect)
    # Per-task lambdas equal separate scalar calls; the list follows the input order.
    per = tall_masks(base, fts, lam=[0.2, 0.5, 0.6])
    for t, lam in enumerate([0.2, 0.5, 0.6]):
        for k in base:
            np.testing.assert_array_equal(per[t][k], tall_masks(base, fts, lam=lam)[t][k])
    perm = tall_masks(base, fts[::-1], lam=0.3)
    ref = tall_masks(base, fts, lam=0.3)
    for t in range(3):
        for k in base:
            np.testing.assert_allclose(perm[t][k], ref[2 - t][k], rtol=0, atol=1e-5)


def test_packbits_round_trip_is_lossless_and_one_bit_per_weight():
    rng = np.random.default_rng(5)
    base = {"a": rng.standard_normal((9, 7)).astype(np.float32),
            "b": {"c": rng.standard_normal(13).astype(np.float32)}}
    fts = [jax.tree.map(lambda x: (x + rng.standard_normal(x.shape)).astype(np.float32), base)
           for _ in range(3)]
    d = 9 * 7 + 13
    packed, mtv = packed_task_masks(base, fts, lam=0.4)
    assert packed.dtype == np.uint8 and packed.shape == (3, (d + 7) // 8)
    masks = task_masks(base, fts, mtv, lam=0.4)
    unpacked = tv.unpack_masks(packed, base)
    recs = tall_masks(base, fts, lam=0.4)
    for t in range(3):
        for x, y in zip(jax.tree.leaves(unpacked[t]), jax.tree.leaves(masks[t])):
            assert x.dtype == bool
            np.testing.assert_array_equal(x, y)
        for x, y in zip(jax.tree.leaves(reconstruct(base, mtv, unpacked[t])),
                        jax.tree.leaves(recs[t])):
            np.testing.assert_array_equal(x, y)
    # Random masks survive the round trip too.
    rand = [jax.tree.map(lambda x: rng.random(x.shape) < 0.5, base) for _ in range(2)]
    back = tv.unpack_masks(tv.pack_masks(rand), base)
    for r, b in zip(rand, back):
        for x, y in zip(jax.tree.leaves(r), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="shape"):
        tv.unpack_masks(packed[:, :-1], base)


def test_bad_inputs():
    base = {"w": np.zeros(4, np.float32)}
    fts = [{"w": np.ones(4, np.float32)}, {"w": -np.ones(4, np.float32)}]
    with pytest.raises(ValueError, match=r"lam must be in \[0, inf\)"):
        tall_masks(base, fts, lam=-0.1)
    with pytest.raises(ValueError, match="one value per model"):
        tall_masks(base, fts, lam=[0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="merged"):
        tall_masks(base, fts, merged="mean")
    with pytest.raises(ValueError, match="'w'.*shape"):
        task_masks(base, fts, {"w": np.zeros(3, np.float32)})


def test_registered():
    m = methods.get("tall_masks")
    assert m.per_task_search
    assert m.search["lam"] == (0.2, 0.3, 0.4, 0.5, 0.6)
    assert m.hparams["merged"] == "sum"
