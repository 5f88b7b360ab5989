"""FS-Merge: folds of the initialisations, SuperNet == folded model (an independent unfolded
forward), a toy with a known solution, ZipIt! init, other widths, determinism, ViT, registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import fsmerge, methods, models, specs
from mergejax.augment import augment, max_shift
from mergejax.fsmerge import params as fsparams
from mergejax.methods.fs_merge import zipit_transforms

MLP = dict(num_classes=5, hidden=(16, 12))
SHAPE = (1, 8, 8, 1)


@functools.lru_cache(maxsize=8)
def _jit_apply(model):
    return jax.jit(model.apply)


def _apply(model, variables, x):
    return np.asarray(_jit_apply(model)(variables, x))


def _init(model, seed):
    return jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(seed), jnp.zeros(SHAPE)))


@pytest.fixture(scope="module")
def mlp():
    model = models.create("mlp", **MLP)
    spec = specs.for_model(model)
    ends = [_init(model, 0), _init(model, 1)]
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(24, 8, 8, 1)).astype(np.float32) for _ in range(2)]
    return model, spec, ends, images


def _setup(mlp, **kw):
    model, spec, ends, images = mlp
    kw = {"steps": 40, "batch_size": 96, "augment": 1, **kw}
    return fsmerge.setup(model, spec, ends, images, key=jax.random.key(0), **kw)


def _flat(tree):
    return specs.flatten(tree)


def _close(a, b, atol=1e-6):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, err_msg=k)


def _with_head(trunk, head_from):
    flat = {k: v for k, v in _flat(trunk).items() if not k.startswith("params/linear/")}
    flat.update({k: v for k, v in _flat(head_from).items() if k.startswith("params/linear/")})
    return specs.unflatten(flat)


def test_first_folds_to_model_a_and_average_to_the_weight_average(mlp):
    _, _, ends, _ = mlp
    first = _setup(mlp, init="first")
    trees = fsmerge.fold_setup(first, first.mu)
    _close(trees[0], ends[0])  # model A exactly
    _close(trees[1], _with_head(ends[0], ends[1]))  # A's trunk, B's head reading it
    avg = _setup(mlp, init="average")
    trees = fsmerge.fold_setup(avg, avg.mu)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, ends[0], ends[1])
    for i in range(2):
        _close(trees[i], _with_head(mean, ends[i]))


def _unfolded_logits(s, mu, endpoints, x):
    """The SuperNet written out (numpy): per layer U -> block-diagonal W_i (+ b_i) -> M -> ReLU,
    then endpoint i's head on U_i of the merged features; independent of `fsmerge.fold`."""
    p = s.problem
    merges, unmerges = fsmerge.matrices(p.plan, fsparams.parameterisation(p.param),
                                        s.consts["frozen"], mu)
    merges = {k: np.asarray(v, np.float64) for k, v in merges.items()}
    unmerges = {k: np.asarray(v, np.float64) for k, v in unmerges.items()}
    flats = [{k: np.asarray(v, np.float64) for k, v in _flat(e).items()} for e in endpoints]
    n = len(endpoints)
    z = np.asarray(x, np.float64).reshape(len(x), -1)
    for i in range(len(MLP["hidden"])):
        name = f"params/dense_{i}"
        d_in = flats[0][f"{name}/kernel"].shape[0]
        u = z @ unmerges[name].T if i else np.tile(z, (1, n))  # (B, N*d_in)
        h = np.concatenate([u[:, k * d_in:(k + 1) * d_in] @ flats[k][f"{name}/kernel"]
                            + flats[k][f"{name}/bias"] for k in range(n)], axis=1)
        z = np.maximum(h @ merges[name].T, 0.0)
    u = z @ unmerges["params/linear"].T
    d = u.shape[1] // n
    return [u[:, k * d:(k + 1) * d] @ flats[k]["params/linear/kernel"]
            + flats[k]["params/linear/bias"] for k in range(n)]


