"""CCT: model sizes and taps, the merge spec (tokenizer channels, one stream, tied head-grouped
attention), its symmetries, and every method running on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Problem, model_b_permutations

import mergejax as mj
from mergejax import kernels, methods, models, specs
from mergejax.models.cct import sine_positions

KWARGS = dict(num_classes=5, width=16, depth=2, heads=4, mlp_ratio=2.0, conv_layers=2,
              conv_width=8)
SHAPE = (6, 12, 12, 3)  # 12 -> 6 -> 3: 9 tokens
TOKENS = 9
OG = KWARGS["width"] // KWARGS["heads"]  # channels per head


def _tiny(seed=0, **overrides):
    model = models.create("cct", **{**KWARGS, **overrides})
    variables = jax.tree.map(np.array, model.init(jax.random.key(seed), jnp.zeros(SHAPE)))
    # the repository's 0.02 init makes attention near-uniform and the head tiny; larger weights
    # make every permutation test sensitive
    rng = np.random.default_rng(seed)
    p = variables["params"]
    for blk in (p[f"blocks_{i}"] for i in range(KWARGS["depth"])):
        for layer in (*blk["attn"].values(), *blk["mlp"].values()):
            layer["kernel"] = rng.normal(size=layer["kernel"].shape).astype(np.float32) * 0.3
    for name in ("attention_pool", "fc"):
        p[name]["kernel"] = rng.normal(size=p[name]["kernel"].shape).astype(np.float32)
    p["norm"]["bias"] = rng.normal(size=KWARGS["width"]).astype(np.float32) * 0.1
    return model, variables


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(7).normal(size=SHAPE).astype(np.float32)


def _grouped(rng, width, groups, head_perm=None, within=True):
    """A permutation moving groups as wholes (`head_perm`), channels shuffled inside each."""
    og = width // groups
    head_perm = rng.permutation(groups) if head_perm is None else head_perm
    return np.concatenate([h * og + (rng.permutation(og) if within else np.arange(og))
                           for h in head_perm])


def _perms(spec, rng, kind):
    """Identity everywhere except what `kind` moves (kinds named in the test below)."""
    perms = {s.name: np.arange(s.width) for s in spec.spaces}
    heads = KWARGS["heads"]
    for i in range(KWARGS["depth"]):
        attn, mlp = f"blocks_{i}/attn", f"blocks_{i}/mlp"
        if kind in ("heads", "all"):  # heads as units (shuffled inside too for "all")
            perms[attn] = _grouped(rng, KWARGS["width"], heads, rng.permutation(heads),
                                   kind == "all")
        if kind == "within_heads":  # every head stays, its channels shuffled
            perms[attn] = _grouped(rng, KWARGS["width"], heads, np.arange(heads))
        if kind in ("mlp", "all"):
            perms[mlp] = rng.permutation(spec.space(mlp).width)
    if kind in ("tokenizer", "all"):
        perms["tokenizer/conv_0"] = rng.permutation(KWARGS["conv_width"])
    if kind in ("stream", "all"):
        perms["stream"] = rng.permutation(KWARGS["width"])
    return perms


_apply = jax.jit(lambda model, variables, x: model.apply(variables, x), static_argnums=0)


def _logits(model, variables, x):
    return np.asarray(_apply(model, variables, x))


# ------------------------------------------------------------------------------- model and spec
def test_taps_fit_the_spec_and_every_leaf_is_covered(x):
    model, v = _tiny()
    spec = specs.for_model(model)
    spec.check(v)  # every leaf in the spec, at its space widths
    logits, taps = jax.jit(model.features)(v, x)
    assert logits.shape == (SHAPE[0], 5)
    np.testing.assert_allclose(logits, model.apply_train(v, x)[0], atol=1e-5)
    assert spec.space_names == ["tokenizer/conv_0", "stream", "blocks_0/attn", "blocks_0/mlp",
                                "blocks_1/attn", "blocks_1/mlp"]
    for space in spec.spaces:
        assert taps[space.tap].shape[-1] == space.width, space
        if space.pre_tap:
            assert taps[space.pre_tap].shape == taps[space.tap].shape
    assert [(s.name, s.groups) for s in spec.spaces if s.groups > 1] == [
        (f"blocks_{i}/attn", 4) for i in range(KWARGS["depth"])]
    assert taps["tokenizer/act_0"].shape == (SHAPE[0], 6, 6, 8)
    assert taps["blocks_0/attn/qko"].shape == (SHAPE[0], 3 * TOKENS, KWARGS["width"])
    assert taps["stream"].shape == (SHAPE[0], TOKENS * (2 * KWARGS["depth"] + 1), 16)
    assert taps["head_input"].shape == (SHAPE[0], 16)
    # q, k, v have no bias (the repository's qkv); attention_pool is a tail like the head
    assert "bias" not in v["params"]["blocks_0"]["attn"]["q"]
    assert spec.leaves["params/attention_pool/kernel"] == (specs.Axis(0, "stream", False),)


def test_one_attention_space_ties_q_k_v_and_proj():
    spec = specs.for_model(_tiny()[0])
    for i in range(KWARGS["depth"]):
        a = f"params/blocks_{i}/attn"
        assert sorted(spec.axes_of(f"blocks_{i}/attn")) == sorted(
            [(f"{a}/{n}/kernel", 1, True) for n in "qkv"] + [(f"{a}/proj/kernel", 0, False)])


def test_sequence_pooling_is_a_softmax_weighted_token_average(x):
    """head_input = softmax over tokens of attention_pool(norm(stream)) weighting the normed
    tokens (numpy oracle from the last block's output in the `stream` tap)."""
    model, v = _tiny()
    _, taps = model.features(v, x)
    last = np.asarray(taps["stream"])[:, -TOKENS:].astype(np.float64)
    p = v["params"]
    mu, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
    normed = (last - mu) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    score = normed @ p["attention_pool"]["kernel"] + p["attention_pool"]["bias"]  # (B, T, 1)
    w = np.exp(score - score.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(taps["head_input"], (w * normed).sum(1), atol=1e-5)


def test_sine_table_known_values():
    t = sine_positions(5, 6)[0]
    assert t.shape == (5, 6) and t.dtype == np.float32
    np.testing.assert_array_equal(t[0], [0, 1, 0, 1, 0, 1])  # sin 0, cos 0
    np.testing.assert_allclose(t[:, 0], np.sin(np.arange(5)), atol=1e-7)
    np.testing.assert_allclose(t[:, 1], np.cos(np.arange(5)), atol=1e-7)
    np.testing.assert_allclose(t[3, 2], np.sin(3 / 10000 ** (2 / 6)), atol=1e-7)
    np.testing.assert_allclose(t[3, 5], np.cos(3 / 10000 ** (4 / 6)), atol=1e-7)
    model = models.create("cct", **{**KWARGS, "positional": "sine"})
    v = model.init(jax.random.key(0), jnp.zeros(SHAPE))
    np.testing.assert_array_equal(v["params"]["positional_emb"], sine_positions(TOKENS, 16))
    # fixed as in torch: the loss does not reach it
    grad = jax.grad(lambda p: model.apply({"params": p}, jnp.ones(SHAPE)).sum())(v["params"])
    assert not np.asarray(grad["positional_emb"]).any()
    assert np.asarray(grad["fc"]["kernel"]).any()


# (name, published parameter count in millions, input size): the repository's README, whose
# CCT-6/3x1 and ImageNet CCT-14/7x2 counts leave out the position table (sine-positions models)
@pytest.mark.parametrize("name, millions, size, count_positions", [
    ("cct_2_3x2", 0.284, 32, True), ("cct_4_3x2", 0.482, 32, True),
    ("cct_6_3x2", 3.327, 32, True), ("cct_7_3x2", 3.853, 32, True),
    ("cct_7_3x1", 3.760, 32, True), ("cct_6_3x1", 3.168, 32, False),
    ("cct_14_7x2", 22.29, 224, False)])
def test_named_sizes_match_the_published_parameter_counts(name, millions, size,
                                                          count_positions):
    model = models.create(name)
    shapes = model.init_shapes(np.zeros((1, size, size, 3), np.float32))
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    if not count_positions:
        total -= int(np.prod(shapes["params"]["positional_emb"].shape))
    digits = len(str(millions).split(".")[1])
    assert round(total / 1e6, digits) == millions
    specs.for_model(model).check(shapes)


def test_bad_sizes_fail_at_creation():
    with pytest.raises(ValueError, match="multiple of heads"):
        models.create("cct", width=10, heads=4)
    with pytest.raises(ValueError, match="positional"):
        models.create("cct", positional="rope")
    with pytest.raises(ValueError, match="conv_layers"):
        models.create("cct", conv_layers=0)


# ------------------------------------------------------------------------- symmetries of the spec
@pytest.mark.parametrize("kind, positional", [
    ("heads", "learnable"), ("within_heads", "learnable"), ("mlp", "learnable"),
    ("tokenizer", "learnable"), ("stream", "learnable"), ("stream", "sine"),
    ("all", "learnable"), ("all", "none")])
def test_permutations_keep_the_logits(x, kind, positional):
    model, v = _tiny(positional=positional)
    spec = specs.for_model(model)
    perms = _perms(spec, np.random.default_rng(3), kind)
    [pv] = specs.apply_merge(spec, [v], specs.permutation_transforms(perms))
    assert not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(pv), jax.tree.leaves(v)))
    np.testing.assert_allclose(_logits(model, pv, x), _logits(model, v, x), atol=1e-5)


