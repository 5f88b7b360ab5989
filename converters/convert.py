"""`from_torch` / `to_torch`: a state_dict <-> Flax variables, through a registered layout.

Both directions check the tensors against the Flax model's own shape template
(`jax.eval_shape` of its init), so a checkpoint of the wrong width, depth or class count fails
with the key and both shapes instead of a broadcasting error later. A layout part is a `Leaf`
(one torch tensor, one Flax leaf), a `Fused` tensor (one torch tensor, several Flax leaves, e.g.
a fused qkv) or a torch-only `Buffer`; all tensor parts go through the same code below.

Where the layout can read the example input shape off the tensors (a ViT: position-embedding
count and patch size), `input_shape=None` means "the shape the checkpoint was made for".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

import mergejax.converters.architectures  # noqa: F401  (registers the layouts)
import mergejax.converters.cct_layout  # noqa: F401
import mergejax.converters.vit_layouts  # noqa: F401
from mergejax import models
from mergejax.converters import layout
from mergejax.converters.layout import Buffer, Part, Tensor
from mergejax.converters.state_dict import normalize, to_numpy
from mergejax.io.check import check_tensors


class ConversionError(ValueError):
    """A checkpoint that does not match the model: wrong keys or wrong shapes."""


def _list(title: str, names: Sequence[str]) -> str:
    return f"{title} ({len(names)}): {', '.join(names) or '-'}"


def _shape_error(what: str, errors: list[str], hint: str = "", limit: int = 20
                 ) -> ConversionError:
    more = [f"... and {len(errors) - limit} more"] if len(errors) > limit else []
    return ConversionError(f"shape mismatch for {what} ({len(errors)} tensors):\n  "
                           + "\n  ".join(errors[:limit] + more) + hint)


def _tensors(parts: Sequence[Part]) -> list[Tensor]:
    return [p for p in parts if not isinstance(p, Buffer)]


def _path(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _plan(arch: str, input_shape: Sequence[int] | None, model_kwargs: dict,
          torch_shapes: Callable[[list[Part]], Mapping[str, tuple]]):
    """(parts in torch order, {flax path: ShapeDtypeStruct}, the input shape used, the input
    shape inferred from `torch_shapes(parts)` or None) for `arch` built with `model_kwargs`.

    The input shape is `input_shape`, else the one the layout infers from the tensors, else
    the registered default. Raises ConversionError if the layout and the model disagree on the
    Flax leaves: that is a bug in the layout, reported as such rather than blamed on the
    checkpoint.
    """
    spec = layout.get(arch)
    model = models.create(arch, **model_kwargs)
    inferred = None
    if spec.infer_input_shape is not None:
        draft = spec.build(model.module, spec.input_shape)
        inferred = spec.infer_input_shape(model.module, torch_shapes(draft))
    shape = tuple(input_shape or inferred or spec.input_shape)
    parts = spec.build(model.module, shape)
    template = traverse_util.flatten_dict(model.init_shapes(np.zeros((1, *shape), np.float32)))
    paths = {p for part in _tensors(parts) for p in part.paths}
    if paths != set(template):
        raise ConversionError(
            f"layout {arch!r} does not cover the Flax model {model_kwargs}: "
            + _list("layout only", sorted(_path(p) for p in paths - set(template))) + "; "
            + _list("model only", sorted(_path(p) for p in set(template) - paths)))
    return parts, template, shape, inferred


def _describe(arch: str, model_kwargs: dict, input_shape) -> str:
    return (f"{arch}({', '.join(f'{k}={v!r}' for k, v in model_kwargs.items())}, "
            f"input_shape={tuple(input_shape)})")


def _shape_hint(shape: tuple, inferred: tuple | None) -> str:
    if inferred is None or tuple(inferred) == tuple(shape):
        return ""
    return (f"\n(the tensors fit input_shape={tuple(inferred)}: pass that input_shape, or none "
            f"to have it inferred)")


def _prefix_hint(parts: Sequence[Part], unexpected: Sequence[str]) -> str:
    """A hint when the layout lives under one prefix (open_clip's `visual.`) and the checkpoint
    holds more (a full CLIP model: the text tower too)."""
    heads = {p.torch_key.split(".", 1)[0] for p in parts}
    if len(heads) != 1 or "." not in parts[0].torch_key:
        return ""
    prefix = f"{heads.pop()}."
    if not any(not k.startswith(prefix) for k in unexpected):
        return ""
    return (f". The model is the {prefix!r} part of this checkpoint: pass select={prefix!r} "
            f"(CLI --select {prefix}) to convert only the keys starting with {prefix!r}")


def from_torch(state_dict: Mapping, arch: str, *, input_shape: Sequence[int] | None = None,
               select: str | None = None, allow_nonfinite: bool = False,
               **model_kwargs) -> dict:
    """Flax variables `{'params': ..., 'batch_stats': ...}` (numpy float32) from a torch state_dict.

    Args:
      state_dict: `{torch key: tensor}` (torch tensors or numpy arrays; conv weights (O, I, kh, kw),
        linear weights (out, in)); a checkpoint dict wrapping one under `state_dict` / `model` /
        `net` and DataParallel `module.` prefixes are accepted. `num_batches_tracked` is ignored.
        Every other tensor must be floating point and finite (`mergejax.io.check`).
      arch: the model's name in `mergejax.models.create` (see `layout.names()`).
      input_shape: one example (H, W, C); only needed where it changes parameter shapes or
        flatten order (the MLP's first layer; a ViT's position embeddings). None: inferred from
        the tensors where the layout can (ViTs), else the architecture's default.
      select: keep only the keys starting with this prefix (unchanged) and ignore the rest, e.g.
        "visual." to take open_clip's image tower out of a full CLIP state_dict (whose text
        tower is otherwise reported as unexpected keys).
      allow_nonfinite: accept NaN/inf values (refused by default, naming the key).
      **model_kwargs: the model's arguments (`width`, `num_classes`, ...).

    Returns variables such that `create(arch, **model_kwargs).apply(variables, x_nhwc)` equals
    the torch model's eval-mode logits on `x_nchw`. Conv kernels are (kh, kw, I, O), Dense
    kernels (in, out).
    Raises ConversionError listing all missing and unexpected keys at once, or every tensor whose
    shape does not match with both shapes.
    """
    layout.get(arch)  # an unknown architecture fails first, listing the known ones
    sd = normalize(state_dict)
    if select is not None:
        sd = {k: v for k, v in sd.items() if k.startswith(select)}
        if not sd:
            raise ConversionError(f"state_dict has no key starting with select={select!r}")
    sd = check_tensors(sd, "state_dict", allow_nonfinite=allow_nonfinite)
    parts, template, shape, inferred = _plan(
        arch, input_shape, model_kwargs, lambda _: {k: tuple(v.shape) for k, v in sd.items()})
    what = _describe(arch, model_kwargs, shape)
    tensors = _tensors(parts)
    known = {p.torch_key for p in parts}
    missing = [t.torch_key for t in tensors if t.torch_key not in sd]
    unexpected = [k for k in sd if k not in known]
    if missing or unexpected:
        raise ConversionError(f"state_dict does not match {what}: "
                              + _list("missing keys", missing) + "; "
                              + _list("unexpected keys", unexpected)
                              + _prefix_hint(parts, unexpected))
    errors, flat = [], {}
    for t in tensors:
        wants = [template[p] for p in t.paths]
        torch_shape = t.torch_shape([w.shape for w in wants])
        got = sd[t.torch_key]
        if got.shape != torch_shape:
            flax = ", ".join(f"{_path(p)} {tuple(w.shape)}" for p, w in zip(t.paths, wants))
            errors.append(f"{t.torch_key}: checkpoint {tuple(got.shape)}, model expects "
                          f"{torch_shape} (Flax {flax})")
            continue
        for path, want, value in zip(t.paths, wants, t.to_flax(got)):
            flat[path] = np.asarray(value, want.dtype, order="C")
    if errors:
        raise _shape_error(what, errors, _shape_hint(shape, inferred))
    return traverse_util.unflatten_dict(flat)


def _torch_shapes(parts: Sequence[Part], flat: Mapping) -> dict[str, tuple]:
    """{torch key: shape} the Flax leaves in `flat` would be exported as (where they fit)."""
    shapes = {}
    for t in _tensors(parts):
        if all(p in flat for p in t.paths):
            try:
                shapes[t.torch_key] = t.torch_shape([np.shape(flat[p]) for p in t.paths])
            except ValueError:  # fused leaves of unequal shapes: reported by the shape check
                pass
    return shapes


def to_torch(variables: Mapping, arch: str, *, input_shape: Sequence[int] | None = None,
             num_batches_tracked: int = 0, as_torch: bool = False, **model_kwargs) -> dict:
    """A torch state_dict `{key: array}` (torch's key order and layouts) from Flax variables.

    Args:
      variables: `{'params': ..., 'batch_stats': ...}` of `create(arch, **model_kwargs)`.
      arch, input_shape, **model_kwargs: as for `from_torch` (None infers the input shape from
        the variables where the layout can).
      num_batches_tracked: the value written to every BatchNorm's `num_batches_tracked`
        (int64 scalar; Flax does not count steps).
      as_torch: return torch tensors instead of numpy arrays (imports torch).

    Raises ConversionError for missing / unexpected Flax leaves (one error) or wrong shapes.
    """
    flat = traverse_util.flatten_dict(dict(variables))
    parts, template, shape, inferred = _plan(arch, input_shape, model_kwargs,
                                             lambda draft: _torch_shapes(draft, flat))
    what = _describe(arch, model_kwargs, shape)
    tensors = _tensors(parts)
    missing = [_path(p) for t in tensors for p in t.paths if p not in flat]
    unexpected = [_path(p) for p in flat if p not in template]
    if missing or unexpected:
        raise ConversionError(f"variables do not match {what}: " + _list("missing", missing)
                              + "; " + _list("unexpected", unexpected))
    errors, sd = [], {}
    for part in parts:  # in torch's state_dict order
        if isinstance(part, Buffer):
            sd[part.torch_key] = np.asarray(num_batches_tracked, np.int64)
            continue
        values = [to_numpy(flat[p]) for p in part.paths]
        bad = [f"{_path(p)}: variables {tuple(v.shape)}, model expects "
               f"{tuple(template[p].shape)} (torch {part.torch_key})"
               for p, v in zip(part.paths, values) if v.shape != template[p].shape]
        if bad:
            errors += bad
            continue
        sd[part.torch_key] = np.asarray(part.to_torch(values), order="C")
    if errors:
        raise _shape_error(what, errors, _shape_hint(shape, inferred))
    if as_torch:
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    return sd
