"""Match quality against direct numpy computations, the matching sections and their pictures,
and a `:quick` two-model run writing them (mergejax.diagnostics.match_quality / matching)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import experiment, merging, models, specs
from mergejax.config_lib import load_config_file
from mergejax.diagnostics import match_quality as mq
from mergejax.diagnostics import matching
from mergejax.diagnostics.report import write_sections
from mergejax.kernels.dual_space import matched_similarity
from mergejax.kernels.statistics import Moments
from mergejax.kernels.zip_match import zip_match
from mergejax.statistics import StatisticsCache

ROOT = Path(__file__).resolve().parents[1]
TASKS = [(0, 1, 2), (3, 4, 5)]


def _moments(f):
    """Moments of features f (rows, d) in numpy: biased covariance, as the kernels'."""
    f = np.asarray(f, np.float64)
    cov = np.cov(f, rowvar=False, bias=True)
    sd = np.sqrt(np.diagonal(cov))
    with np.errstate(invalid="ignore"):  # constant features: NaN, zeroed by the caller
        return Moments(f.mean(0), cov, cov / np.outer(sd, sd))


def _cluster_transforms(clusters, total):
    """(merge, unmerge) averaging each cluster (a list of feature indices) into one feature."""
    unmerge = np.zeros((total, len(clusters)), np.float32)
    for c, members in enumerate(clusters):
        unmerge[members, c] = 1.0
    return unmerge.T / unmerge.sum(0)[:, None], unmerge


def test_match_quality_against_direct_computation():
    rng = np.random.default_rng(0)
    n = 3
    f = rng.normal(size=(500, 2 * n))
    f[:, 4] = 0.8 * f[:, 0] + 0.2 * rng.normal(size=500)  # B1 follows A0
    # clusters: {A0, A1} within A, {A2, B0} across, {B1, B2} within B
    clusters = [[0, 1], [2, 3], [4, 5]]
    merge, unmerge = _cluster_transforms(clusters, 2 * n)
    got = mq.space_quality(_moments(f), merge, unmerge, 2)
    corr = np.corrcoef(f, rowvar=False)
    assert got["matched_corr"] == pytest.approx(np.mean([corr[i, j] for i, j in clusters]))
    assert got["within_model_share"] == pytest.approx(2 / 3)
    # merged stand-in of every feature, computed on the data itself
    merged = f @ merge.T  # (rows, n_out)
    stand_in = merged @ unmerge.T  # feature k's merged feature
    per_feature = [np.corrcoef(f[:, k], stand_in[:, k])[0, 1] for k in range(2 * n)]
    np.testing.assert_allclose(got["merged_to_endpoint"],
                               [np.mean(per_feature[:n]), np.mean(per_feature[n:])], rtol=1e-6)
    # a permutation: never within a model; a feature matched with itself keeps correlation 1
    perm_merge, perm_unmerge = _cluster_transforms([[0, 5], [1, 3], [2, 4]], 2 * n)
    f2 = f.copy()
    f2[:, 3:] = f[:, [1, 2, 0]]  # B is A permuted: B0 = A1, B1 = A2, B2 = A0
    got = mq.space_quality(_moments(f2), perm_merge, perm_unmerge, 2)
    assert got["within_model_share"] == 0.0
    assert got["matched_corr"] == pytest.approx(1.0)
    np.testing.assert_allclose(got["merged_to_endpoint"], [1.0, 1.0], rtol=1e-9)
    # the matmul form of the matched correlation is MuDSC's score, on a real zip with clusters
    # of every size
    zip_merge, zip_unmerge = zip_match(corr.astype(np.float32), alpha=0.0, beta=1.0)
    assert mq.matched_corr(corr, zip_unmerge) == pytest.approx(
        matched_similarity(corr, np.asarray(zip_unmerge)), abs=1e-12)


def test_constant_features_are_skipped_not_nan():
    f = np.random.default_rng(1).normal(size=(50, 4))
    f[:, 1] = 2.0  # a dead unit of model A
    merge, unmerge = _cluster_transforms([[0, 2], [1, 3]], 4)
    m = _moments(f)
    m = Moments(m.mean, m.cov, np.nan_to_num(m.corr))
    got = mq.space_quality(m, merge, unmerge, 2)
    assert all(np.isfinite(v) for v in [got["matched_corr"], *got["merged_to_endpoint"]])


def _two_mlps():
    model = models.create("mlp", hidden=(16, 12), num_classes=3)
    vs = [jax.tree.map(np.asarray, model.init(jax.random.key(i), jnp.zeros((1, 8, 8, 1))))
          for i in range(2)]
    return model, specs.for_model(model), vs


