"""ViT converters (timm, torchvision, open_clip): torch logits, exact round trips, fused qkv and
reshaped embeddings, errors naming the key, input-shape inference, a full CLIP state_dict, the
CLI, and the merge spec on a converted open_clip tower."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch_vit as tv
from flax import traverse_util

import mergejax as mj
from mergejax import models, specs
from mergejax.converters import (
    ConversionError,
    from_torch,
    load_state_dict,
    save_state_dict,
    to_torch,
)
from mergejax.io import checkpoint

W, DEPTH, HEADS = 16, 2, 4
SMALL = dict(width=W, depth=DEPTH, heads=HEADS)

# case -> (arch, Flax kwargs, torch factory, input (H, W, C)). No input_shape is passed to the
# converter: every case also proves the inference from the position embeddings.
CASES = {
    "timm-cls": ("vit", dict(SMALL, patch=2, mlp_ratio=2.0, num_classes=5),
                 lambda: tv.TimmViT(img=8, patch=2, dim=W, depth=DEPTH, heads=HEADS), (8, 8, 3)),
    "timm-mean": ("vit", dict(SMALL, patch=2, mlp_ratio=2.0, num_classes=5, pool="mean"),
                  lambda: tv.TimmViT(img=8, patch=2, dim=W, depth=DEPTH, heads=HEADS,
                                     global_pool="avg"), (8, 8, 3)),
    # timm's CLIP towers: norm_pre, no patch bias, QuickGELU (OpenAI weights), eps 1e-5
    "timm-clip": ("vit_b16", dict(SMALL, patch=4, mlp_ratio=4.0, num_classes=3, ln_pre=True,
                                  patch_bias=False, act="quick_gelu", ln_eps=1e-5),
                  lambda: tv.TimmViT(img=16, patch=4, num_classes=3, dim=W, depth=DEPTH,
                                     heads=HEADS, mlp_ratio=4.0, pre_norm=True, act="quick_gelu",
                                     eps=1e-5), (16, 16, 3)),
    "torchvision-b16": ("tv_vit_b_16", dict(SMALL, patch=2, mlp_ratio=2.0, num_classes=5),
                        lambda: tv.TorchvisionViT(img=8, patch=2, depth=DEPTH, heads=HEADS, dim=W,
                                                  mlp_dim=2 * W), (8, 8, 3)),
    "torchvision-b32": ("tv_vit_b_32", dict(width=32, depth=1, heads=4, patch=4, num_classes=4),
                        lambda: tv.TorchvisionViT(img=16, patch=4, depth=1, heads=4, dim=32,
                                                  mlp_dim=128, num_classes=4), (16, 16, 3)),
    "open_clip-gelu": ("clip_vit_b_16", dict(SMALL, patch=2, num_classes=8),
                       lambda: tv.OpenClipVisual(img=8, patch=2, dim=W, depth=DEPTH,
                                                 heads=HEADS, output_dim=8), (8, 8, 3)),
    "open_clip-quick_gelu": ("clip_vit_b_32", dict(SMALL, patch=4, num_classes=6,
                                                   act="quick_gelu"),
                             lambda: tv.OpenClipVisual(img=16, patch=4, dim=W, depth=DEPTH,
                                                       heads=HEADS, output_dim=6,
                                                       act="quick_gelu"), (16, 16, 3)),
}
ARCHS = ("vit", "vit_tiny", "vit_b16", "vit_b32", "tv_vit_b_16", "tv_vit_b_32", "clip_vit_b_16",
         "clip_vit_b_32")


def _state_dict(net):
    """The torch state_dict; open_clip towers as a CLIP model holds them (under `visual.`)."""
    sd = net.state_dict()
    return {f"visual.{k}": v for k, v in sd.items()} if isinstance(net, tv.OpenClipVisual) else sd


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _torch_logits(net, x):
    with torch.no_grad():
        return net(_nchw(x)).numpy()


@functools.cache
def _convert(case):
    """(case, torch net, its state_dict as numpy, converted variables, input batch)."""
    arch, kwargs, make, shape = CASES[case]
    net = tv.randomize(make())
    sd = {k: v.numpy() for k, v in _state_dict(net).items()}
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    return case, net, sd, from_torch(sd, arch, **kwargs), x


@pytest.fixture(params=sorted(CASES))
def converted(request):
    return _convert(request.param)


def test_every_vit_layout_has_a_case():
    from mergejax.converters import architectures

    assert {c[0] for c in CASES.values()} <= set(ARCHS) <= set(architectures())
    assert {"vit", "tv_vit_b_16", "tv_vit_b_32", "clip_vit_b_16", "clip_vit_b_32"} <= {
        c[0] for c in CASES.values()}


def test_torch_logits_match(converted):
    case, net, _, variables, x = converted
    arch, kwargs, _, _ = CASES[case]
    expected = _torch_logits(net, x)
    assert np.abs(expected).max() > 0.1  # a real signal
    logits = np.asarray(jax.jit(models.create(arch, **kwargs).apply)(variables, x))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_torch_flax_torch_is_exact(converted):
    """Same keys in torch's order, same dtypes, same values; the torch model loads it back."""
    case, net, sd, variables, _ = converted
    arch, kwargs, _, _ = CASES[case]
    back = to_torch(variables, arch, **kwargs)  # input shape inferred from the variables
    assert list(back) == list(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    tensors = to_torch(variables, arch, as_torch=True, **kwargs)
    if isinstance(net, tv.OpenClipVisual):
        tensors = {k.removeprefix("visual."): v for k, v in tensors.items()}
    net.load_state_dict(tensors)  # strict: no key missing or extra


@pytest.mark.parametrize("case", ["timm-cls", "open_clip-quick_gelu", "torchvision-b16"])
def test_flax_torch_flax_is_exact(case):
    arch, kwargs, _, shape = CASES[case]
    template = models.create(arch, **kwargs).init_shapes(np.zeros((1, *shape), np.float32))
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), template)
    again = from_torch(to_torch(variables, arch, **kwargs), arch, **kwargs)
    flat, flat_again = (traverse_util.flatten_dict(v) for v in (variables, again))
    assert flat.keys() == flat_again.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(flat_again[path], value, err_msg="/".join(path))


