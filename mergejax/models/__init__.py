"""Flax models with a pure functional surface: `create(name, **kwargs) -> Model`.

Every model takes NHWC input, returns logits, and sows the activations at its feature spaces
(taps) into `intermediates`. Adding an architecture is one model file plus one spec file.
"""

from __future__ import annotations

from collections.abc import Callable

from mergejax.models.base import Model, Variables
from mergejax.models.mlp import MLP
from mergejax.models.resnet import ResNet
from mergejax.models.resnet50 import ResNet50
from mergejax.models.tv_vgg import TorchvisionVGG
from mergejax.models.vgg import VGG
from mergejax.models.vit import ViT
from mergejax.registry import Registry

_BUILDERS: Registry[Callable[..., Model]] = Registry("model")


def _builder(name: str, module_cls, head: str, **fixed):
    def build(**kwargs) -> Model:
        kwargs = {**fixed, **kwargs}
        try:
            module = module_cls(**kwargs)
        except TypeError as e:
            raise TypeError(f"model {name!r}: {e}") from None
        return Model(name, module, dict(kwargs), head)

    _BUILDERS.register(name, build)


_builder("mlp", MLP, "linear")
_builder("resnet20", ResNet, "linear", depth=20)
_builder("resnet", ResNet, "linear")
_builder("vgg11", VGG, "classifier", depth=11)
_builder("vgg16", VGG, "classifier", depth=16)
_builder("resnet50", ResNet50, "fc")
_builder("tv_vgg16", TorchvisionVGG, "classifier_6", depth=16, batch_norm=False)
_builder("tv_vgg16_bn", TorchvisionVGG, "classifier_6", depth=16, batch_norm=True)
_builder("vit", ViT, "head")
# patch 2 suits the 8x8 digits; pass patch=4 for 28x28 images
_builder("vit_tiny", ViT, "head", width=32, depth=2, heads=4, patch=2, mlp_ratio=2.0)
_builder("vit_b16", ViT, "head", width=768, depth=12, heads=12, patch=16, num_classes=1000)
_builder("vit_b32", ViT, "head", width=768, depth=12, heads=12, patch=32, num_classes=1000)


def create(name: str, **kwargs) -> Model:
    """The model registered as `name`, built with `kwargs` (e.g. `width=4, num_classes=5`)."""
    return _BUILDERS.get(name)(**kwargs)


def names() -> list[str]:
    """Registered model names."""
    return _BUILDERS.names()


__all__ = ["Model", "Variables", "create", "names"]