def test_supernet_equals_its_folded_model_at_init_and_after_training(mlp):
    model, _, ends, images = mlp
    s = _setup(mlp, init="average", lr=3e-2)
    x = images[0][:8]
    for mu in (s.mu, fsmerge.fit_setup(s)[0]):
        trees = fsmerge.fold_setup(s, mu)
        for i, want in enumerate(_unfolded_logits(s, mu, ends, x)):
            np.testing.assert_allclose(_apply(model, trees[i], x), want, atol=1e-5)
    # the fit moved every kind of parameter, so the second comparison is not the first
    assert all(np.abs(np.asarray(t["diag"])).max() > 1e-3 for t in mu["M"].values())
    assert np.abs(np.asarray(mu["U"]["params/linear"]["a"])).max() > 1e-3


def test_diagonal_parameterisation_is_the_init_plus_per_model_diagonals():
    e = fsparams.alignment(4, 4)
    theta = {"diag": jnp.asarray([[1.0, 2, 3, 4], [5, 6, 7, 8]])}
    got = np.asarray(fsparams.parameterisation("diagonal").delta(theta, e, 2))
    np.testing.assert_array_equal(got, np.hstack([np.diag([1.0, 2, 3, 4]),
                                                  np.diag([5.0, 6, 7, 8])]))


def test_fit_reaches_the_known_solution_for_a_rescaled_copy(mlp):
    """B is A with every hidden unit scaled by a positive factor (B computes A's function; its
    head reads s * A's features). ReLU commutes with positive scales, so with init "first" and
    the diagonal parameterisation every SuperNet keeps A's features up to per-channel scales:
    the fit is a product of scalars per channel whose solutions all have U_B / U_A = s on the
    head (loss 0). AdamW must reach that solution, not just descend towards it.

    (A permuted copy needs full M and U; through the ReLUs that landscape has stationary points
    where the fit stalls at ~2% of its starting loss whatever the schedule, so it cannot show
    that the optimiser reaches a solution.)"""
    model, spec, ends, images = mlp
    a = ends[0]
    rng = np.random.default_rng(1)
    scales = {s: rng.uniform(0.5, 2.0, spec.space(s).width).astype(np.float32)
              for s in spec.space_names}
    b = specs.apply_merge(spec, [a], {s: (np.diag(v), np.diag(1 / v))
                                      for s, v in scales.items()})[0]
    np.testing.assert_allclose(_apply(model, b, images[0]), _apply(model, a, images[0]),
                               atol=1e-5)  # b computes a's function
    s = fsmerge.setup(model, spec, [a, b], images, key=jax.random.key(0), init="first",
                      param="diagonal", steps=600, batch_size=96, augment=1, lr=0.05,
                      weight_decay=0.0)
    mu, history = fsmerge.fit_setup(s)  # full batches: the loss of the whole set each step
    before, after = history["loss"][0], history["loss"][-1]
    assert before > 1e-2 and after < 1e-6 * before, (before, after)
    u = 1 + np.asarray(mu["U"]["params/linear"]["diag"])  # (N, d): U_i = diag(u_i)
    # only channels some fitting image of task B activates are determined by the data
    live = (np.asarray(model.features(a, s.data["x"][s.data["ids"] == 1])[1]["hidden1"]) > 0
            ).any(0)
    assert live.sum() >= 10, live
    np.testing.assert_allclose((u[1] / u[0])[live], scales["hidden1"][live], rtol=1e-3)
    trees = fsmerge.fold_setup(s, mu)
    for tree, end in zip(trees, (a, b)):
        np.testing.assert_allclose(_apply(model, tree, images[1]), _apply(model, end, images[1]),
                                   atol=1e-3)


def test_zipit_init_folds_to_zipits_merge(mlp):
    from mergejax.statistics import collect

    model, spec, ends, images = mlp
    data = np.concatenate(images)
    stats = collect(model, spec, ends, [data[i:i + 128] for i in range(0, len(data), 128)])
    want = methods.get("zipit").fn("matching")(spec, ends, stats, spaces=spec.space_names)
    got = zipit_transforms(model, spec, ends, data)
    for space in spec.space_names:
        for w, g in zip(want[space], got[space]):
            np.testing.assert_array_equal(np.asarray(w), np.asarray(g))
    s = _setup(mlp, init="zipit", init_transforms=got)
    trees = fsmerge.fold_setup(s, s.mu)
    for tree, expected in zip(trees, specs.apply_merge(spec, ends, want)):
        _close(tree, expected, atol=1e-5)