def test_fused_qkv_is_split_into_q_k_v():
    """Rows 0:D of timm's qkv are q, D:2D k, 2D:3D v; Flax kernels are their transposes."""
    arch, kwargs, make, _ = CASES["timm-cls"]
    sd = {k: v.numpy() for k, v in tv.randomize(make()).state_dict().items()}
    attn = from_torch(sd, arch, **kwargs)["params"]["blocks_1"]["attn"]
    w, b = sd["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.bias"]
    for i, name in enumerate("qkv"):
        np.testing.assert_array_equal(attn[name]["kernel"], w[i * W:(i + 1) * W].T)
        np.testing.assert_array_equal(attn[name]["bias"], b[i * W:(i + 1) * W])


# ---------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def timm_sd():
    arch, kwargs, make, _ = CASES["timm-cls"]
    return {k: v.numpy() for k, v in tv.randomize(make()).state_dict().items()}


def test_fused_shape_mismatch_names_the_key(timm_sd):
    kwargs = dict(CASES["timm-cls"][1], width=32)
    with pytest.raises(ConversionError) as e:
        from_torch(timm_sd, "vit", **kwargs)
    msg = str(e.value)
    assert ("blocks.0.attn.qkv.weight: checkpoint (48, 16), model expects (96, 32) (Flax "
            "params/blocks_0/attn/q/kernel (32, 32), params/blocks_0/attn/k/kernel (32, 32), "
            "params/blocks_0/attn/v/kernel (32, 32))") in msg
    assert "blocks.1.attn.qkv.bias: checkpoint (48,), model expects (96,)" in msg


def test_missing_fused_key_and_wrong_heads_layout(timm_sd):
    sd = dict(timm_sd)
    del sd["blocks.1.attn.qkv.bias"]
    with pytest.raises(ConversionError, match=r"missing keys \(1\): blocks\.1\.attn\.qkv\.bias"):
        from_torch(sd, "vit", **CASES["timm-cls"][1])
    # a torchvision checkpoint is not a timm one: every key named
    with pytest.raises(ConversionError, match=r"missing keys.*class_token.*unexpected keys.*"
                                              r"cls_token"):
        from_torch(sd, "tv_vit_b_16", **CASES["timm-cls"][1])


def test_reshaped_embedding_mismatch_names_the_key():
    case, _, sd, _, _ = _convert("open_clip-gelu")
    arch, kwargs, _, _ = CASES[case]
    bad = {**sd, "visual.class_embedding": np.zeros((W + 1,), np.float32)}
    with pytest.raises(ConversionError, match=r"visual\.class_embedding: checkpoint \(17,\), "
                                              r"model expects \(16,\) \(Flax params/cls_token "
                                              r"\(1, 1, 16\)\)"):
        from_torch(bad, arch, **kwargs)


