"""mergejax: merging neural networks without retraining, in JAX/Flax.

The public API (`mergejax.api`), importable from the top level:

- `model(arch, **kwargs)`: an architecture; `load(path, arch, **kwargs)`: its variables from an
  orbax checkpoint, a PyTorch `.pt` or a `.safetensors` file;
- `merge(method, model, endpoints, data=..., spaces=..., repair=..., **hparams)`: matching
  merges (zipit, permute, mudsc, weight_matching, average) of models from different
  initialisations; `merge_weights(method, base, finetuned, **hparams)`: weight-space merges
  (task_arithmetic, ties, dare, tall_masks, consensus, ...) of fine-tuned models;
- `evaluate(model, variables, images, labels, tasks)`, `predict(...)`: ZipIt!'s metrics;
- `save(variables, path, arch=...)`: orbax, torch `.pt` or `.safetensors`.

Attributes are imported on first use, so `import mergejax.kernels` stays light.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["evaluate", "load", "merge", "merge_weights", "model", "predict", "save"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("mergejax.api"), name)
    raise AttributeError(f"module 'mergejax' has no attribute {name!r}")
