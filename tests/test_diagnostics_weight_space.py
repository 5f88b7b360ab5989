"""Weight-space diagnostics against numpy oracles and known answers, and a `:quick` run's files."""

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from helpers import json_numbers

from mergejax import experiment
from mergejax.config_lib import load_config_file
from mergejax.diagnostics import weight_space, write_sections
from mergejax.diagnostics.sweeps import profile, sweep_section, swept_names
from mergejax.diagnostics.weight_space import (
    cosine_matrix,
    layer_of,
    sign_conflicts,
    tall_shares,
    task_vector_section,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"Dense_0": {"kernel": (4, 3), "bias": (3,)}, "Dense_1": {"kernel": (3, 2)}}
LAYERS = ["Dense_0", "Dense_1"]


def _tree(rng, scale=1.0):
    return {m: {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in d.items()}
            for m, d in SHAPES.items()}


def _add(base, tau):
    return {m: {k: base[m][k] + tau[m][k] for k in d} for m, d in base.items()}


def _leaves(tree):
    """(path, array) in jax.tree flatten order (sorted keys)."""
    return [(f"{m}/{k}", tree[m][k]) for m in sorted(tree) for k in sorted(tree[m])]


def _flat(tree):
    return np.concatenate([a.ravel() for _, a in _leaves(tree)])


def _setup(num_tasks=3, seed=0):
    rng = np.random.default_rng(seed)
    base = _tree(rng)
    taus = [_tree(rng, 0.1) for _ in range(num_tasks)]
    return base, taus, [_add(base, t) for t in taus]


def test_layer_is_the_parent_module():
    assert layer_of("Dense_0/kernel") == "Dense_0"
    assert layer_of("block/conv/kernel") == "block/conv"
    assert layer_of("scale") == "scale"


def test_cosine_matrix_matches_numpy():
    base, _, ft = _setup(3)
    vecs = np.stack([_flat(f).astype(np.float64) - _flat(base) for f in ft])
    norms = np.linalg.norm(vecs, axis=1)
    expected = vecs @ vecs.T / np.outer(norms, norms)
    got = cosine_matrix(base, ft)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-6)