def test_to_torch_names_the_fused_leaf_at_fault():
    arch, kwargs, _, shape = CASES["torchvision-b16"]
    variables = models.create(arch, **kwargs).init_shapes(np.zeros((1, *shape), np.float32))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    variables["params"]["blocks_0"]["attn"]["k"]["bias"] = np.zeros(W + 4, np.float32)
    with pytest.raises(ConversionError, match=r"params/blocks_0/attn/k/bias: variables \(20,\), "
                                              r"model expects \(16,\) \(torch encoder\.layers\."
                                              r"encoder_layer_0\.self_attention\.in_proj_bias\)"):
        to_torch(variables, arch, **kwargs)


def test_options_a_layout_cannot_store_are_refused():
    with pytest.raises(ValueError, match="open_clip.*head_bias"):
        from_torch({}, "clip_vit_b_16", **SMALL, patch=2, head_bias=True)
    with pytest.raises(ValueError, match="torchvision.*pool"):
        from_torch({}, "tv_vit_b_16", **SMALL, patch=2, pool="mean")


# ----------------------------------------------------------------------------- input shapes
def test_input_shape_is_inferred_and_a_wrong_one_is_explained(timm_sd):
    kwargs = CASES["timm-cls"][1]
    inferred = from_torch(timm_sd, "vit", **kwargs)
    explicit = from_torch(timm_sd, "vit", input_shape=(8, 8, 3), **kwargs)
    assert inferred["params"]["pos_embed"].shape == explicit["params"]["pos_embed"].shape
    with pytest.raises(ConversionError) as e:
        from_torch(timm_sd, "vit", input_shape=(32, 32, 3), **kwargs)
    msg = str(e.value)
    assert "pos_embed: checkpoint (1, 17, 16), model expects (1, 257, 16)" in msg
    assert "the tensors fit input_shape=(8, 8, 3)" in msg


def test_mj_load_reads_a_default_size_checkpoint_without_input_shape(tmp_path):
    """`mj.load(path, name)` with the architecture's default example (32x32x3 for `vit`)."""
    kwargs = dict(width=W, depth=1, heads=HEADS, patch=8, mlp_ratio=2.0, num_classes=3)
    net = tv.randomize(tv.TimmViT(img=32, patch=8, num_classes=3, dim=W, depth=1, heads=HEADS))
    save_state_dict(net.state_dict(), tmp_path / "vit.safetensors")
    variables = mj.load(tmp_path / "vit.safetensors", "vit", **kwargs)
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(models.create("vit", **kwargs).apply(variables, x),
                               _torch_logits(net, x), atol=1e-4, rtol=0)


def test_mj_load_infers_the_image_size_from_the_position_embedding(tmp_path):
    """A 16x16 checkpoint of `vit` (default example 32x32): the size is read off its positions."""
    kwargs = dict(width=W, depth=1, heads=HEADS, patch=4, mlp_ratio=2.0, num_classes=3)
    net = tv.randomize(tv.TimmViT(img=16, patch=4, num_classes=3, dim=W, depth=1, heads=HEADS))
    save_state_dict(net.state_dict(), tmp_path / "vit16.pt")
    variables = mj.load(tmp_path / "vit16.pt", "vit", **kwargs)
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(models.create("vit", **kwargs).apply(variables, x),
                               _torch_logits(net, x), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- full CLIP models
@pytest.fixture(scope="module")
def clip():
    net = tv.randomize(tv.OpenClip(img=8, patch=2, dim=W, depth=DEPTH, heads=HEADS,
                                   output_dim=8))
    return net, {k: v.numpy() for k, v in net.state_dict().items()}


def test_full_clip_state_dict_needs_select(clip):
    net, sd = clip
    kwargs = CASES["open_clip-gelu"][1]
    text = [k for k in sd if not k.startswith("visual.")]
    assert "text_projection" in text and "transformer.resblocks.0.attn.in_proj_weight" in text
    with pytest.raises(ConversionError) as e:
        from_torch(sd, "clip_vit_b_16", **kwargs)
    msg = str(e.value)
    assert f"unexpected keys ({len(text)})" in msg and "missing keys (0)" in msg
    assert all(k in msg for k in text) and "select='visual.'" in msg
    variables = from_torch(sd, "clip_vit_b_16", select="visual.", **kwargs)
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net.visual(_nchw(x)).numpy()
    logits = models.create("clip_vit_b_16", **kwargs).apply(variables, x)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    back = to_torch(variables, "clip_vit_b_16", **kwargs)
    assert list(back) == [k for k in sd if k.startswith("visual.")]
    with pytest.raises(ConversionError, match="no key starting with select='image.'"):
        from_torch(sd, "clip_vit_b_16", select="image.", **kwargs)


# ----------------------------------------------------------------------- the merge spec fits
def test_permuting_heads_of_a_converted_open_clip_tower_keeps_its_logits():
    case, _, _, variables, x = _convert("open_clip-quick_gelu")
    arch, kwargs, _, _ = CASES[case]
    model = models.create(arch, **kwargs)
    spec = specs.for_model(model)
    spec.check(variables)  # ln_pre on the stream, a head without bias
    assert "params/ln_pre/scale" in spec.leaves and "params/head/bias" not in spec.leaves
    rng = np.random.default_rng(0)
    hd = W // HEADS
    perms = {s.name: rng.permutation(s.width) for s in spec.spaces}
    for i in range(DEPTH):  # heads as units, channels shuffled inside each head
        perms[f"blocks_{i}/attn"] = np.concatenate(
            [h * hd + rng.permutation(hd) for h in rng.permutation(HEADS)])
    [moved] = specs.apply_merge(spec, [variables], specs.permutation_transforms(perms))
    assert not np.array_equal(moved["params"]["ln_pre"]["scale"],
                              variables["params"]["ln_pre"]["scale"])
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(moved, x), apply(variables, x), atol=1e-5)


