"""Helpers for config files: the `:arg` parser and shared defaults.

`--config=configs/x.py:width=4,quick` calls `get_config("width=4,quick")`; `parse_arg` turns that
into typed fields with defaults (a bare name is a boolean flag).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

# `config.diagnostics` (mergejax.diagnostics, WORKDIR/report.md): what a run explains itself
# with. A config without the section gets these; `curves` applies to two-model matching runs.
DIAGNOSTICS = dict(
    enabled=True,  # False: no diagnostics.json, plots of diagnostics or report.md
    curves=True,  # loss / accuracy along the line between the endpoints, per alignment
    points=11,  # K points t = 0, 1/(K-1), ..., 1 on each curve
    curve_methods=("naive", "permute", "weight_matching", "zipit", "mudsc"),
    match_quality=True,  # matched correlations per feature space
    task_vectors=True,  # weight-space runs: cosines, sign conflicts, TALL mask shares
    sweeps=True)  # weight-space runs: validation score of every searched candidate


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses "a=1,b=x,flag" into a ConfigDict typed like `defaults` (unknown keys rejected)."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
        kind = type(defaults[key])
        if not _:
            if kind is not bool:
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif kind is bool:
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = kind(value)
    return out


def base_config() -> ml_collections.ConfigDict:
    """Fields every experiment has; configs fill them in."""
    c = ml_collections.ConfigDict()
    c.kind = "multitask"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        name="digits", data_dir="", num_tasks=2, task_kind="disjoint", classes_per_task=0,
        stat_batches=8, batch_size=128, eval_batch_size=256,
        # Explicit tasks, e.g. ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)); empty: a seeded split.
        task_classes=(),
        # False: statistics and repair read every training image of the tasks in dataset
        # order, the last partial batch kept (ZipIt!'s protocol); True: seeded full batches.
        shuffle_statistics=True,
        # Learned merges (RegMean, FS-Merge, distillation): training images per task they
        # may read, a seeded class-stratified subset (0: all of the task's images).
        images_per_task=0))
    c.model = ml_collections.ConfigDict(dict(name="resnet20"))  # + the model's kwargs
    c.train = ml_collections.ConfigDict(dict(
        epochs=30, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        warmup_epochs=1.0, label_smoothing=0.0))
    # fine-tuning overrides of `train` (kind "finetune")
    c.finetune = ml_collections.ConfigDict(dict(epochs=5, lr=0.01, warmup_epochs=0.0))
    c.merge = ml_collections.ConfigDict(dict(methods=("average",), repair_batches=8))
    # BatchNorm reset after merging: "population" (every image weighs the same) or "per_batch"
    # (torch's momentum=None, as ZipIt! and REPAIR); reset_endpoints resets the endpoints'
    # statistics on the same data first, as ZipIt!'s evaluation scripts do.
    c.repair = ml_collections.ConfigDict(dict(estimator="population", reset_endpoints=False))
    # Every method's hyperparameters (defaults: its signature), typed by their defaults, so
    # that any of them can be set from the command line (--config.merge.zipit.alpha=0.5).
    # `merge_search.<method>` names those a finetune run chooses on the validation split from
    # the method's grids (the others keep the value in `merge.<method>`).
    from mergejax import methods

    c.merge_search = ml_collections.ConfigDict()
    for name in methods.names():
        method = methods.get(name)
        c.merge[name] = ml_collections.ConfigDict(method.hparams)
        c.merge_search[name] = tuple(method.search)
    # kind "search": a recipe per block, searched on the validation split (mergejax.search).
    # Ranges are closed intervals (equal ends fix the value); `blocks` = ((name, regex), ...)
    # overrides the default blocks; `reset` recomputes BatchNorm statistics of every trial.
    from mergejax.search.space import DEFAULT_METHODS

    c.search = ml_collections.ConfigDict(dict(
        trials=50, sampler="tpe", objective="dynamic", methods=DEFAULT_METHODS,
        weight=(0.0, 1.0), density=(0.5, 1.0), lam=(1.0, 1.0), blocks=(), reset=False,
        # points asked before scoring; scored together (one vmapped forward) when > 1
        population=1))
    c.endpoints = ml_collections.ConfigDict(dict(checkpoints=()))
    c.export = ml_collections.ConfigDict(dict(formats=()))
    c.diagnostics = ml_collections.ConfigDict(DIAGNOSTICS)
    return c


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (what `--config=path:arg` gives)."""
    spec = importlib.util.spec_from_file_location("_mergejax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def matching_cifar_config(arg: str | None, *, dataset: str, model: str, width: int,
                          lr: float) -> ml_collections.ConfigDict:
    """The ZipIt!-style CIFAR multitask config (2 tasks, 100 epochs, every matching method with
    REPAIR); `arg` takes `width=N` and `quick` (a tiny run for tests under tfds mock data)."""
    args = parse_arg(arg, width=width, quick=False)
    c = base_config()
    c.data.name = dataset
    c.data.num_tasks = 2
    c.data.stat_batches = 20
    c.model.name = model
    c.model.width = args.width
    c.train.epochs = 100
    c.train.lr = lr
    c.train.warmup_epochs = 5.0
    c.merge.methods = ("average+repair", "weight_matching+repair", "permute+repair",
                       "zipit+repair", "mudsc+repair")
    c.merge.repair_batches = 20
    if args.quick:
        c.diagnostics.points = 3  # a smoke run: the curves' ends and middle
        shrink_for_mock_data(c)
    return c


def shrink_for_mock_data(c: ml_collections.ConfigDict) -> None:
    """Makes a 32x32 config tiny, for `:quick` runs on `tfds.testing.mock_data` in tests:
    width 1, one epoch, batches of 16, one statistics / repair batch."""
    c.model.width = 1
    c.train.epochs = 1
    c.finetune.epochs = 1
    c.train.batch_size = 16
    c.data.batch_size = 16
    c.data.eval_batch_size = 32
    c.data.stat_batches = 1
    c.merge.repair_batches = 1
