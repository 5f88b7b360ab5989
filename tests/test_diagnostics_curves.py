"""Interpolation curves (mergejax.diagnostics.curves): end points, flat aligned lines, the
vmapped BatchNorm reset against mergejax.repair, and the t = 1/2 merge against apply_merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import distributed, evaluation, merging, models, repair, specs
from mergejax.diagnostics import curves
from mergejax.kernels.sharding import data_mesh
from mergejax.statistics import StatisticsCache

SHARED = [(0, 1, 2), (0, 1, 2)]  # one label space: heads are interpolated too
DISJOINT = [(0, 1, 2), (3, 4, 5)]  # per-task heads on one trunk


def _mlp(seed, head_scale=1.0):
    model = models.create("mlp", hidden=(16, 12), num_classes=3)
    v = jax.tree.map(np.asarray, model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1))))
    v["params"]["linear"]["kernel"] = v["params"]["linear"]["kernel"] * head_scale
    return model, v


def _images(n=96, seed=0, shape=(8, 8, 1)):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _permuted(spec, variables, seed=0):
    """`variables` with every feature space randomly permuted (the same function)."""
    rng = np.random.default_rng(seed)
    perms = {s.name: rng.permutation(s.width) for s in spec.spaces}
    return specs.apply_merge(spec, [variables], specs.permutation_transforms(perms))[0]


def _oracle_loss(logits, labels, classes):
    """Cross-entropy (nats) of one head, in numpy float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    col = np.searchsorted(np.asarray(classes), labels)
    return float(-lp[np.arange(len(labels)), col].mean())


def test_barrier_known_values():
    ts = np.linspace(0, 1, 5)
    assert curves.barrier(ts, ts ** 2) == 0.0  # convex: below its chord
    assert curves.barrier(ts, np.array([1.0, 2.0, 3.0, 2.0, 1.0])) == pytest.approx(2.0)
    assert curves.barrier(ts, np.array([2.0, 2.5, 3.0, 3.5, 4.0])) == pytest.approx(0.0)
    acc = np.array([0.9, 0.5, 0.2, 0.6, 0.8])
    assert curves.barrier(ts, acc, higher_is_better=True) == pytest.approx(0.85 - 0.2)


def test_shared_head_ends_equal_the_endpoints():
    model, a = _mlp(0, head_scale=5.0)
    _, b = _mlp(1, head_scale=5.0)
    spec = specs.for_model(model)
    x = _images()
    y = np.random.default_rng(3).integers(0, 3, len(x))
    wm = merging.match("weight_matching", spec, [a, b], None, spaces=spec.space_names,
                       key=jax.random.key(0))
    for transforms in (None, wm):
        c = curves.interpolation_curve(model, spec, [a, b], transforms, SHARED, x, y, points=5)
        for k, v in ((0, a), (-1, b)):
            own = evaluation.evaluate(model, [(v, SHARED[0])], x, y, SHARED[:1])
            assert c.joint_acc[k] == own["joint_acc"]
            assert c.per_task_acc["task_a"][k] == own["per_task_acc"]["task_a"]
            loss = _oracle_loss(evaluation.logits(model, v, x), y, SHARED[0])
            assert c.joint_loss[k] == pytest.approx(loss, rel=1e-5, abs=1e-6)
            assert c.per_task_loss["task_a"][k] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert all(np.isfinite(c.joint_loss)) and all(np.isfinite(c.task_avg_acc))


def test_permuted_copy_is_flat_after_alignment_but_not_naive():
    model, a = _mlp(0, head_scale=8.0)
    spec = specs.for_model(model)
    b = _permuted(spec, a)
    x = _images(128)
    y = np.argmax(evaluation.logits(model, a, x), 1)  # labels the model gets right
    cache = StatisticsCache(model, spec, [a, b], lambda: [x[:64], x[64:]])
    naive = curves.interpolation_curve(model, spec, [a, b], None, SHARED, x, y, points=7)
    assert naive.barriers()["joint_loss"] > 0.05
    for method in ("permute", "weight_matching"):
        transforms = merging.match(method, spec, [a, b], cache, spaces=spec.space_names,
                                   key=jax.random.key(0))
        c = curves.interpolation_curve(model, spec, [a, b], transforms, SHARED, x, y, points=7)
        assert 0.0 <= c.barriers()["joint_loss"] <= 1e-5, method
        assert np.ptp(c.joint_loss) <= 1e-5 and np.ptp(c.joint_acc) == 0.0, method