def test_cosine_of_a_zero_task_vector_is_zero():
    base, _, ft = _setup(2)
    got = cosine_matrix(base, [ft[0], base])
    np.testing.assert_allclose(got, [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_identical_task_vectors_never_conflict(density):
    base, taus, ft = _setup(1)
    c = sign_conflicts(base, [ft[0], ft[0]], density=density)
    assert c.layers == LAYERS
    assert c.counts["shared"].sum() > 0  # something was compared
    assert c.total["conflict"] == 0.0 and not c.counts["conflict"].any()


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_a_task_vector_and_its_negation_always_conflict(density):
    base, taus, _ = _setup(1)
    neg = {m: {k: -v for k, v in d.items()} for m, d in taus[0].items()}
    c = sign_conflicts(base, [_add(base, taus[0]), _add(base, neg)], density=density)
    assert c.total["conflict"] == 1.0
    shared = c.counts["shared"] > 0
    assert shared.any()
    np.testing.assert_array_equal(c.rates["conflict"][shared], 1.0)
    np.testing.assert_array_equal(c.counts["conflict"], c.counts["shared"])


def _numpy_conflicts(base, ft, density):
    """Direct count: per task keep |tau| >= its (d - int(d*density))-th smallest |tau|."""
    taus = [_flat(f) - _flat(base) for f in ft]  # float32, as the kernels form them
    d = taus[0].size
    kept = []
    for t in taus:
        kth = d - int(d * density)
        thr = np.sort(np.abs(t))[kth - 1] if kth > 0 else 0.0
        kept.append((np.abs(t) >= thr) & (t != 0))
    kept, taus = np.stack(kept), np.stack(taus)
    n_kept = kept.sum(0)
    n_pos = (kept & (taus > 0)).sum(0)
    shared = n_kept >= 2
    conflict = shared & (n_pos > 0) & (n_pos < n_kept)
    sizes = [a.size for _, a in _leaves(base)]
    layer = np.repeat([LAYERS.index(layer_of(p)) for p, _ in _leaves(base)], sizes)
    return (np.bincount(layer, shared, len(LAYERS)).astype(int),
            np.bincount(layer, conflict, len(LAYERS)).astype(int))


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_sign_conflicts_match_a_direct_count(density):
    base, _, ft = _setup(3, seed=1)
    shared, conflict = _numpy_conflicts(base, ft, density)
    c = sign_conflicts(base, ft, density=density)
    np.testing.assert_array_equal(c.counts["shared"], shared)
    np.testing.assert_array_equal(c.counts["conflict"], conflict)
    assert 0 < c.total["conflict"] < 1  # random signs: some agree, some do not
    np.testing.assert_array_equal(c.size, [15, 6])


def _numpy_tall(base, ft, lams):
    """Direct count of TALL masks: |theta_0 - theta_t| > |theta_0 + tau_MTL - theta_t| * lam_t
    with tau_MTL = sum of the task vectors."""
    b = _flat(base)
    fs = [_flat(f) for f in ft]
    mtv = sum(f - b for f in fs)
    n = sum((np.abs(b - f) > np.abs(b + mtv - f) * np.float32(lam)).astype(int)
            for f, lam in zip(fs, lams))
    sizes = [a.size for _, a in _leaves(base)]
    layer = np.repeat([LAYERS.index(layer_of(p)) for p, _ in _leaves(base)], sizes)
    size = np.bincount(layer, minlength=len(LAYERS))
    return (np.bincount(layer, n == 0, len(LAYERS)) / size,
            np.bincount(layer, n == 1, len(LAYERS)) / size)


@pytest.mark.parametrize("lams", [(0.6, 0.6, 0.6), (0.2, 0.5, 1.5)])
def test_tall_shares_match_a_direct_count(lams):
    base, _, ft = _setup(3, seed=2)
    cat, selfish = _numpy_tall(base, ft, lams)
    s = tall_shares(base, ft, lam=list(lams))
    np.testing.assert_array_equal(s.rates["catastrophic"], cat)
    np.testing.assert_array_equal(s.rates["selfish"], selfish)
    assert 0 < s.total["catastrophic"] + s.total["selfish"] < 1


def test_leaves_cut_into_several_chunks_give_the_same_counts(monkeypatch):
    # chunks of 5 entries: the (4, 3) kernel spans 3 chunks, the last one padded
    base, _, ft = _setup(3, seed=5)
    lams = (0.3, 0.6, 0.9)
    shared, conflict = _numpy_conflicts(base, ft, 0.4)
    cat, selfish = _numpy_tall(base, ft, lams)
    whole = weight_space.task_vector_stats(base, ft, density=0.4, mask_lam=list(lams))
    monkeypatch.setattr(weight_space, "CHUNK", 5)
    cut = weight_space.task_vector_stats(base, ft, density=0.4, mask_lam=list(lams))
    for stats in (whole, cut):
        np.testing.assert_array_equal(stats.conflicts.counts["shared"], shared)
        np.testing.assert_array_equal(stats.conflicts.counts["conflict"], conflict)
        np.testing.assert_array_equal(stats.shares.rates["catastrophic"], cat)
        np.testing.assert_array_equal(stats.shares.rates["selfish"], selfish)
    np.testing.assert_allclose(cut.cosine, whole.cosine, atol=1e-6)


def test_tall_shares_of_disjoint_task_vectors_are_known():
    # task 0 moves only Dense_0/kernel, task 1 only Dense_1/kernel, nobody the biases: every
    # moved weight is selfish (its task's mask alone keeps it), every bias catastrophic
    rng = np.random.default_rng(3)
    base = _tree(rng)
    zero = {m: {k: np.zeros(s, np.float32) for k, s in d.items()} for m, d in SHAPES.items()}
    t0 = {**zero, "Dense_0": {**zero["Dense_0"], "kernel": np.full((4, 3), 0.5, np.float32)}}
    t1 = {**zero, "Dense_1": {"kernel": np.full((3, 2), -0.25, np.float32)}}
    s = tall_shares(base, [_add(base, t0), _add(base, t1)], lam=0.6)
    np.testing.assert_allclose(s.rates["selfish"], [12 / 15, 1.0])
    np.testing.assert_allclose(s.rates["catastrophic"], [3 / 15, 0.0])
    np.testing.assert_array_equal(s.counts["selfish"], [12, 6])


def test_sweep_profile_is_the_best_over_the_other_hyperparameters():
    cands = [({"p": p, "lam": lam, "fixed": 1},
              {"task_avg_acc": p * lam, "joint_acc": 0.5, "per_task_acc": {"task_a": lam}})
             for p in (0.1, 0.5) for lam in (1.0, 2.0, 3.0)]
    assert swept_names(cands) == ["p", "lam"]
    prof = profile(cands, "lam")
    assert prof["values"] == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(prof["task_avg_acc"], [0.5, 1.0, 1.5])
    assert prof["per_task_acc"] == {"task_a": [1.0, 2.0, 3.0]}
    np.testing.assert_allclose(profile(cands, "p")["task_avg_acc"], [0.3, 1.5])
    assert sweep_section({"one": cands[:1]}) is None  # nothing searched: nothing to draw


def test_sections_write_decodable_pngs_of_their_size_and_finitejson_numbers(tmp_path):
    base, _, ft = _setup(3, seed=4)
    names = ["task_a", "task_b", "task_c"]
    tv_section = task_vector_section(base, ft, names, density=0.3, mask_lam=[0.4, 0.5, 0.6])
    cands = [({"lam": lam}, {"task_avg_acc": 0.5 + lam / 10, "joint_acc": 0.4,
                             "per_task_acc": {"task_a": 0.6, "task_b": float("nan")}})
             for lam in (0.2, 0.4, 0.6)]
    sw_section = sweep_section({"ties": cands, "tall_masks+reset": cands},
                               {"tall_masks+reset": True})
    sizes = {stem: tuple(int(round(v)) for v in fig.get_size_inches()[::-1] * fig.dpi)
             for s in (tv_section, sw_section) for stem, fig in s.figures.items()}
    paths = write_sections(tmp_path, [tv_section, sw_section])
    assert {p.stem for p in paths} == {"task_vector_cosine", "ties_sign_conflicts",
                                       "tall_mask_shares", "sweep_ties",
                                       "sweep_tall_masks+reset"}
    for p in paths:
        assert matplotlib.image.imread(p).shape[:2] == sizes[p.stem], p.name
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    assert data["task_vectors"]["tall"]["lam"] == [0.4, 0.5, 0.6]
    assert data["sweeps"]["ties"]["profiles"]["lam"]["values"] == [0.2, 0.4, 0.6]
    nums = json_numbers(data)
    assert len(nums) > 50 and all(math.isfinite(n) for n in nums)


def test_run_sections_follow_config_diagnostics(tmp_path):
    config = load_config_file(ROOT / "configs" / "digits_finetune_mlp.py", "quick")
    base, _, ft = _setup(2, seed=6)
    sweeps = {"ties": [({"lam": 1.0}, {"task_avg_acc": 0.5}), ({"lam": 2.0},
                                                               {"task_avg_acc": 0.7})]}
    with config.unlocked():
        config.diagnostics.enabled = False
    assert weight_space.write_run_sections(config, tmp_path, base, ft, [], sweeps) == []
    assert list(tmp_path.iterdir()) == []
    with config.unlocked():
        config.diagnostics.enabled = True
        config.diagnostics.sweeps = False
        config.merge.tall_masks.lam = 0.4  # no tall_masks row: the config's lambda
        config.merge.ties.density = 0.5
    paths = weight_space.write_run_sections(config, tmp_path, base, ft, [], sweeps)
    assert sorted(p.name for p in paths) == ["tall_mask_shares.png", "task_vector_cosine.png",
                                             "ties_sign_conflicts.png"]
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    assert list(data) == ["task_vectors"]
    assert data["task_vectors"]["tall"]["lam"] == [0.4, 0.4]
    assert data["task_vectors"]["ties"]["density"] == 0.5


@pytest.mark.slow
def test_quick_finetune_run_writes_report_diagnostics_and_plots(tmp_path, capsys):
    config = load_config_file(ROOT / "configs" / "digits_finetune_mlp.py", "tasks=2,quick")
    with config.unlocked():
        config.merge.methods = ("ties", "tall_masks")
        config.merge_search.ties = ()  # one candidate: listed, not drawn
    rows = experiment.run(config, tmp_path)
    assert [r["method"] for r in rows] == ["base", "finetuned", "ties", "tall_masks"]
    assert not any(r.get("error") for r in rows)
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(data) == {"task_vectors", "sweeps"}
    tall_row = rows[3]["hparams"]["per_task"]
    assert data["task_vectors"]["tall"]["lam"] == [hp["lam"] for hp in tall_row]
    assert data["task_vectors"]["ties"]["layers"] == ["dense_0", "dense_1"]  # the backbone
    assert set(data["sweeps"]) == {"ties", "tall_masks"}
    assert data["sweeps"]["ties"]["hparams"] == []
    assert data["sweeps"]["tall_masks"]["hparams"] == ["lam"]
    assert all(math.isfinite(n) for n in json_numbers(data))
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["sweep_tall_masks.png", "tall_mask_shares.png", "task_vector_cosine.png",
                    "ties_sign_conflicts.png"]
    for name in pngs:
        assert min(matplotlib.image.imread(tmp_path / "plots" / name).shape[:2]) > 100
    report = (tmp_path / "report.md").read_text()
    assert "| ties |" in report
    for name in pngs:
        assert f"(plots/{name})" in report
    assert str(tmp_path / "report.md") in capsys.readouterr().out
