"""Flax models with a pure functional surface: `create(name, **kwargs) -> Model`.

Every model takes NHWC input, returns logits, and sows the activations at its feature spaces
(taps) into `intermediates`. Adding an architecture is one model file plus one spec file.
"""

from __future__ import annotations

from collections.abc import Callable

from mergejax.models.base import Model, Variables
from mergejax.models.cct import CCT
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
# torchvision's vit_b_16 / vit_b_32: the same module (eps 1e-6, 1000 classes), its own key names
_builder("tv_vit_b_16", ViT, "head", width=768, depth=12, heads=12, patch=16, num_classes=1000)
_builder("tv_vit_b_32", ViT, "head", width=768, depth=12, heads=12, patch=32, num_classes=1000)
# open_clip's ViT-B visual towers: ln_pre, eps 1e-5, no conv bias, the head is `proj` (D, 512)
# without bias; act="quick_gelu" for OpenAI's weights
_CLIP = dict(width=768, depth=12, heads=12, num_classes=512, ln_pre=True, ln_eps=1e-5,
             patch_bias=False, head_bias=False, act="gelu")
_builder("clip_vit_b_16", ViT, "head", patch=16, **_CLIP)
_builder("clip_vit_b_32", ViT, "head", patch=32, **_CLIP)

_builder("cct", CCT, "fc")
# The repository's named sizes (src/cct.py): L layers / kxC = kernel size x conv layers.
_CCT_SIZES = {2: (128, 2, 1.0), 4: (128, 2, 1.0), 6: (256, 4, 2.0), 7: (256, 4, 2.0),
              14: (384, 6, 3.0)}  # depth: (width, heads, mlp_ratio)
for _depth, _kernel, _convs, _classes in ((2, 3, 2, 10), (4, 3, 2, 10), (6, 3, 1, 10),
                                          (6, 3, 2, 10), (7, 3, 1, 10), (7, 3, 2, 10),
                                          (7, 7, 2, 102), (14, 7, 2, 1000)):
    _w, _h, _r = _CCT_SIZES[_depth]
    _builder(f"cct_{_depth}_{_kernel}x{_convs}", CCT, "fc", width=_w, depth=_depth, heads=_h,
             mlp_ratio=_r, kernel_size=_kernel, conv_layers=_convs, num_classes=_classes)


def create(name: str, **kwargs) -> Model:
    """The model registered as `name`, built with `kwargs` (e.g. `width=4, num_classes=5`)."""
    return _BUILDERS.get(name)(**kwargs)


def names() -> list[str]:
    """Registered model names."""
    return _BUILDERS.names()


__all__ = ["Model", "Variables", "create", "names"]