@pytest.mark.parametrize("width,hidden", [(0.5, (8, 6)), (1.5, (24, 18))])
def test_merging_to_a_narrower_and_a_wider_model(mlp, width, hidden):
    model, _, ends, images = mlp
    s = _setup(mlp, init="first", width=width, lr=1e-2)
    assert tuple(s.model.module.hidden) == hidden
    init_trees = fsmerge.fold_setup(s, s.mu)
    if width > 1:  # the extra channels carry live features that no layer reads yet
        np.testing.assert_allclose(_apply(s.model, init_trees[0], images[0]),
                                   _apply(model, ends[0], images[0]), atol=1e-5)
    mu, history = fsmerge.fit_setup(s)  # full batches: the loss of the whole set each step
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    trees = fsmerge.fold_setup(s, mu)
    assert trees[0]["params"]["dense_0"]["kernel"].shape == (64, hidden[0])
    assert trees[1]["params"]["linear"]["kernel"].shape == (hidden[1], 5)
    assert np.isfinite(_apply(s.model, trees[1], images[1])).all()


def test_local_objective_decreases(mlp):
    s = _setup(mlp, init="average", objective="local", param="diagonal", lr=1e-2)
    assert [t[1] for t in s.problem.taps] == ["hidden0", "hidden1"]
    _, history = fsmerge.fit_setup(s)  # full batches: the loss of the whole set each step
    assert history["loss"][-1] < 0.9 * history["loss"][0]


def test_registered_method_is_deterministic_and_plots(mlp, tmp_path):
    model, spec, ends, images = mlp
    m = methods.get("fs_merge")
    assert "learned" in m.families and "distill" in methods.names("learned")
    assert set(m.problems({"init": "none", "param": "dense", "rank": 0, "augment": -1})) == {
        "init", "param", "rank", "augment"}
    run = [m.fn("learned")(model, spec, ends, images, key=jax.random.key(3), steps=15,
                           batch_size=96, augment=1) for _ in range(2)]
    assert run[0].history["loss"] == run[1].history["loss"] and len(run[0].history["loss"]) == 15
    for a, b in zip(run[0].variables, run[1].variables):
        _close(a, b, atol=0)
    path = tmp_path / "loss.png"
    fsmerge.plot_loss(run[0].history, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_augment_shifts_within_bounds_and_is_deterministic():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 8, 8, 1)).astype(np.float32)
    out = augment(images, 3, seed=7)
    assert out.shape == (20, 8, 8, 1)
    np.testing.assert_array_equal(out[:5], images)
    np.testing.assert_array_equal(out, augment(images, 3, seed=7))
    assert not np.array_equal(out, augment(images, 3, seed=8))
    p = max_shift(8)
    for j in range(5, 20):  # every copy is its original shifted by at most p, zero filled
        src = np.pad(images[j % 5], ((p, p), (p, p), (0, 0)))
        assert any(np.array_equal(out[j], src[dy:dy + 8, dx:dx + 8])
                   for dy in range(2 * p + 1) for dx in range(2 * p + 1))


def test_vit_tiny_average_fold_is_the_weight_average():
    model = models.create("vit_tiny", num_classes=3, depth=1)
    spec = specs.for_model(model)
    ends = [_init(model, 0), _init(model, 1)]
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(8, 8, 8, 1)).astype(np.float32) for _ in range(2)]
    s = fsmerge.setup(model, spec, ends, images, key=jax.random.key(0), init="average",
                      param="diagonal", steps=2, batch_size=8, augment=0)
    trees = fsmerge.fold_setup(s, s.mu)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, ends[0], ends[1])
    for i in range(2):
        want = specs.flatten(mean)
        want.update({k: v for k, v in _flat(ends[i]).items() if k.startswith("params/head/")})
        _close(trees[i], specs.unflatten(want))
        np.testing.assert_allclose(_apply(model, trees[i], images[0]),
                                   _apply(model, specs.unflatten(want), images[0]), atol=1e-5)
