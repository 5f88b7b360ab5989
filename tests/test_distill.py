"""Distillation baseline: a student reproduces each task's endpoint features; the per-task maps
are folded into the heads (multi-head evaluation like FS-Merge)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import fsmerge, methods, models, specs
from mergejax.fsmerge.features import head_inputs

SHAPE = (1, 8, 8, 1)


@functools.lru_cache(maxsize=8)
def _jit_apply(model):
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def mlp():
    model = models.create("mlp", num_classes=5, hidden=(16, 12))
    init = jax.jit(model.init)
    ends = [jax.tree.map(np.asarray, init(jax.random.key(s), jnp.zeros(SHAPE))) for s in (0, 1)]
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(24, 8, 8, 1)).astype(np.float32) for _ in range(2)]
    return model, ends, images


def _distill(mlp, ends=None, **kw):
    model, default_ends, images = mlp
    kw = {"steps": 60, "batch_size": 96, "augment": 1, "lr": 1e-2, **kw}
    return fsmerge.distill(model, ends or default_ends, images, key=jax.random.key(0), **kw)


def test_two_copies_of_one_model_distill_to_that_model(mlp):
    """Known answer: every target is model A's feature, the student starts as A with P = I, so
    the loss is 0 from the first step and the heads stay A's."""
    model, ends, images = mlp
    student, trees, history, _ = _distill(mlp, ends=[ends[0], ends[0]], weight_decay=0.0)
    assert student is model and max(history["loss"]) < 1e-10
    for tree in trees:
        np.testing.assert_allclose(_jit_apply(model)(tree, images[1]),
                                   _jit_apply(model)(ends[0], images[1]), atol=1e-5)


def test_distill_fits_and_folds_each_tasks_map_into_its_head(mlp):
    model, ends, images = mlp
    student, trees, history, proj = _distill(mlp)
    assert history["loss"][-1] < 0.5 * history["loss"][0]  # full batches: whole-set loss
    x = images[0]
    for t, tree in enumerate(trees):  # logits = head_t(P_t^T features) of the shared trunk
        feats = head_inputs(student, tree, x).astype(np.float64)
        head = tree["params"]["linear"]
        p_t = proj[:, t * 12:(t + 1) * 12]
        want = feats @ p_t @ np.asarray(ends[t]["params"]["linear"]["kernel"], np.float64) \
            + np.asarray(head["bias"])
        np.testing.assert_allclose(_jit_apply(student)(tree, x), want, atol=1e-4)
    trunk = [{k: v for k, v in specs.flatten(t).items() if "linear" not in k} for t in trees]
    for k in trunk[0]:
        np.testing.assert_array_equal(trunk[0][k], trunk[1][k])


def test_distill_to_a_narrower_student(mlp):
    _, _, images = mlp
    student, trees, history, proj = _distill(mlp, width=0.5)
    assert tuple(student.module.hidden) == (8, 6) and proj.shape == (6, 24)
    assert trees[1]["params"]["linear"]["kernel"].shape == (6, 5)
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    assert np.isfinite(_jit_apply(student)(trees[1], images[1])).all()


def test_distill_is_registered_with_checks(mlp):
    model, ends, images = mlp
    m = methods.get("distill")
    assert m.families == ("learned",)
    assert set(m.problems({"steps": 0, "width": -1.0, "schedule": "cosine"})) == {
        "steps", "width", "schedule"}
    out = m.fn("learned")(model, specs.for_model(model), ends, images, key=jax.random.key(0),
                          steps=3, batch_size=96, augment=1)
    assert len(out.variables) == 2 and len(out.history["loss"]) == 3