def test_matching_sections_numbers_and_pictures(tmp_path):
    model, spec, endpoints = _two_mlps()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 6, len(x))
    cache = StatisticsCache(model, spec, endpoints, lambda: [x])
    aligned = {m: merging.match(m, spec, endpoints, cache, spaces=spec.space_names,
                                key=jax.random.key(0)) for m in ("permute", "zipit")}
    aligned["zipit_partial"] = {k: v for k, v in aligned["zipit"].items()
                                if k == spec.space_names[0]}  # partial: no line
    stats = cache.get(spec.space_names)
    sections = matching.matching_sections(
        model, spec, endpoints, TASKS, aligned, x, y, statistics=stats,
        settings={"points": 4, "curve_methods": ("naive", "permute", "zipit", "mudsc")})
    by_name = {s.name: s for s in sections}
    assert set(by_name) == {"interpolation", "match_quality"}
    curves = by_name["interpolation"].numbers
    assert curves["t"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert list(curves["methods"]) == ["naive", "permute", "zipit"]  # mudsc was not run
    assert set(curves["methods"]["zipit"]["per_task_acc"]) == {"task_a", "task_b"}
    quality = by_name["match_quality"].numbers["methods"]
    assert set(quality) == {"naive", "permute", "zipit", "zipit_partial"}
    assert list(quality["zipit_partial"]["spaces"]) == [spec.space_names[0]]
    assert quality["permute"]["mean"]["within_model_share"] == 0.0
    # naive pairs feature j with feature j: its matched correlation is the diagonal's mean
    corr = np.asarray(stats["hidden0"].corr)
    assert quality["naive"]["spaces"]["hidden0"]["matched_corr"] == pytest.approx(
        np.mean(np.diagonal(corr[:16, 16:])), abs=1e-6)
    # permute maximises the matched correlation over all permutations, naive included
    for space in spec.space_names:
        assert (quality["permute"]["spaces"][space]["matched_corr"]
                >= quality["naive"]["spaces"][space]["matched_corr"] - 1e-6)
    paths = write_sections(tmp_path, sections)
    assert sorted(p.name for p in paths) == ["interpolation_accuracy.png",
                                             "interpolation_loss.png", "match_quality.png"]
    import matplotlib.image

    for p in paths:
        image = matplotlib.image.imread(p)
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 800, p.name
    numbers = json.loads((tmp_path / "diagnostics.json").read_text())
    leaves = [v for v in jax.tree.leaves(numbers) if not isinstance(v, str)]
    assert leaves and all(np.isfinite(v) for v in leaves)


def test_sections_off_and_many_models():
    model, spec, endpoints = _two_mlps()
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
    y = np.zeros(16, int)
    assert matching.matching_sections(model, spec, endpoints, TASKS, {}, x, y, settings={
        "curves": False, "match_quality": False}) == []
    # three models: no line, but match quality (naive) still
    cache = StatisticsCache(model, spec, endpoints + endpoints[:1], lambda: [x])
    sections = matching.matching_sections(
        model, spec, endpoints + endpoints[:1], [(0, 1, 2)] * 3, {}, x, y,
        statistics=cache.get(spec.space_names))
    assert [s.name for s in sections] == ["match_quality"]
    assert len(sections[0].numbers["methods"]["naive"]["mean"]["merged_to_endpoint"]) == 3


@pytest.mark.slow
def test_quick_run_writes_curves_and_match_quality(tmp_path):
    config = load_config_file(ROOT / "configs" / "digits_mlp.py", "quick")
    with config.unlocked():
        config.diagnostics.points = 5
        config.merge.methods = ("permute", "zipit+repair")
    rows = experiment.run(config, tmp_path)
    assert [r["method"] for r in rows][3:] == list(config.merge.methods)
    numbers = json.loads((tmp_path / "diagnostics.json").read_text())
    curves = numbers["interpolation"]["methods"]
    assert list(curves) == ["naive", "permute", "zipit"]  # the run's full matchings
    assert len(curves["zipit"]["joint_loss"]) == 5
    assert numbers["match_quality"]["methods"]["permute"]["mean"]["within_model_share"] == 0.0
    for stem in ("interpolation_loss", "interpolation_accuracy", "match_quality"):
        assert (tmp_path / "plots" / f"{stem}.png").stat().st_size > 1000
    leaves = [v for v in jax.tree.leaves(numbers) if not isinstance(v, str)]
    assert all(np.isfinite(v) for v in leaves)
    # per-task ends: task a at t = 0 scores like model A alone on task a
    model_a = rows[0]["per_task_acc"]["task_a"]
    assert curves["naive"]["per_task_acc"]["task_a"][0] == pytest.approx(model_a)
    # t = 1/2 is the method's own merge (permute without repair: the run's row)
    assert curves["permute"]["joint_acc"][2] == pytest.approx(rows[3]["joint_acc"])
    assert curves["permute"]["per_task_acc"]["task_b"][2] == pytest.approx(
        rows[3]["per_task_acc"]["task_b"])
    if (tmp_path / "report.md").exists():  # the run's report shows the pictures
        assert "plots/interpolation_loss.png" in (tmp_path / "report.md").read_text()