def test_splitting_a_head_changes_the_logits(x):
    """The symmetry is heads as units: swapping two channels of different heads is not one."""
    model, v = _tiny()
    spec = specs.for_model(model)
    perms = _perms(spec, None, "none")
    perms["blocks_0/attn"][[0, OG]] = [OG, 0]  # head 0's first channel <-> head 1's first
    [pv] = specs.apply_merge(spec, [v], specs.permutation_transforms(perms))
    assert np.abs(_logits(model, pv, x) - _logits(model, v, x)).max() > 1e-3


def test_positions_must_move_with_the_stream(x):
    """A stream permutation that leaves the positions behind changes the function: the sine
    table has to be a leaf of the stream space."""
    model, v = _tiny(positional="sine")
    spec = specs.for_model(model)
    perms = _perms(spec, np.random.default_rng(3), "stream")
    [pv] = specs.apply_merge(spec, [v], specs.permutation_transforms(perms))
    pv["params"]["positional_emb"] = v["params"]["positional_emb"]
    assert np.abs(_logits(model, pv, x) - _logits(model, v, x)).max() > 1e-3


# ------------------------------------------------------------------------------------ matching
def test_weight_matching_recovers_planted_heads_stream_and_tokenizer():
    model, v = _tiny()
    spec = specs.for_model(model)
    perms = _perms(spec, np.random.default_rng(5), "all")
    [pv] = specs.apply_merge(spec, [v], specs.permutation_transforms(perms))
    params = [{k: a for k, a in specs.flatten(t).items() if k.startswith("params/")}
              for t in (v, pv)]
    found = kernels.weight_matching(spec, params[0], params[1], max_iter=20, seed=0)
    for space, planted in perms.items():  # pv's feature k is v's planted[k]: found inverts it
        np.testing.assert_array_equal(found[space], np.argsort(planted), err_msg=space)


