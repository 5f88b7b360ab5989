"""The merged model at another width: one factor scales every feature space of a model.

Registered per model name (`resize(model, factor)`). Equal width returns the model itself.
- MLP: every hidden width times the factor (rounded, at least 1).
- ViT: the embedding width times the factor, rounded to a multiple of the head count (heads are
  kept, the head dimension changes), MLP ratio kept (so the MLP width scales too).
- ResNet-20: the integer width multiplier times the factor (must stay an integer).
- CCT: as the ViT for the embedding width (the stream, attention and MLP spaces), and the
  tokenizer's intermediate convolutions' `conv_width` times the factor (rounded, at least 1).
"""

from __future__ import annotations

from collections.abc import Callable

from mergejax.models import Model, create, names
from mergejax.registry import Registry

_RESIZERS: Registry[Callable[[Model, float], dict]] = Registry("FS-Merge width change")


def resize(model: Model, factor: float) -> Model:
    """`model` with every feature space `factor` times as wide (see the module docstring)."""
    if factor <= 0:
        raise ValueError(f"width factor must be > 0, got {factor}")
    if factor == 1:
        return model
    try:
        kwargs = _RESIZERS.get(model.name)(model, factor)
    except KeyError:
        raise KeyError(f"no width change for model {model.name!r}; models with one: "
                       f"{_RESIZERS.names()} (width 1.0 works for every model)") from None
    return create(model.name, **{**model.kwargs, **kwargs})


def _mlp(model: Model, factor: float) -> dict:
    return {"hidden": tuple(max(1, round(h * factor)) for h in model.module.hidden)}


def _vit(model: Model, factor: float) -> dict:
    heads = model.module.heads
    return {"width": heads * max(1, round(model.module.width * factor / heads))}


def _cct(model: Model, factor: float) -> dict:
    return {**_vit(model, factor), "conv_width": max(1, round(model.module.conv_width * factor))}


def _resnet(model: Model, factor: float) -> dict:
    width = model.module.width * factor
    if abs(width - round(width)) > 1e-9 or round(width) < 1:
        raise ValueError(f"ResNet width {model.module.width} x {factor} = {width} is not a "
                         "positive integer")
    return {"width": int(round(width))}


_RESIZERS.register("mlp", _mlp)
for _name in ("vit", "vit_tiny"):
    _RESIZERS.register(_name, _vit)
for _name in ("resnet20", "resnet"):
    _RESIZERS.register(_name, _resnet)
for _name in names():  # "cct" and the repository's named sizes "cct_{depth}_{k}x{convs}"
    if _name == "cct" or _name.startswith("cct_"):
        _RESIZERS.register(_name, _cct)
