"""Checks a whole experiment config before any data is read or any model trained.

`validate(config)` collects every problem (kind, dataset, model and its kwargs, method entries
with their `@space` and `+variant`, every hyperparameter's type and range, search names, batch
sizes, epochs, seeds, task counts, repair and export settings, checkpoint paths, data dir) and
raises one `ConfigError` naming each field, e.g.
`config.merge.zipit.alpha=nan: must be finite; config.train.batch_size=0: must be an integer >= 1`.
Nothing here reads data, trains or writes a file: building the model and its merge spec is all
the work it does.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergejax import data as data_lib
from mergejax import methods, model_io, models, repair, specs, train
from mergejax.entries import SYNTAX, VARIANTS, hparam_problems, split_entry
from mergejax.io.cli_errors import UsageError
from mergejax.kinds import KINDS
from mergejax.methods.registry import nonfinite_fields

# The method family each run kind merges with.
FAMILY = {"multitask": "matching", "finetune": "weight_space", "search": "weight_space"}
# Kinds built on a base and per-task fine-tuned models (`mergejax.finetune.prepare`).
FINETUNED_KINDS = ("finetune", "search")
# Classes of the registered datasets, known without reading them.
NUM_CLASSES = {"digits": 10, "digits32": 10, "mnist5k": 10, "cifar10": 10, "cifar100": 100}
TFDS_DATASETS = ("cifar10", "cifar100")
TASK_KINDS = ("disjoint", "same")
# Seeds are offset per task (`seed + 1000 + i`) and must stay valid numpy / JAX seeds.
MAX_SEED = 2**31 - 2**16


class ConfigError(UsageError, KeyError):
    """Every problem of a config at once; `problems` lists `"config.<field>=<value>: why"`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.message())

    def message(self) -> str:
        n = len(self.problems)
        head = "invalid config" + (f" ({n} problems)" if n > 1 else "")
        return f"{head}: " + "; ".join(self.problems)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message()