@pytest.fixture(scope="module")
def pair(x):
    (model, va), (_, vb) = _tiny(0), _tiny(1)
    spec = specs.for_model(model)
    batches = [x, x[::-1] * 0.5 + 0.1]
    return model, spec, Problem(model, spec, [va, vb], spec.space_names, lambda: iter(batches))


def _assert_heads_whole(spec, out):
    """Every head of every model feeds one merged head, every merged head reads one head per
    model, and merge never reads outside unmerge's pattern."""
    grouped = [s for s in spec.spaces if s.groups > 1]
    assert grouped
    for space in grouped:
        merge, unmerge = (np.asarray(t) for t in out[space.name])
        n, g = space.width, space.groups
        og_out = unmerge.shape[1] // g
        for m in range(2):  # every input head feeds one merged head only
            for h in range(g):
                cols = np.nonzero(unmerge[m * n + h * OG:m * n + (h + 1) * OG].any(axis=0))[0]
                assert len(set(cols // og_out)) == 1, (space.name, m, h)
        for j in range(g):  # every merged head reads one head per model
            rows = np.nonzero(unmerge[:, j * og_out:(j + 1) * og_out].any(axis=1))[0]
            assert len({(r // n, (r % n) // OG) for r in rows}) == 2, (space.name, j)
        assert ((merge != 0) <= (unmerge.T != 0)).all()


@pytest.mark.parametrize("method, hparams", [
    ("mudsc", dict(matcher="permute", fix_rate=0.0)), ("mudsc", dict(matcher="zip",
                                                                     fix_rate=0.5)),
    ("permute", {}), ("zipit", dict(alpha=0.5, beta=1.0)), ("weight_matching", {})])
def test_group_matching_never_splits_a_head(pair, method, hparams):
    model, spec, problem = pair
    extra = dict(iters=5, tol=2) if method == "mudsc" else {}
    _assert_heads_whole(spec, problem.run(method, **hparams, **extra))


def test_without_group_matching_heads_are_matched_feature_by_feature(pair):
    """group_heads=False is the plain matcher on every space (MuDSC's ablation)."""
    model, spec, problem = pair
    out = problem.run("permute", group_heads=False)
    stats = problem.statistics()
    for space in spec.spaces:
        want = kernels.permute_match(stats[space.name].corr, num_models=2)
        for got_m, want_m in zip(out[space.name], want):
            np.testing.assert_array_equal(np.asarray(got_m), np.asarray(want_m))


def test_mudsc_permute_alignment_keeps_each_model_s_function(x, pair):
    """Full-merge MuDSC permute pairs every feature of A with one of B (tokenizer channels,
    stream, heads, MLP units): B moved by its own side of that alignment computes the same
    logits."""
    model, spec, problem = pair
    out = problem.run("mudsc", matcher="permute", fix_rate=0.0, iters=5, tol=2)
    vb = problem.endpoints[1]
    perms = model_b_permutations(spec, out)
    [moved] = specs.apply_merge(spec, [vb], specs.permutation_transforms(perms))
    np.testing.assert_allclose(_logits(model, moved, x), _logits(model, vb, x), atol=1e-4)


@pytest.fixture(scope="module")
def twins(x):
    model, v = _tiny()
    spec = specs.for_model(model)
    return model, v, Problem(model, spec, [v, v], spec.space_names, lambda: iter([x[:3], x[3:]]))


@pytest.mark.parametrize("method, hparams", [
    ("permute", {}), ("zipit", {}), ("weight_matching", {}),
    ("mudsc", dict(matcher="permute", iters=5)), ("mudsc", dict(matcher="zip", iters=5))])
def test_self_merge_returns_the_model(x, twins, method, hparams):
    model, v, problem = twins
    merged = specs.apply_merge(problem.spec, [v, v], problem.run(method, **hparams))
    for m in merged:
        np.testing.assert_allclose(_logits(model, m, x), _logits(model, v, x), atol=1e-4)


@pytest.mark.parametrize("method, hparams", [
    ("permute", {}), ("permute", dict(group_heads=False)), ("weight_matching", {}),
    ("zipit", dict(alpha=0.5, beta=1.0)), ("zipit", dict(group_heads=False)),
    ("mudsc", dict(iters=5)), ("mudsc", dict(iters=5, group_heads=False)),
    ("mudsc", dict(matcher="permute", fix_rate=0.0))])
def test_matching_methods_run_through_merge_with_repair(x, method, hparams):
    (model, va), (_, vb) = _tiny(0), _tiny(1)
    merged = mj.merge(method, model, [va, vb], data=x, repair=True, **hparams)
    assert len(merged) == 2
    for m in merged:
        specs.for_model(model).check(m)
        assert np.isfinite(_logits(model, m, x)).all()
    # one shared trunk up to the final norm; the tails (attention_pool, fc) stay per model
    tails = ("params/fc/", "params/attention_pool/")
    trunk = {k: a for k, a in specs.flatten(merged[0]).items() if not k.startswith(tails)}
    other = specs.flatten(merged[1])
    assert all(np.array_equal(a, other[k]) for k, a in trunk.items())


def test_every_weight_space_method_runs_on_cct_params(x):
    model, v = _tiny(positional="sine")
    base = v["params"]
    rng = np.random.default_rng(0)
    finetuned = [jax.tree.map(lambda a: a + 0.01 * rng.normal(size=a.shape).astype(np.float32),
                              base) for _ in range(2)]  # two tasks, as slerp requires
    for name in methods.names("weight_space"):
        out = mj.merge_weights(name, base, finetuned)
        for tree in out if isinstance(out, list) else [out]:
            assert jax.tree.structure(tree) == jax.tree.structure(base), name
            assert np.isfinite(_logits(model, {"params": tree}, x)).all(), name
