"""`from_torch` / `to_torch`: a state_dict <-> Flax variables, through a registered layout.

Both directions check the tensors against the Flax model's own shape template
(`jax.eval_shape` of its init), so a checkpoint of the wrong width, depth or class count fails
with the key and both shapes instead of a broadcasting error later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util

import mergejax.converters.architectures  # noqa: F401  (registers the layouts)
from mergejax import models
from mergejax.converters import layout
from mergejax.converters.layout import Buffer, Leaf
from mergejax.converters.state_dict import normalize, to_numpy
from mergejax.io.check import check_tensors


class ConversionError(ValueError):
    """A checkpoint that does not match the model: wrong keys or wrong shapes."""


def _list(title: str, names: Sequence[str]) -> str:
    return f"{title} ({len(names)}): {', '.join(names) or '-'}"


def _shape_error(what: str, errors: list[str], limit: int = 20) -> ConversionError:
    more = [f"... and {len(errors) - limit} more"] if len(errors) > limit else []
    return ConversionError(f"shape mismatch for {what} ({len(errors)} tensors):\n  "
                           + "\n  ".join(errors[:limit] + more))


def _plan(arch: str, input_shape: Sequence[int] | None, model_kwargs: dict):
    """(parts in torch order, {flax path: ShapeDtypeStruct}) for `arch` built with `model_kwargs`.

    Raises ConversionError if the layout and the model disagree on the Flax leaves: that is a
    bug in the layout, reported as such rather than blamed on the checkpoint.
    """
    spec = layout.get(arch)
    model = models.create(arch, **model_kwargs)
    shape = tuple(input_shape or spec.input_shape)
    parts = spec.build(model.module, shape)
    template = traverse_util.flatten_dict(model.init_shapes(np.zeros((1, *shape), np.float32)))
    paths = {p.path for p in parts if isinstance(p, Leaf)}
    if paths != set(template):
        raise ConversionError(
            f"layout {arch!r} does not cover the Flax model {model_kwargs}: "
            + _list("layout only", sorted("/".join(p) for p in paths - set(template))) + "; "
            + _list("model only", sorted("/".join(p) for p in set(template) - paths)))
    return parts, template


def _describe(arch: str, model_kwargs: dict, input_shape) -> str:
    shape = f", input_shape={tuple(input_shape)}" if input_shape else ""
    return f"{arch}({', '.join(f'{k}={v!r}' for k, v in model_kwargs.items())}{shape})"


def from_torch(state_dict: Mapping, arch: str, *, input_shape: Sequence[int] | None = None,
               allow_nonfinite: bool = False, **model_kwargs) -> dict:
    """Flax variables `{'params': ..., 'batch_stats': ...}` (numpy float32) from a torch state_dict.

    Args:
      state_dict: `{torch key: tensor}` (torch tensors or numpy arrays; conv weights (O, I, kh, kw),
        linear weights (out, in)); a checkpoint dict wrapping one under `state_dict` / `model` /
        `net` and DataParallel `module.` prefixes are accepted. `num_batches_tracked` is ignored.
        Every other tensor must be floating point and finite (`mergejax.io.check`).
      arch: the model's name in `mergejax.models.create` (see `layout.names()`).
      input_shape: one example (H, W, C); only needed where it changes parameter shapes or
        flatten order (the MLP's first layer; defaults per architecture).
      allow_nonfinite: accept NaN/inf values (refused by default, naming the key).
      **model_kwargs: the model's arguments (`width`, `num_classes`, ...).

    Returns variables such that `create(arch, **model_kwargs).apply(variables, x_nhwc)` equals
    the torch model's eval-mode logits on `x_nchw`. Conv kernels are (kh, kw, I, O), Dense
    kernels (in, out).
    Raises ConversionError listing all missing and unexpected keys at once, or every tensor whose
    shape does not match with both shapes.
    """
    parts, template = _plan(arch, input_shape, model_kwargs)
    what = _describe(arch, model_kwargs, input_shape)
    sd = check_tensors(normalize(state_dict), "state_dict", allow_nonfinite=allow_nonfinite)
    leaves = [p for p in parts if isinstance(p, Leaf)]
    known = {p.torch_key for p in parts}
    missing = [leaf.torch_key for leaf in leaves if leaf.torch_key not in sd]
    unexpected = [k for k in sd if k not in known]
    if missing or unexpected:
        raise ConversionError(f"state_dict does not match {what}: "
                              + _list("missing keys", missing) + "; "
                              + _list("unexpected keys", unexpected))
    errors, flat = [], {}
    for leaf in leaves:
        want = template[leaf.path]
        torch_shape = leaf.transform.torch_shape(want.shape)
        got = sd[leaf.torch_key]
        if got.shape != torch_shape:
            errors.append(f"{leaf.torch_key}: checkpoint {tuple(got.shape)}, model expects "
                          f"{torch_shape} (Flax {'/'.join(leaf.path)} {tuple(want.shape)})")
            continue
        flat[leaf.path] = np.asarray(leaf.transform.to_flax(got), want.dtype, order="C")
    if errors:
        raise _shape_error(what, errors)
    return traverse_util.unflatten_dict(flat)


def to_torch(variables: Mapping, arch: str, *, input_shape: Sequence[int] | None = None,
             num_batches_tracked: int = 0, as_torch: bool = False, **model_kwargs) -> dict:
    """A torch state_dict `{key: array}` (torch's key order and layouts) from Flax variables.

    Args:
      variables: `{'params': ..., 'batch_stats': ...}` of `create(arch, **model_kwargs)`.
      arch, input_shape, **model_kwargs: as for `from_torch`.
      num_batches_tracked: the value written to every BatchNorm's `num_batches_tracked`
        (int64 scalar; Flax does not count steps).
      as_torch: return torch tensors instead of numpy arrays (imports torch).

    Raises ConversionError for missing / unexpected Flax leaves (one error) or wrong shapes.
    """
    parts, template = _plan(arch, input_shape, model_kwargs)
    what = _describe(arch, model_kwargs, input_shape)
    flat = traverse_util.flatten_dict(dict(variables))
    leaves = [p for p in parts if isinstance(p, Leaf)]
    missing = ["/".join(leaf.path) for leaf in leaves if leaf.path not in flat]
    unexpected = ["/".join(p) for p in flat if p not in template]
    if missing or unexpected:
        raise ConversionError(f"variables do not match {what}: " + _list("missing", missing)
                              + "; " + _list("unexpected", unexpected))
    errors, sd = [], {}
    for part in parts:  # in torch's state_dict order
        if isinstance(part, Buffer):
            sd[part.torch_key] = np.asarray(num_batches_tracked, np.int64)
            continue
        value, want = to_numpy(flat[part.path]), template[part.path]
        if value.shape != want.shape:
            errors.append(f"{'/'.join(part.path)}: variables {tuple(value.shape)}, model expects "
                          f"{tuple(want.shape)} (torch {part.torch_key})")
            continue
        sd[part.torch_key] = np.asarray(part.transform.to_torch(value), order="C")
    if errors:
        raise _shape_error(what, errors)
    if as_torch:
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    return sd
