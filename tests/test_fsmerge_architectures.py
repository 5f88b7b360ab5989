"""FS-Merge on the convolutional and transformer architectures: CCT (two per-endpoint tails,
`attention_pool` and `fc`) against a separately written numpy SuperNet, and ResNet (BatchNorm:
the running statistics follow the init's merge; the fit's BatchNorm sees the whole batch, also
when it is sharded over the 8 fake devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mergejax import fsmerge, models, specs
from mergejax.fsmerge import params as fsparams
from mergejax.kernels.sharding import data_mesh

CCT = dict(num_classes=3, width=8, depth=1, heads=2, conv_layers=2, conv_width=4)
SHAPE = (8, 8, 1)


@functools.lru_cache(maxsize=8)
def _jit_apply(model):
    return jax.jit(model.apply)


def _apply(model, variables, x):
    return np.asarray(_jit_apply(model)(variables, x))


def _ends(model, shape, seeds=(0, 1)):
    init = jax.jit(model.init)
    return [jax.tree.map(np.asarray, init(jax.random.key(s), jnp.zeros((1, *shape))))
            for s in seeds]


def _close(a, b, atol=1e-6):
    fa, fb = specs.flatten(a), specs.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def cct():
    model = models.create("cct", **CCT)
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(8, *SHAPE)).astype(np.float32) for _ in range(2)]
    return model, specs.for_model(model), _ends(model, SHAPE), images


# ----------------------------------------------------------------- numpy SuperNet (CCT)


def _conv(x, kernel, pad):
    """x (B, H, W, C) * kernel (k, k, C, O), stride 1, zero padding `pad` (cross-correlation)."""
    k = kernel.shape[0]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
    out = np.zeros((x.shape[0], h, w, kernel.shape[3]))
    for dy in range(k):
        for dx in range(k):
            out += xp[:, dy:dy + h, dx:dx + w] @ kernel[dy, dx]
    return out


def _max_pool(x):
    """3x3 max-pool, stride 2, padding 1 with -inf (torch's MaxPool2d(3, 2, 1))."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    h, w = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    return np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                               for j in range(w)], 1) for i in range(h)], 1)


def _layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _supernet_logits(s, mu, endpoints, x):
    """The CCT SuperNet written out in float64: every layer maps the merged input to each
    endpoint's input space by U_i, applies endpoint i's frozen layer, and merges the N outputs
    by M (sum_i M_i h_i); ReLU, pooling, norms (merged parameters) and attention act in merged
    width. Endpoint i's tails (attention_pool, fc) read U_i of the final features.
    Independent of `fsmerge.fold` and of the flax model."""
    p = s.problem
    merges, unmerges = fsmerge.matrices(p.plan, fsparams.parameterisation(p.param),
                                        s.consts["frozen"], mu)
    m = {k: np.asarray(v, np.float64) for k, v in merges.items()}
    u = {k: np.asarray(v, np.float64) for k, v in unmerges.items()}
    ends = [{k: np.asarray(v, np.float64) for k, v in specs.flatten(e).items()}
            for e in endpoints]
    norm = {k: np.asarray(v, np.float64) for k, v in mu["norm"].items()}
    n = len(ends)

    def blocks(mat, axis):
        return np.split(mat, n, axis=axis)

    def layer(z, name, fn):
        """sum_i M_i fn_i(U_i z) along the last axis; fn_i(v) = endpoint i's layer on v."""
        us = blocks(u[name], 0) if name in u else [None] * n
        return sum(fn(i, z if ui is None else z @ ui.T) @ mi.T
                   for i, (ui, mi) in enumerate(zip(us, blocks(m[name], 1))))

    def dense(z, name):
        def fn(i, v):
            out = v @ ends[i][f"{name}/kernel"]
            return out + ends[i][f"{name}/bias"] if f"{name}/bias" in ends[i] else out
        return layer(z, name, fn)

    def ln(z, name):
        return _layer_norm(z, norm[f"{name}/scale"], norm[f"{name}/bias"])

    z = np.asarray(x, np.float64)
    for j in range(CCT["conv_layers"]):
        name = f"params/tokenizer/conv_{j}"
        z = _max_pool(np.maximum(layer(z, name, lambda i, v, name=name: _conv(
            v, ends[i][f"{name}/kernel"], 1)), 0.0))
    z = z.reshape(len(z), -1, z.shape[-1])  # (B, T, D')
    pos = "params/positional_emb"
    z = z + sum(ends[i][pos] @ mi.T for i, mi in enumerate(blocks(m[pos], 1)))
    heads = CCT["heads"]
    for b in range(CCT["depth"]):
        blk = f"params/blocks_{b}"
        y = ln(z, f"{blk}/pre_norm")
        q, k, v = (dense(y, f"{blk}/attn/{t}") for t in "qkv")
        bsz, t, d = q.shape
        hd = d // heads
        split = [a.reshape(bsz, t, heads, hd) for a in (q, k, v)]
        scores = np.einsum("bqhd,bkhd->bhqk", split[0], split[1]) / np.sqrt(hd)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        att = np.einsum("bhqk,bkhd->bqhd", w, split[2]).reshape(bsz, t, d)
        z = ln(z + dense(att, f"{blk}/attn/proj"), f"{blk}/norm1")
        h = dense(z, f"{blk}/mlp/fc1")
        z = z + dense(0.5 * h * (1 + erf(h / np.sqrt(2))), f"{blk}/mlp/fc2")
    z = ln(z, "params/norm")
    logits = []
    for i, (up, uf) in enumerate(zip(blocks(u["params/attention_pool"], 0),
                                     blocks(u["params/fc"], 0))):
        score = (z @ up.T) @ ends[i]["params/attention_pool/kernel"] \
            + ends[i]["params/attention_pool/bias"]  # (B, T, 1)
        w = np.exp(score - score.max(1, keepdims=True))
        pooled = np.einsum("bto,btd->bd", w / w.sum(1, keepdims=True), z)
        logits.append((pooled @ uf.T) @ ends[i]["params/fc/kernel"] + ends[i]["params/fc/bias"])
    return logits


# ----------------------------------------------------------------------------- tests


def test_cct_first_folds_to_model_a_with_each_endpoints_tails(cct):
    model, spec, ends, images = cct
    s = fsmerge.setup(model, spec, ends, images, key=jax.random.key(0), init="first",
                      steps=1, batch_size=16, augment=0)
    assert [t.name for t in s.problem.plan.tails] == ["params/attention_pool", "params/fc"]
    trees = fsmerge.fold_setup(s, s.mu)
    _close(trees[0], ends[0])  # model A exactly
    flat = specs.flatten(ends[0])  # A's trunk with B's own pooling scorer and classifier
    flat.update({k: v for k, v in specs.flatten(ends[1]).items()
                 if k.startswith(("params/attention_pool/", "params/fc/"))})
    _close(trees[1], specs.unflatten(flat))
    np.testing.assert_allclose(_apply(model, trees[0], images[0]),
                               _apply(model, ends[0], images[0]), atol=1e-6)


@pytest.mark.parametrize("width", [1.0, 1.5])
def test_cct_supernet_equals_its_fold_at_init_and_after_training(cct, width):
    model, spec, ends, images = cct
    s = fsmerge.setup(model, spec, ends, images, key=jax.random.key(0), init="average",
                      width=width, steps=6, batch_size=16, augment=0, lr=3e-2)
    assert s.model.module.width == 8 * width and s.model.module.conv_width == 4 * width
    x = images[1][:4]
    mu, history = fsmerge.fit_setup(s)
    assert history["loss"][-1] < history["loss"][0]
    for state in (s.mu, mu):
        trees = fsmerge.fold_setup(s, state)
        for i, want in enumerate(_supernet_logits(s, state, ends, x)):
            np.testing.assert_allclose(_apply(s.model, trees[i], x), want, atol=1e-5)
    # the fit moved the matrices of both tails, so the second comparison is not the first
    for tail in ("params/attention_pool", "params/fc"):
        assert np.abs(np.asarray(mu["U"][tail]["diag"])).max() > 1e-3


def test_cct_fit_loss_is_each_tasks_feature_error(cct):
    """The per-endpoint forward (one per tail set) reads each task's features through that
    task's own pooling: at init "first" task A's loss is 0, task B's is not."""
    model, spec, ends, images = cct
    s = fsmerge.setup(model, spec, ends, images, key=jax.random.key(0), init="first",
                      steps=1, batch_size=16, augment=0)
    for t in range(2):
        rows = s.data["ids"] == t
        loss = fsmerge.mean_loss(s.problem, s.mu, s.consts,
                                 {k: v[rows] for k, v in s.data.items()})
        assert (loss < 1e-10) if t == 0 else (loss > 1e-3), (t, loss)


@pytest.fixture(scope="module")
def resnet():
    model = models.create("resnet", depth=8, width=1, num_classes=3)
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(8, 8, 8, 3)).astype(np.float32) for _ in range(2)]
    return model, specs.for_model(model), _ends(model, (8, 8, 3)), images


