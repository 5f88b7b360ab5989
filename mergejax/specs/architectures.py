"""Merge specs of the built-in architectures, by model name (`for_model(model)`)."""

from __future__ import annotations

from collections.abc import Callable

from mergejax.models import Model
from mergejax.models.vgg import CONFIGS
from mergejax.registry import Registry
from mergejax.specs.spec import Axis, MergeSpec, SpecBuilder

_SPECS: Registry[Callable[[Model], MergeSpec]] = Registry("merge spec")


def for_model(model: Model) -> MergeSpec:
    """The merge spec of `model` (KeyError listing the architectures that have one)."""
    return _SPECS.get(model.name)(model)


def names() -> list[str]:
    """Model names that have a merge spec."""
    return _SPECS.names()


def register(name: str):
    """Decorator registering a spec builder `fn(model) -> MergeSpec` for model `name`."""
    return _SPECS.decorator(name)


@register("mlp")
def mlp_spec(model: Model) -> MergeSpec:
    """One space per hidden layer; the head consumes the last."""
    b = SpecBuilder()
    prev = None
    for i, width in enumerate(model.module.hidden):
        space = b.space(f"hidden{i}", width, f"hidden{i}", pre_tap=f"pre_hidden{i}")
        b.dense(f"dense_{i}", prev, space)
        prev = space
    b.head("linear", prev)
    return b.build()


def _resnet_spec(model: Model) -> MergeSpec:
    """ZipIt! ResNet: one space per residual stage stream (stem + stage 1 share the first),
    one per block's inner channels. Shortcut convs consume the previous stream."""
    m = model.module
    b = SpecBuilder()
    stream = None
    for stage, planes in enumerate((16, 32, 64), start=1):
        width = planes * m.width
        inners = []
        for block in range(m.blocks_per_stage):
            name = f"layer{stage}_{block}/inner"
            inners.append(b.space(name, width, tap=name))
        new_stream = b.space(f"stream{stage}", width, f"stream{stage}")
        if stage == 1:
            b.conv("conv1", None, new_stream)
            b.norm("bn1", new_stream)
        for block, inner in enumerate(inners):
            name = f"layer{stage}_{block}"
            src = stream if block == 0 and stage > 1 else new_stream
            b.conv(f"{name}/conv1", src, inner)
            b.norm(f"{name}/bn1", inner)
            b.conv(f"{name}/conv2", inner, new_stream)
            b.norm(f"{name}/bn2", new_stream)
            if block == 0 and stage > 1:
                b.conv(f"{name}/shortcut_conv", stream, new_stream)
                b.norm(f"{name}/shortcut_bn", new_stream)
        stream = new_stream
    b.head("linear", stream)
    return b.build()


register("resnet20")(_resnet_spec)
register("resnet")(_resnet_spec)


def _vgg_spec(model: Model) -> MergeSpec:
    """One space per conv layer; the classifier consumes the last (1x1 final map)."""
    m = model.module
    b = SpecBuilder()
    prev = None
    channels = [c * m.width for c in CONFIGS[m.depth] if c != "M"]
    for k, width in enumerate(channels):
        space = b.space(f"act_{k}", width, f"act_{k}", pre_tap=f"pre_act_{k}")
        b.conv(f"conv_{k}", prev, space, bias=True)
        if m.batch_norm:
            b.norm(f"bn_{k}", space)
        prev = space
    b.head("classifier", prev)
    return b.build()


register("vgg11")(_vgg_spec)
register("vgg16")(_vgg_spec)


@register("resnet50")
def resnet50_spec(model: Model) -> MergeSpec:
    """torchvision ResNet-50: the stem's channels, one space per stage stream (every block's conv3
    and the stage's downsample produce it), two inner spaces per Bottleneck."""
    m = model.module
    b = SpecBuilder()
    prev = b.space("stem", m.planes(1), "stem")
    b.conv("conv1", None, prev)
    b.norm("bn1", prev)
    for stage, blocks in enumerate(m.stage_sizes, start=1):
        planes = m.planes(stage)
        inners = [(b.space(f"layer{stage}_{k}/inner1", planes, f"layer{stage}_{k}/inner1"),
                   b.space(f"layer{stage}_{k}/inner2", planes, f"layer{stage}_{k}/inner2"))
                  for k in range(blocks)]
        stream = b.space(f"stream{stage}", planes * 4, f"stream{stage}")
        for k, (inner1, inner2) in enumerate(inners):
            name = f"layer{stage}_{k}"
            src = prev if k == 0 else stream
            b.conv(f"{name}/conv1", src, inner1)
            b.norm(f"{name}/bn1", inner1)
            b.conv(f"{name}/conv2", inner1, inner2)
            b.norm(f"{name}/bn2", inner2)
            b.conv(f"{name}/conv3", inner2, stream)
            b.norm(f"{name}/bn3", stream)
            if k == 0:
                b.conv(f"{name}/downsample_conv", src, stream)
                b.norm(f"{name}/downsample_bn", stream)
        prev = stream
    b.head("fc", prev)
    return b.build()


