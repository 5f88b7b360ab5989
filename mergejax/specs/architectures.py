"""Merge specs of the built-in architectures, by model name (`for_model(model)`)."""

from __future__ import annotations

from collections.abc import Callable

from mergejax.models import Model
from mergejax.models.vgg import CONFIGS
from mergejax.registry import Registry
from mergejax.specs.spec import MergeSpec, SpecBuilder

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