def _show(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _num(x: float | None) -> str:
    return "" if x is None else str(int(x)) if float(x).is_integer() else f"{x:g}"


class _Problems:
    def __init__(self):
        self.items: list[str] = []

    def add(self, field: str, value: Any, why: str) -> None:
        self.items.append(f"config.{field}={_show(value)}: {why}")

    def note(self, field: str, why: str) -> None:
        self.items.append(f"config.{field}: {why}")

    def number(self, field: str, value: Any, *, integer: bool = False, lo: float | None = None,
               hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> bool:
        """Checks a number's type and range; True if valid."""
        kind = "an integer" if integer else "a number"
        ok_type = (not isinstance(value, bool) and isinstance(value, numbers.Real)
                   and (not integer or isinstance(value, numbers.Integral)
                        or float(value).is_integer()))
        if not ok_type:
            self.add(field, value, f"must be {kind}")
            return False
        v = float(value)
        if not math.isfinite(v):
            self.add(field, value, "must be finite")
            return False
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            lo_s, hi_s = _num(lo), _num(hi)
            if lo is not None and hi is not None:
                rng = f"in {'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"
            elif lo is not None:
                rng = f"{'>' if lo_open else '>='} {lo_s}"
            else:
                rng = f"{'<' if hi_open else '<='} {hi_s}"
            self.add(field, value, f"must be {kind} {rng}")
            return False
        return True

    def choice(self, field: str, value: Any, choices) -> bool:
        choices = list(choices)
        try:
            ok = value in choices
        except TypeError:
            ok = False
        if not ok:
            self.add(field, value, f"must be one of {', '.join(map(repr, choices))}")
        return ok


def _as_dict(section) -> dict:
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        return section.to_dict()
    return dict(section)


def _tasks(config, p: _Problems, num_classes: int | None, seed: int
           ) -> list[tuple[int, ...]] | None:
    """The run's tasks, computed without data (None if they cannot be)."""
    d = config.data
    given = d.get("task_classes", ()) or ()
    if given:
        if num_classes is None:
            return None
        tasks = []
        for i, task in enumerate(given):
            try:
                task = tuple(int(c) for c in task)
                if any(int(c) != c for c in given[i]):
                    raise ValueError
            except (TypeError, ValueError):
                p.add(f"data.task_classes[{i}]", task, "a task is a tuple of integer class ids")
                return None
            bad = [c for c in task if not 0 <= c < num_classes]
            if not task or bad or len(set(task)) != len(task):
                p.add(f"data.task_classes[{i}]", task, "a task is a non-empty tuple of distinct "
                      f"class ids in [0, {num_classes}) for {d.name!r}")
                return None
            tasks.append(task)
        return tasks
    ok = p.number("data.num_tasks", d.num_tasks, integer=True, lo=1)
    ok &= p.choice("data.task_kind", d.task_kind, TASK_KINDS)
    ok &= p.number("data.classes_per_task", d.classes_per_task, integer=True, lo=0)
    if not ok or num_classes is None:
        return None
    if d.task_kind == "disjoint":
        size = int(d.classes_per_task) or num_classes // int(d.num_tasks)
        if size < 1 or size * int(d.num_tasks) > num_classes:
            p.note("data.num_tasks", f"{d.num_tasks} disjoint tasks of {size} classes do not fit "
                   f"in the {num_classes} classes of {d.name!r}; lower data.num_tasks or "
                   "data.classes_per_task")
            return None
    return data_lib.split_classes(num_classes, int(d.num_tasks), seed=seed,
                                  kind=d.task_kind, classes_per_task=d.classes_per_task or None)


def _model(config, p: _Problems, num_classes: int | None):
    name = config.model.get("name")
    if name not in models.names():
        p.add("model.name", name, f"unknown model; valid: {', '.join(models.names())}")
        return None
    if num_classes is None:
        return None
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in _as_dict(config.model).items() if k != "name"}
    try:
        return models.create(name, num_classes=num_classes, **kwargs)
    except Exception as e:  # the model's own message names the bad kwarg
        p.note("model", f"cannot build model {name!r} with {kwargs}: {e}")
        return None


def _settings(config, section: str, p: _Problems, base: Mapping | None = None) -> None:
    fields = {f.name: f.default for f in dataclasses.fields(train.TrainSettings)}
    values = _as_dict(config.get(section))
    for k in values:
        if k not in fields and section == "finetune":
            p.add(f"{section}.{k}", values[k], f"unknown training setting; valid: "
                  f"{', '.join(fields)}")
    merged = {**fields, **(base or {}), **values}
    f = section
    p.number(f"{f}.epochs", merged["epochs"], integer=True, lo=0)
    p.number(f"{f}.batch_size", merged["batch_size"], integer=True, lo=1)
    p.number(f"{f}.lr", merged["lr"], lo=0)
    p.number(f"{f}.momentum", merged["momentum"], lo=0, hi=1)
    p.number(f"{f}.weight_decay", merged["weight_decay"], lo=0)
    p.number(f"{f}.warmup_epochs", merged["warmup_epochs"], lo=0)
    p.number(f"{f}.label_smoothing", merged["label_smoothing"], lo=0, hi=1, hi_open=True)
    p.choice(f"{f}.schedule", merged["schedule"], ("cosine", "onecycle", "constant"))


def _hparams(config, p: _Problems) -> None:
    """Every `config.merge.<method>` section: names, types (those of the defaults), ranges."""
    merge = _as_dict(config.merge)
    for name, section in merge.items():
        if name in ("methods", "repair_batches"):
            continue
        if name not in methods.names():
            p.note(f"merge.{name}", f"unknown method section; methods: "
                   f"{', '.join(methods.names())}")
            continue
        if not isinstance(section, Mapping):
            p.add(f"merge.{name}", section, "must be a dict of hyperparameters")
            continue
        for k, why in hparam_problems(name, section).items():
            p.add(f"merge.{name}.{k}", section[k], why)
    search = _as_dict(config.get("merge_search"))
    for name, searched in search.items():
        if name not in methods.names():
            p.note(f"merge_search.{name}", f"unknown method; methods: "
                   f"{', '.join(methods.names())}")
            continue
        if isinstance(searched, str) or not isinstance(searched, list | tuple):
            p.add(f"merge_search.{name}", searched, "must be a tuple of hyperparameter names")
            continue
        grids = methods.get(name).search
        unknown = [s for s in searched if s not in grids]
        if unknown:
            p.add(f"merge_search.{name}", tuple(searched), f"{unknown} have no search grid; "
                  f"searchable: {', '.join(grids) or 'none'}")


def _entries(config, p: _Problems, family: str | None, spec) -> None:
    entries = config.merge.get("methods", ())
    if isinstance(entries, str) or not isinstance(entries, list | tuple):
        p.add("merge.methods", entries, f"must be a tuple of method entries {SYNTAX}")
        return
    for i, entry in enumerate(entries):
        field = f"merge.methods[{i}]"
        try:
            name, variants, space, entry_hp = split_entry(entry)
        except ValueError as e:
            p.add(field, entry, str(e))
            continue
        bad_variants = [v for v in variants if v not in VARIANTS]
        if bad_variants:
            p.add(field, entry, f"unknown variant {bad_variants[0]!r}; valid: "
                  f"{', '.join(VARIANTS)}")
        if name not in methods.names():
            p.add(field, entry, f"unknown method {name!r}; valid: {', '.join(methods.names())}")
            continue
        method = methods.get(name)
        # a multitask entry whose method has only a learned function runs it on task images
        fam = ("learned" if family == "matching" and "learned" in method.families
               and "matching" not in method.families else family)
        if fam is not None and fam not in method.families:
            also = (f"; learned methods: {', '.join(methods.names('learned'))}"
                    if family == "matching" else "")
            p.add(field, entry, f"{name!r} has no {family!r} function (kind "
                  f"{config.kind!r}); methods for {family!r}: "
                  f"{', '.join(methods.names(family))}{also}")
            continue
        # the entry's own [hparam=value] overrides get config.merge.<name>'s checks
        for k, why in hparam_problems(name, entry_hp, fam).items():
            p.add(field, entry, f"{k}={entry_hp[k]!r}: {why}")
        if space:
            if fam in ("weight_space", "learned"):
                p.add(field, entry, "partial merging (@space) is for matching methods (kind "
                      "'multitask')")
            elif spec is not None and space not in spec.space_names:
                p.add(field, entry, f"model {config.model.name!r} has no feature space "
                      f"{space!r}; spaces: {', '.join(spec.space_names)}")


def validate(config) -> None:
    """Raises `ConfigError` listing every problem of `config`; returns None if it is valid."""
    p = _Problems()
    for field, value in nonfinite_fields(_as_dict(config)):
        if not field.startswith("merge."):  # merge.* is reported with its method's checks
            p.add(field, value, "must be finite")
    kind = config.get("kind")
    if kind not in KINDS:
        p.add("kind", kind, f"unknown experiment kind; valid: {', '.join(KINDS.names())}")
    family = FAMILY.get(kind)
    p.number("seed", config.get("seed"), integer=True, lo=0, hi=MAX_SEED)
    # ------------------------------------------------------------------ data
    d = config.data
    num_classes = None
    if d.name not in data_lib.names():
        p.add("data.name", d.name, f"unknown dataset; valid: {', '.join(data_lib.names())}")
    else:
        num_classes = NUM_CLASSES.get(d.name)
    if d.name in TFDS_DATASETS and d.get("data_dir"):
        where = Path(os.path.expanduser(d.data_dir))
        if not where.is_dir():
            p.add("data.data_dir", d.data_dir, "no such directory; prepare the dataset there "
                  "(README, 'CIFAR (prepared offline)') or set TFDS_DATA_DIR")
        elif not (where / d.name).is_dir():
            p.add("data.data_dir", d.data_dir, f"has no {d.name}/ folder; "
                  f"{data_lib.preparation_help(d.name, str(where)).splitlines()[0]}")
    p.number("data.batch_size", d.batch_size, integer=True, lo=1)
    p.number("data.eval_batch_size", d.eval_batch_size, integer=True, lo=1)
    p.number("data.stat_batches", d.stat_batches, integer=True, lo=0)
    p.number("data.images_per_task", d.get("images_per_task", 0), integer=True, lo=0)
    if not isinstance(d.get("shuffle_statistics", True), bool):
        p.add("data.shuffle_statistics", d.shuffle_statistics, "must be True or False")
    seed_ok = (isinstance(config.get("seed"), numbers.Integral)
               and 0 <= config.seed <= MAX_SEED)
    tasks = _tasks(config, p, num_classes, int(config.seed) if seed_ok else 0)
    # ------------------------------------------------------------------ model and spec
    model_classes = None
    if tasks:
        model_classes = (len(data_lib.union(tasks)) if family == "weight_space"
                         else len(tasks[0]))
    model = _model(config, p, model_classes)
    spec = None
    if model is not None and family == "matching":
        try:
            spec = specs.for_model(model)
        except KeyError:
            p.add("model.name", config.model.name, f"has no merge spec; models with one: "
                  f"{', '.join(specs.names())}")
    # ------------------------------------------------------------------ training
    _settings(config, "train", p)
    if kind in FINETUNED_KINDS:
        _settings(config, "finetune", p, base=_as_dict(config.train))
    if kind == "search":
        _search(config, p)
    # ------------------------------------------------------------------ merging
    _entries(config, p, family, spec)
    _hparams(config, p)
    p.number("merge.repair_batches", config.merge.get("repair_batches", 0), integer=True, lo=0)
    rep = config.get("repair") or {}
    p.choice("repair.estimator", rep.get("estimator", "population"), repair.ESTIMATORS)
    if not isinstance(rep.get("reset_endpoints", False), bool):
        p.add("repair.reset_endpoints", rep.get("reset_endpoints"), "must be True or False")
    formats = config.get("export", {}).get("formats", ())
    if isinstance(formats, str) or not isinstance(formats, list | tuple):
        p.add("export.formats", formats, f"must be a tuple of formats from {model_io.FORMATS}")
    else:
        unknown = [f for f in formats if f not in model_io.FORMATS]
        if unknown:
            p.add("export.formats", tuple(formats), f"unknown format(s) {unknown}; valid: "
                  f"{', '.join(model_io.FORMATS)}")
        if formats and kind in FINETUNED_KINDS:
            p.add("export.formats", tuple(formats), "exports are written by multitask runs only")
    checkpoints = config.get("endpoints", {}).get("checkpoints", ())
    if isinstance(checkpoints, str) or not isinstance(checkpoints, list | tuple):
        p.add("endpoints.checkpoints", checkpoints, "must be a tuple of paths, one per task")
    elif checkpoints:
        if kind in FINETUNED_KINDS:
            p.add("endpoints.checkpoints", tuple(checkpoints), "imported endpoints are for "
                  "multitask runs only")
        for i, path in enumerate(checkpoints):
            if not Path(os.path.expanduser(str(path))).exists():
                p.add(f"endpoints.checkpoints[{i}]", str(path), "no such file or directory")
        if tasks and len(checkpoints) != len(tasks):
            p.add("endpoints.checkpoints", tuple(checkpoints), f"{len(checkpoints)} files for "
                  f"{len(tasks)} tasks; give one per task, in task order")
    _diagnostics(config, p)
    if p.items:
        raise ConfigError(p.items)


def _diagnostics(config, p: _Problems) -> None:
    """`config.diagnostics`: known fields, booleans, K >= 2 points, curve methods by name."""
    from mergejax.config_lib import DIAGNOSTICS

    given = _as_dict(config.get("diagnostics"))
    for k in given:
        if k not in DIAGNOSTICS:
            p.add(f"diagnostics.{k}", given[k], f"unknown diagnostics setting; valid: "
                  f"{', '.join(DIAGNOSTICS)}")
    d = {**DIAGNOSTICS, **given}
    for k, default in DIAGNOSTICS.items():
        if isinstance(default, bool) and not isinstance(d[k], bool):
            p.add(f"diagnostics.{k}", d[k], "must be True or False")
    p.number("diagnostics.points", d["points"], integer=True, lo=2)
    valid = ("naive", *methods.names("matching"))
    curves = d["curve_methods"]
    if (isinstance(curves, str) or not isinstance(curves, list | tuple)
            or any(c not in valid for c in curves)):
        p.add("diagnostics.curve_methods", curves, f"must be a tuple from {', '.join(valid)}")


def _search(config, p: _Problems) -> None:
    """`config.search` of a search run: trials, sampler, objective, methods, ranges, blocks."""
    from mergejax.recipe.schema import METHODS
    from mergejax.search.objective import OBJECTIVES
    from mergejax.search.study import SAMPLERS

    s = config.get("search") or {}
    p.number("search.trials", s.get("trials"), integer=True, lo=1)
    p.number("search.population", s.get("population", 1), integer=True, lo=1)
    p.choice("search.sampler", s.get("sampler"), tuple(SAMPLERS.names()))
    p.choice("search.objective", s.get("objective"), tuple(OBJECTIVES.names()))
    searchable = tuple(m for m, v in METHODS.items() if v.kind != "slerp")
    methods_ = s.get("methods")
    if (not isinstance(methods_, list | tuple) or not methods_
            or any(m not in searchable for m in methods_)):
        p.add("search.methods", methods_, f"must be a non-empty tuple from {searchable}")
    bounds = {"weight": (-math.inf, math.inf), "density": (0.0, 1.0), "lam": (-math.inf, math.inf)}
    for name, (lo_ok, hi_ok) in bounds.items():
        r = s.get(name)
        ok = (isinstance(r, list | tuple) and len(r) == 2
              and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in r))
        if not ok or not r[0] <= r[1] or (name == "density" and not lo_ok < r[0]) or r[1] > hi_ok:
            what = "(0, 1]" if name == "density" else "finite"
            p.add(f"search.{name}", r, f"must be a (low, high) pair with low <= high, in {what}")
    blocks = s.get("blocks", ())
    ok = isinstance(blocks, list | tuple) and all(
        isinstance(b, list | tuple) and len(b) == 2 and all(isinstance(x, str) for x in b)
        for b in blocks)
    if not ok:
        p.add("search.blocks", blocks, "must be a tuple of (name, regex) pairs")
    else:
        for name, pattern in blocks:
            try:
                re.compile(pattern)
            except re.error as e:
                p.add("search.blocks", blocks, f"block {name!r}: bad regex {pattern!r}: {e}")
    if not isinstance(s.get("reset", False), bool):
        p.add("search.reset", s.get("reset"), "must be True or False")