def vit_spec(model: Model) -> MergeSpec:
    """ViT (`mergejax.models.vit`): one residual stream, and per block one attention space and
    one MLP hidden space.

    - `stream` (width D) is shared by everything that reads or writes the residual stream: the
      patch embedding's outputs, the class token, the position embeddings, `ln_pre` (open_clip;
      if set), every LayerNorm's scale and bias, the projections that write it (attn/proj,
      mlp/fc2), those that read it (attn/q, k, v, mlp/fc1), the final LayerNorm, and the head
      (which consumes it; with or without a bias).
    - `blocks_{i}/attn` (D, `groups=heads`): produced by q, k and v (kernels and biases) alike,
      consumed by attn/proj. Group matching moves heads as units, so head h of the merged model
      reads one head of each endpoint, in q, k and v alike.
    - `blocks_{i}/mlp` (D * mlp_ratio): produced by fc1, consumed by fc2; its `pre_tap` (fc1's
      output before the GELU) is where REPAIR rescales (folded into fc1).

    Why one tied attention space. Head h's attention pattern (from q_h and k_h) weighs head h's
    values, so a function-preserving alignment must pair heads the same way in q/k and in v/proj.
    Two independent head-grouped spaces (query/key, value/output, as in MuDSC's ViT spec) are
    matched independently and pair heads differently (e.g. query/key head order [0, 2, 3, 1]
    against value head order [1, 0, 3, 2]): on digits 5+5 (`configs/digits_vit.py`) model B moved
    by its own MuDSC-permute alignment fell from 97.8% to 51.7%, and the tied space merged better
    in every MuDSC setting tried (task avg, permute fix_rate 0: 34.1 -> 44.4; zip fix_rate 0:
    46.9 -> 53.8). The price of the simple spec: inside a head, v's channels are permuted with q's
    and k's, although any within-head permutation of v (with proj's input) would keep the
    function independently of q/k's. The finer spec -- one head pairing shared by a query/key and
    a value/output space, each with its own within-head permutations -- needs a spec-level tie
    between spaces, which is not built.

    Taps. `stream` pools the residual stream after the embedding and after every block, all
    tokens (B*T*(depth+1) rows): one transform acts on the stream at every depth, so every depth
    should vote; ZipIt! likewise observes a ResNet stream where its layers read it. MuDSC's code
    instead hooks the head's input (the final-LayerNorm class token; tap `head_input`), which sees
    one token of the last block only. `attn` pools, as rows of one D-wide feature, the queries,
    the keys and the attention output (attn/proj's input, each head a mix of that head's values)
    of every token (tap `blocks_{i}/attn/qko`), so its statistics see every role of the space
    (MuDSC's ViT builder hooks the keys only, its Swin builder queries and keys, and proj's input
    separately); `mlp` is the post-GELU hidden (fc2's input).
    """
    m = model.module
    d = m.width
    b = SpecBuilder()
    stream = b.space("stream", d, "stream")
    b.conv("patch_embed", None, stream, bias=m.patch_bias)
    if m.pool == "cls":
        b.leaf("params/cls_token", Axis(2, stream, True))
    b.leaf("params/pos_embed", Axis(2, stream, True))
    if m.ln_pre:  # open_clip's LayerNorm on the embedding: scale and bias along the stream
        b.norm("ln_pre", stream, running_stats=False)
    for i in range(m.depth):
        blk = f"blocks_{i}"
        attn = b.space(f"{blk}/attn", d, f"{blk}/attn/qko", groups=m.heads)
        mlp = b.space(f"{blk}/mlp", m.mlp_hidden, f"{blk}/mlp/hidden",
                      pre_tap=f"{blk}/mlp/pre_hidden")
        b.norm(f"{blk}/norm1", stream, running_stats=False)
        for name in ("q", "k", "v"):
            b.dense(f"{blk}/attn/{name}", stream, attn)
        b.dense(f"{blk}/attn/proj", attn, stream)
        b.norm(f"{blk}/norm2", stream, running_stats=False)
        b.dense(f"{blk}/mlp/fc1", stream, mlp)
        b.dense(f"{blk}/mlp/fc2", mlp, stream)
    b.norm("norm", stream, running_stats=False)
    b.head("head", stream, bias=m.head_bias)
    return b.build()