def test_resnet_first_folds_to_a_and_average_to_the_weight_average(resnet):
    model, spec, ends, images = resnet
    for init in ("first", "average"):
        s = fsmerge.setup(model, spec, ends, images, key=jax.random.key(0), init=init,
                          steps=1, batch_size=16, augment=0)
        trees = fsmerge.fold_setup(s, s.mu)
        trunk = ends[0] if init == "first" else jax.tree.map(lambda a, b: (a + b) / 2, *ends)
        for i, tree in enumerate(trees):  # running statistics merged like their channels
            want = specs.flatten(trunk)
            want.update({k: v for k, v in specs.flatten(ends[i]).items()
                         if k.startswith("params/linear/")})
            _close(tree, specs.unflatten(want), atol=1e-6)


@pytest.mark.parametrize("batch", [16, 12])  # sharded 8 ways; replicated (12 % 8: no padding)
def test_resnet_fit_on_8_devices_equals_one_device(resnet, batch):
    """BatchNorm normalises with the statistics of the whole batch, so padded rows would change
    the fit: a batch divisible by the mesh is sharded, another one replicated, both exact."""
    model, spec, ends, images = resnet
    if jax.device_count() < 8:
        pytest.skip("needs the suite's 8 fake devices (tests/conftest.py)")
    s = fsmerge.setup(model, spec, ends, images, key=jax.random.key(0), init="average",
                      param="diagonal", steps=4, batch_size=batch, augment=0, lr=1e-2)
    assert s.problem.train  # BatchNorm on batch statistics
    (mu1, h1), (mu8, h8) = (fsmerge.fit_setup(s, mesh=mesh)
                            for mesh in (data_mesh(jax.devices()[:1]), data_mesh()))
    np.testing.assert_allclose(h8["loss"], h1["loss"], rtol=1e-5, atol=1e-7)
    assert h1["loss"][-1] < h1["loss"][0]
    flat1, flat8 = specs.flatten(mu1), specs.flatten(mu8)
    for k in flat1:
        np.testing.assert_allclose(flat8[k], flat1[k], atol=1e-5, err_msg=k)
