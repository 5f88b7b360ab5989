"""The public Python API: load checkpoints, merge, evaluate, save, in a few lines.

    import mergejax as mj

    model = mj.model("resnet20", width=4, num_classes=5)
    a, b = mj.load("a.pt", model), mj.load("b.pt", model)
    merged = mj.merge("zipit", model, [a, b], data=images, repair=True, alpha=0.5, beta=1.0)
    print(mj.evaluate(model, merged, test_x, test_y, tasks=[(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]))
    mj.save(merged[0], "merged.safetensors", arch=model)

Images are NHWC float arrays (N, H, W, C), normalised the way the endpoints were trained.
Everything here is a thin layer over the library's modules (`mergejax.merging`, `.repair`,
`.evaluate`, `.model_io`), which tests and runs call directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mergejax import evaluation as evaluate_lib
from mergejax import merging, methods, model_io, models, specs
from mergejax import repair as repair_lib  # `merge` has an argument named repair
from mergejax.data import image_batches
from mergejax.models import Model, Variables
from mergejax.statistics import StatisticsCache

Images = np.ndarray | Iterable[np.ndarray]


def model(arch: str, **model_kwargs) -> Model:
    """The architecture `arch` built with `model_kwargs` (`width`, `num_classes`, ...);
    `mergejax.models.names()` lists the architectures."""
    return models.create(arch, **model_kwargs)


def _as_model(arch: str | Model, model_kwargs: Mapping[str, Any]) -> Model:
    if isinstance(arch, Model):
        if model_kwargs:
            raise TypeError(f"arch is already a built model; drop the arguments "
                            f"{sorted(model_kwargs)} or pass the architecture's name")
        return arch
    return models.create(arch, **model_kwargs)


def _default_input_shape(m: Model) -> tuple[int, ...]:
    from mergejax.converters import layout  # the per-architecture default example shape

    return layout.get(m.name).input_shape if m.name in layout.names() else (32, 32, 3)


def load(path: str | os.PathLike, arch: str | Model, *,
         input_shape: Sequence[int] | None = None, allow_nonfinite: bool = False,
         **model_kwargs) -> Variables:
    """Flax variables `{'params', 'batch_stats'}` of `arch` read from `path`.

    Args:
      path: an orbax checkpoint directory (written by `save` or a run), or a PyTorch
        state_dict file `.pt/.pth/.bin` (read with `weights_only=True`) or `.safetensors`, in
        the original repository's layout (`python -m mergejax.converters --help` lists them).
      arch: a model name (then `model_kwargs` build it) or a model from `mergejax.model`.
      input_shape: one example (H, W, C) where it changes parameter shapes (the MLP, a ViT's
        positions); default: read off a torch checkpoint where it can be (a ViT's position
        embedding), else per architecture.
      allow_nonfinite: accept NaN/inf weights. By default every tensor must be floating point
        (float16/bfloat16 are upcast to float32) and finite; a ValueError names the file, the
        key and the number of bad values.
    """
    m = _as_model(arch, model_kwargs)
    if input_shape is None and Path(path).suffix in model_io.TORCH_SUFFIXES:
        # the converter infers it where the checkpoint tells (ViT positions), else its default
        return model_io.load_endpoint(path, m, None, allow_nonfinite=allow_nonfinite)
    shape = tuple(input_shape or _default_input_shape(m))
    return model_io.load_endpoint(path, m, np.zeros((1, *shape), np.float32),
                                  allow_nonfinite=allow_nonfinite)


def _check_images(m: Model, variables: Variables, x: np.ndarray, what: str) -> None:
    """Raises ValueError unless `x` is an NHWC batch this model accepts."""
    if not isinstance(x, np.ndarray | jax.Array) or x.ndim != 4:
        shape = getattr(x, "shape", None)
        raise ValueError(
            f"{what}: expected an array of images (N, H, W, C) (NHWC) or an iterable of such "
            f"batches, got {type(x).__name__}" + (f" of shape {tuple(shape)}" if shape else "")
            + (". A list of single images (H, W, C) is not a batch: np.stack them"
               if shape is not None and len(shape) == 3 else ""))
    try:
        jax.eval_shape(m.apply, variables, jax.ShapeDtypeStruct((1, *x.shape[1:]), np.float32))
    except Exception as e:  # any shape error from inside the model
        hint = ""
        if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
            hint = (f"; this looks like NCHW (torch's layout): pass "
                    f"x.transpose(0, 2, 3, 1) of shape {(x.shape[0], *x.shape[2:], x.shape[1])}")
        raise ValueError(f"{what}: images of shape {tuple(x.shape)} do not fit model "
                         f"{m.name!r}; expected NHWC (N, H, W, C){hint}. ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None


def _batch_list(m: Model, variables: Variables, data: Images, batch_size: int, what: str
                ) -> list[np.ndarray]:
    """`data` as a list of NHWC batches: an array is cut in order into `batch_size` batches,
    the last partial one kept; an iterable of batches is read once, as given."""
    if isinstance(data, np.ndarray | jax.Array):
        _check_images(m, variables, data, what)
        return list(image_batches(np.asarray(data, np.float32), batch_size, shuffle=False,
                                  keep_last=True)())
    if isinstance(data, Mapping) or isinstance(data, str | bytes):
        raise ValueError(f"{what}: expected an array (N, H, W, C) or an iterable of NHWC "
                         f"batches, got {type(data).__name__}")
    batches = [np.asarray(x, np.float32) if isinstance(x, np.ndarray | jax.Array) else x
               for x in data]
    if not batches:
        raise ValueError(f"{what}: no batches")
    fits: set[tuple] = set()  # image shapes the model already accepted: trace it once per shape
    for i, x in enumerate(batches):
        if getattr(x, "ndim", None) == 4 and tuple(x.shape[1:]) in fits:
            continue
        _check_images(m, variables, x, f"{what} batch {i}")
        fits.add(tuple(x.shape[1:]))
    return batches


def _spaces(spec, spaces: str | Sequence[str] | None) -> list[str]:
    if spaces is None:
        return spec.space_names
    if isinstance(spaces, str):  # a prefix: partial zipping up to and including this space
        if spaces not in spec.space_names:
            raise ValueError(f"spaces={spaces!r} is not a feature space of this model; "
                             f"spaces in depth order: {spec.space_names}")
        return spec.prefix(spaces)
    unknown = [s for s in spaces if s not in spec.space_names]
    if unknown:
        raise ValueError(f"unknown feature spaces {unknown}; valid: {spec.space_names}")
    return [s for s in spec.space_names if s in set(spaces)]


def _fix(repair_arg: bool | str | None) -> str | None:
    if repair_arg in (None, False):
        return None
    if repair_arg is True:
        return "repair"
    if repair_arg not in merging.REPAIRS:
        raise ValueError(f"repair={repair_arg!r}; valid: True/False, {merging.REPAIRS}")
    return repair_arg


def merge(method: str, model: Model, endpoints: Sequence[Variables], *,
          data: Images | None = None, spaces: str | Sequence[str] | None = None,
          repair: bool | str = False, estimator: str = "population",
          reset_endpoints: bool = False, repair_data: Images | None = None,
          batch_size: int = 128, seed: int = 0, tails: str = "per_model", **hparams
          ) -> list[Variables] | Variables:
    """Merges N models of one architecture from different initialisations (matching methods).

    Args:
      method: a matching method (`mergejax.methods.names("matching")`: zipit, permute, mudsc,
        weight_matching, average).
      model: the architecture (`mergejax.model(...)`).
      endpoints: N >= 2 variable trees (`load` gives them).
      data: images the features are observed on: an array (N, H, W, C), cut in order into
        batches of `batch_size` (the last partial batch kept), or an iterable of NHWC batches.
        Needed by methods that read activations (all but weight_matching and average).
      spaces: None merges every feature space; a space name merges the spaces up to it
        (partial zipping, `zipit@stream1` in configs); a list names the spaces.
      repair: False, True / "repair" (REPAIR; for BatchNorm nets a BatchNorm reset) or
        "reset" (BatchNorm reset only).
      estimator: the BatchNorm reset's estimator: "population" (every image weighs the same)
        or "per_batch" (torch's momentum=None, as ZipIt!: every batch weighs the same, unbiased
        variance); see `mergejax.repair.reset_batch_stats`.
      reset_endpoints: reset the endpoints' BatchNorm statistics on `repair_data` before
        matching (ZipIt!'s evaluation scripts do).
      repair_data: images for the resets and REPAIR (default: `data`), same forms as `data`.
      seed: seeds methods that draw random numbers.
      tails: "per_model" keeps each model's head (and every layer past a partial cut);
        "average" averages them (models of one label space) and returns one tree.
      **hparams: the method's hyperparameters (e.g. zipit's alpha, beta); unknown names raise.

    Returns:
      N variable trees, model i's head on the merged trunk (evaluate them together with
      `evaluate(model, trees, ..., tasks=...)`), or one tree with tails="average".
    """
    m = methods.get(method)
    if "matching" not in m.families:
        raise ValueError(f"{method!r} is a weight-space method (models fine-tuned from one "
                         f"base): use mergejax.merge_weights({method!r}, base, finetuned). "
                         f"Matching methods: {', '.join(methods.names('matching'))}")
    hp = m.check_hparams("matching", hparams)
    if isinstance(endpoints, Mapping) or len(endpoints) < 2:
        raise ValueError("endpoints: expected a list of N >= 2 variable trees "
                         f"(got {type(endpoints).__name__} of length {len(endpoints)})")
    endpoints = [dict(e) for e in endpoints]
    spec = specs.for_model(model)
    merged_spaces = _spaces(spec, spaces)
    fix = _fix(repair)
    if estimator not in repair_lib.ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; valid: {repair_lib.ESTIMATORS}")
    stat_batches = (None if data is None else
                    _batch_list(model, endpoints[0], data, batch_size, "data"))
    fix_batches = (stat_batches if repair_data is None else
                   _batch_list(model, endpoints[0], repair_data, batch_size, "repair_data"))
    if (fix or reset_endpoints) and fix_batches is None:
        raise ValueError("repair / reset_endpoints need images: give data= or repair_data=")
    if m.needs_activations(hp) and stat_batches is None:
        raise ValueError(f"method {method!r} compares activations: give data= (images NHWC)")
    if reset_endpoints:
        endpoints = [repair_lib.reset_batch_stats(model, v, fix_batches, estimator=estimator)
                     for v in endpoints]
    statistics = (None if stat_batches is None else
                  StatisticsCache(model, spec, endpoints, lambda: stat_batches))
    transforms = merging.match(method, spec, endpoints, statistics, spaces=merged_spaces,
                               key=jax.random.key(seed), hparams=hp)
    merged = merging.merge_endpoints(model, spec, endpoints, transforms, tails=tails, fix=fix,
                                     batches=(lambda: fix_batches), estimator=estimator)
    return merged[0] if tails == "average" else merged



def merge_weights(method: str, base: Mapping[str, Any], finetuned: Sequence[Mapping[str, Any]],
                  *, seed: int = 0, **hparams) -> Any:
    """Merges models fine-tuned from one base (weight-space methods).

    Args:
      method: `mergejax.methods.names("weight_space")`: average, task_arithmetic, ties, dare,
        breadcrumbs, slerp, tall_masks, consensus.
      base: the pre-trained tree theta_0 (e.g. `variables["params"]` without the task head).
      finetuned: T trees of the same structure.
      seed: the PRNG seed of methods that draw random numbers (dare).
      **hparams: the method's hyperparameters (e.g. ties' lam, density); unknown names raise.

    Returns:
      The merged tree, or one tree per task for methods that reconstruct a model per task
      (tall_masks).
    """
    m = methods.get(method)
    if "weight_space" not in m.families:
        raise ValueError(f"{method!r} is a matching method (models from different "
                         f"initialisations): use mergejax.merge({method!r}, model, endpoints, "
                         f"data=...). Weight-space methods: "
                         f"{', '.join(methods.names('weight_space'))}")
    hp = m.check_hparams("weight_space", hparams)
    return m.fn("weight_space")(base, list(finetuned), key=jax.random.key(seed), **hp)


def _heads(model: Model, variables, tasks) -> tuple[list, list]:
    trees = [variables] if isinstance(variables, Mapping) else list(variables)
    if tasks is None:
        if len(trees) != 1:
            raise ValueError(f"{len(trees)} heads need tasks=[classes of head 0, ...]")
        num = np.shape(trees[0]["params"][model.head]["kernel"])[-1]
        tasks = [tuple(range(num))]
    tasks = [tuple(int(c) for c in t) for t in tasks]
    if len(tasks) != len(trees):
        raise ValueError(f"{len(trees)} variable trees but {len(tasks)} tasks: give one task "
                         f"(its classes, in output order) per tree")
    return trees, tasks


def evaluate(model: Model, variables: Variables | Sequence[Variables], images: np.ndarray,
             labels: np.ndarray, tasks: Sequence[Sequence[int]] | None = None,
             batch_size: int = 256) -> dict:
    """ZipIt!'s metrics of a (multi-head) model: joint, per-task and task-average accuracy.

    Args:
      model: the architecture.
      variables: one tree, or one tree per head (what `merge` returns).
      images, labels: NHWC images (N, H, W, C) and their global class ids (N,).
      tasks: per tree, the global class of each output (default for one tree: 0..C-1).

    Returns `{"joint_acc", "task_avg_acc", "per_task_acc": {"task_a": ...}}` in [0, 1].
    """
    trees, tasks = _heads(model, variables, tasks)
    _check_images(model, trees[0], np.asarray(images[:1]), "images")
    return evaluate_lib.evaluate(model, list(zip(trees, tasks)), np.asarray(images, np.float32),
                                 np.asarray(labels), tasks, batch_size)


def predict(model: Model, variables: Variables | Sequence[Variables], images: np.ndarray,
            tasks: Sequence[Sequence[int]] | None = None, batch_size: int = 256) -> np.ndarray:
    """Joint predictions (N,) int: the global class of the highest softmax probability over
    every head's outputs (the prediction behind `evaluate`'s joint accuracy)."""
    trees, tasks = _heads(model, variables, tasks)
    _check_images(model, trees[0], np.asarray(images[:1]), "images")
    return evaluate_lib.joint_predictions(model, list(zip(trees, tasks)),
                                          np.asarray(images, np.float32), batch_size)


def save(variables: Variables, path: str | os.PathLike, *, arch: str | Model,
         format: str | None = None, input_shape: Sequence[int] | None = None,
         overwrite: bool = False, meta: dict | None = None, **model_kwargs) -> Path:
    """Writes `variables` of `arch` to `path` atomically; returns the path.

    Args:
      format: "pt" (a torch state_dict in the original repository's layout), "safetensors"
        (the same tensors) or "orbax" (a checkpoint directory `load` reads); default from the
        suffix (.pt/.pth, .safetensors, anything else orbax).
      overwrite: replace an existing file or checkpoint (otherwise FileExistsError).
      meta: extra JSON-able metadata (orbax) / string metadata (safetensors).
    """
    m = _as_model(arch, model_kwargs)
    path = Path(path)
    if format is None:
        format = {".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}.get(path.suffix,
                                                                                 "orbax")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    shape = tuple(input_shape or _default_input_shape(m))
    return model_io.save_variables(path, variables, m, format, input_shape=shape, meta=meta)