for _name in ("vit", "vit_tiny", "vit_b16", "vit_b32", "tv_vit_b_16", "tv_vit_b_32",
              "clip_vit_b_16", "clip_vit_b_32"):
    register(_name)(vit_spec)


def cct_spec(model: Model) -> MergeSpec:
    """CCT (`mergejax.models.cct`): the tokenizer's intermediate channel spaces, one residual
    stream, and per block one attention space and one MLP hidden space.

    - `tokenizer/conv_{j}` (`conv_width`), j < conv_layers - 1: produced by convolution j,
      consumed by convolution j+1; no `pre_tap`, since the convolutions have no bias for REPAIR
      to fold a shift into.
    - `stream` (width D) is shared by everything that reads or writes the residual stream: the
      last tokenizer convolution (whose output channels are the tokens), the positions
      (learnable or the sine table alike: both are added to the stream), every LayerNorm's scale
      and bias (pre_norm, norm1, norm), the projections that write it (attn/proj, mlp/fc2),
      those that read it (attn/q, k, v, mlp/fc1), the sequence pooling's `attention_pool` and the
      classifier `fc`. CCT's norm1 *replaces* the stream by its normalisation, which a channel
      permutation (with norm1's scale and bias) commutes with, so it stays one space.
    - `blocks_{i}/attn` (D, `groups=heads`): produced by q, k and v (kernels only: the fused
      `qkv` has no bias), consumed by attn/proj; one tied head pairing for all four, for the
      reasons given in `vit_spec`.
    - `blocks_{i}/mlp` (D * mlp_ratio): produced by fc1, consumed by fc2; REPAIR rescales fc1's
      output (`pre_tap`).
    - `attention_pool` (Linear(D, 1)) consumes the stream and produces one token score, which no
      merge touches: like the classifier it is a tail, kept per model with the unmerge folded
      into its input (each task's merged model pools with its own endpoint's scorer; the shared
      trunk ends at the final `norm`).

    Taps. `stream` pools, as rows of one D-wide feature, the residual stream wherever a layer
    reads it: the tokens with positions (block 0's input), and per block norm1's output (read by
    fc1 and carried by the MLP's residual) and the block's output (read by the next pre_norm and
    carried by its attention residual), every token (B*T*(2*depth+1) rows). One transform acts
    on the stream at every depth, so every depth votes, as in `vit_spec`; since norm1
    renormalises the stream in every block, its scale does not grow with depth as a pre-norm
    ViT's does, and later depths do not outweigh earlier ones in the pooled statistics.
    The final norm's output is seen only through `head_input` (the pooled features `fc` reads).
    `attn` pools the queries, keys and attention output of every token; `mlp` is fc1's output
    after the GELU; the tokenizer spaces are the ReLU-and-max-pooled maps the next convolution
    reads.
    """
    m = model.module
    d = m.width
    b = SpecBuilder()
    prev = None
    for j in range(m.conv_layers):  # the last convolution writes the stream's tokens
        out = (b.space("stream", d, "stream") if j == m.conv_layers - 1 else
               b.space(f"tokenizer/conv_{j}", m.conv_width, f"tokenizer/act_{j}"))
        b.conv(f"tokenizer/conv_{j}", prev, out)
        prev = out
    stream = prev
    if m.positional != "none":
        b.leaf("params/positional_emb", Axis(2, stream, True))
    for i in range(m.depth):
        blk = f"blocks_{i}"
        attn = b.space(f"{blk}/attn", d, f"{blk}/attn/qko", groups=m.heads)
        mlp = b.space(f"{blk}/mlp", m.mlp_hidden, f"{blk}/mlp/hidden",
                      pre_tap=f"{blk}/mlp/pre_hidden")
        b.norm(f"{blk}/pre_norm", stream, running_stats=False)
        for name in ("q", "k", "v"):
            b.dense(f"{blk}/attn/{name}", stream, attn, bias=False)
        b.dense(f"{blk}/attn/proj", attn, stream)
        b.norm(f"{blk}/norm1", stream, running_stats=False)
        b.dense(f"{blk}/mlp/fc1", stream, mlp)
        b.dense(f"{blk}/mlp/fc2", mlp, stream)
    b.norm("norm", stream, running_stats=False)
    b.head("attention_pool", stream)  # a tail: consumes the stream, its one score is not merged
    b.head("fc", stream)
    return b.build()


for _name in ("cct", "cct_2_3x2", "cct_4_3x2", "cct_6_3x1", "cct_6_3x2", "cct_7_3x1",
              "cct_7_3x2", "cct_7_7x2", "cct_14_7x2"):
    register(_name)(cct_spec)