# ------------------------------------------------------------------------------------ CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mergejax.converters", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_cli_converts_a_clip_checkpoint_and_back(tmp_path, clip):
    net, sd = clip
    torch.save(net.state_dict(), tmp_path / "clip.pt")
    flags = ["--arch", "clip_vit_b_16", "--width", W, "--num-classes", 8, "--model-arg",
             f"depth={DEPTH}", "--model-arg", f"heads={HEADS}", "--model-arg", "patch=2"]
    out = _cli("to-flax", *flags, tmp_path / "clip.pt", tmp_path / "no")
    assert out.returncode == 1 and "select='visual.'" in out.stderr
    out = _cli("to-flax", *flags, "--select", "visual.", tmp_path / "clip.pt", tmp_path / "ckpt")
    assert out.returncode == 0, out.stderr
    kwargs = CASES["open_clip-gelu"][1]
    x = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype(np.float32)
    logits = models.create("clip_vit_b_16", **kwargs).apply(checkpoint.load(tmp_path / "ckpt"), x)
    with torch.no_grad():
        np.testing.assert_allclose(logits, net.visual(_nchw(x)).numpy(), atol=1e-4, rtol=0)
    out = _cli("to-torch", tmp_path / "ckpt", tmp_path / "visual.safetensors")
    assert out.returncode == 0, out.stderr
    back = load_state_dict(tmp_path / "visual.safetensors")
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    assert sorted(back) == sorted(visual)
    for key, value in visual.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


# ------------------------------------------------------------------ the published full sizes
@pytest.mark.parametrize("arch, shapes, count", [
    ("vit_b16", {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
                 "patch_embed.proj.weight": (768, 3, 16, 16),
                 "blocks.11.attn.qkv.weight": (2304, 768), "head.weight": (1000, 768)},
     86_567_656),
    ("tv_vit_b_32", {"class_token": (1, 1, 768), "encoder.pos_embedding": (1, 50, 768),
                     "conv_proj.weight": (768, 3, 32, 32),
                     "encoder.layers.encoder_layer_11.self_attention.in_proj_bias": (2304,),
                     "encoder.layers.encoder_layer_0.mlp.3.weight": (768, 3072),
                     "heads.head.weight": (1000, 768)}, 88_224_232),  # torchvision's num_params
    ("clip_vit_b_16", {"visual.class_embedding": (768,), "visual.positional_embedding": (197, 768),
                       "visual.conv1.weight": (768, 3, 16, 16), "visual.proj": (768, 512),
                       "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
                       "visual.transformer.resblocks.0.mlp.c_fc.weight": (3072, 768)},
     86_192_640),  # open_clip ViT-B-16's visual tower
])
def test_full_size_layouts_have_the_published_shapes(arch, shapes, count):
    """The torch shapes each layout expects of a 224x224 checkpoint (no weights are made)."""
    from mergejax.converters import layout

    model = models.create(arch)
    template = traverse_util.flatten_dict(
        model.init_shapes(np.zeros((1, 224, 224, 3), np.float32)))
    parts = [p for p in layout.get(arch).build(model.module, (224, 224, 3)) if hasattr(p, "paths")]
    torch_shapes = {p.torch_key: p.torch_shape([template[q].shape for q in p.paths])
                    for p in parts}
    assert {k: torch_shapes[k] for k in shapes} == shapes
    assert sum(int(np.prod(s)) for s in torch_shapes.values()) == count
    assert layout.get(arch).infer_input_shape(model.module, torch_shapes) == (224, 224, 3)