def test_batchnorm_line_resets_every_point_like_repair():
    """ResNet-20 (BatchNorm): a permuted copy's aligned line is flat with the statistics
    recomputed at every point, and each point's statistics from the stacked reset on 8 devices
    equal repair.reset_batch_stats of that point alone on one device."""
    model = models.create("resnet20", width=1, num_classes=3)
    a = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    a["params"]["linear"]["kernel"] = a["params"]["linear"]["kernel"] * 8.0
    spec = specs.for_model(model)
    b = _permuted(spec, a, seed=1)
    x = _images(24, shape=(8, 8, 3))
    batches = [x[:16], x[16:21]]  # a ragged last batch: the estimators differ
    for estimator in repair.ESTIMATORS:
        ln = curves.line(spec, [a, b], specs.identity_transforms(spec, 2), [0.0, 0.3, 1.0],
                         SHARED)
        # 8 devices: the 5-image batch is padded to 8 rows, which masked BatchNorm ignores;
        # the oracle resets each point alone on the suite's one device.
        with distributed.use_mesh(data_mesh()):
            stacked = repair.reset_batch_stats(model, ln.tree(0), batches, estimator=estimator,
                                               stacked=True)
        for k in range(3):
            want = repair.reset_batch_stats(model, ln.point(k), batches, estimator=estimator)
            got = jax.tree.map(lambda v, k=k: v[k], stacked["batch_stats"])
            jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6),
                         got, want["batch_stats"])
    a_reset = repair.reset_batch_stats(model, a, batches)
    y = np.argmax(evaluation.logits(model, a_reset, x), 1)
    inverse = merging.match("weight_matching", spec, [a, b], None, spaces=spec.space_names,
                            key=jax.random.key(0))
    c = curves.interpolation_curve(model, spec, [a, b], inverse, SHARED, x, y, points=3,
                                   reset_batches=batches)
    # the end is model A after the same reset
    own = _oracle_loss(evaluation.logits(model, a_reset, x), y, SHARED[0])
    assert c.joint_loss[0] == pytest.approx(own, rel=1e-4, abs=1e-5)
    assert c.barriers()["joint_loss"] <= 1e-5
    naive = curves.interpolation_curve(model, spec, [a, b], None, SHARED, x, y, points=3,
                                       reset_batches=batches)
    assert naive.barriers()["joint_loss"] > 1e-3
    with pytest.raises(ValueError, match="reset_batches"):
        curves.interpolation_curve(model, spec, [a, b], None, SHARED, x, y, points=3)


def test_per_task_heads_ends_midpoint_and_fused_heads():
    """Disjoint tasks: each task's numbers at its own end are its endpoint's; the zip line's
    midpoint is exactly ZipIt!'s merged model; every point agrees with evaluation.evaluate of
    that point's heads (the fused-head fast path against the plain evaluation)."""
    model, a = _mlp(0, head_scale=3.0)
    _, b = _mlp(1, head_scale=3.0)
    spec = specs.for_model(model)
    x = _images(90)
    y = np.random.default_rng(5).integers(0, 6, len(x))
    cache = StatisticsCache(model, spec, [a, b], lambda: [x])
    zip_t = merging.match("zipit", spec, [a, b], cache, spaces=spec.space_names,
                          key=jax.random.key(0), hparams={"alpha": 0.5, "beta": 1.0})
    ln = curves.line(spec, [a, b], zip_t, np.linspace(0, 1, 5), DISJOINT)
    c = curves.evaluate_line(model, ln, x, y, DISJOINT)
    chunked = curves.evaluate_line(model, ln, x, y, DISJOINT, chunk=2, batch_size=32)
    np.testing.assert_allclose(chunked.joint_loss, c.joint_loss, rtol=1e-6)
    merged = merging.merge_endpoints(model, spec, [a, b], zip_t)
    mid = evaluation.evaluate(model, list(zip(merged, DISJOINT)), x, y, DISJOINT)
    assert c.joint_acc[2] == mid["joint_acc"] and c.task_avg_acc[2] == mid["task_avg_acc"]
    for k in range(5):
        heads = [(ln.point(k, 0), DISJOINT[0]), (ln.point(k, 1), DISJOINT[1])]
        ref = evaluation.evaluate(model, heads, x, y, DISJOINT)
        assert c.joint_acc[k] == ref["joint_acc"]
        assert c.per_task_acc["task_b"][k] == ref["per_task_acc"]["task_b"]
    # the naive line's ends: task a at t=0 is model A's own, task b at t=1 model B's own
    naive = curves.interpolation_curve(model, spec, [a, b], None, DISJOINT, x, y, points=3)
    for k, v, i, name in ((0, a, 0, "task_a"), (-1, b, 1, "task_b")):
        own = evaluation.evaluate(model, [(v, DISJOINT[i])], x, y, DISJOINT)
        assert naive.per_task_acc[name][k] == own["per_task_acc"][name]
        rows = np.isin(y, DISJOINT[i])
        loss = _oracle_loss(evaluation.logits(model, v, x[rows]), y[rows], DISJOINT[i])
        assert naive.per_task_loss[name][k] == pytest.approx(loss, rel=1e-5)
    for curve in (c, naive):
        numbers = curve.numbers()
        flat = jax.tree.leaves(numbers)
        assert flat and all(np.isfinite(v) for v in flat)


def test_line_rejects_partial_matchings():
    model, a = _mlp(0)
    spec = specs.for_model(model)
    partial = specs.identity_transforms(spec, 2, spaces=spec.space_names[:1])
    with pytest.raises(ValueError, match="missing"):
        curves.line(spec, [a, a], partial, [0.0, 1.0], SHARED)
