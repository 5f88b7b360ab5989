"""One run: data -> endpoints -> statistics -> match -> merge -> repair -> evaluate -> export.

`run(config, workdir)` dispatches on `config.kind` ("multitask": one model per task from its
own initialisation, merged by matching methods). Every phase is an importable function.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from mergejax import data as data_lib
from mergejax import evaluate, methods, model_io, models, repair, results, specs, train
from mergejax.problem import MatchingProblem
from mergejax.registry import Registry

KINDS: Registry[Callable] = Registry("experiment kind")

VARIANTS = ("repair", "reset")


def check_workdir(workdir: str | os.PathLike) -> Path:
    """Creates `workdir` and checks it is writable before any work starts."""
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {path} is not writable: {e}") from None
    return path


def model_from_config(config, num_classes: int) -> models.Model:
    """`models.create(config.model.name, **other fields, num_classes=...)`."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return models.create(config.model.name, num_classes=num_classes, **kwargs)


def train_settings(config) -> train.TrainSettings:
    """The training fields of the config as TrainSettings."""
    fields = {f.name for f in dataclasses.fields(train.TrainSettings)}
    return train.TrainSettings(**{k: v for k, v in config.train.items() if k in fields})


class MethodEntry(NamedTuple):
    """One entry of `config.merge.methods`: `name[@space][+variant...]`."""

    name: str
    variants: tuple[str, ...]
    stop_after: str | None  # partial zipping: merge the spaces up to this one


def parse_method(entry: str) -> MethodEntry:
    """'zipit@stream2+repair' -> MethodEntry('zipit', ('repair',), 'stream2').

    Unknown methods or variants raise with the valid names.
    """
    head, *variants = entry.split("+")
    name, _, stop_after = head.partition("@")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r} in {entry!r}; valid: {VARIANTS}")
    methods.get(name)  # raises listing valid names
    return MethodEntry(name, tuple(variants), stop_after or None)


def check_methods(entries, family: str) -> None:
    """Fails before any work if a method is unknown or lacks `family`."""
    for entry in entries:
        methods.get(parse_method(entry).name).fn(family)


def run(config, workdir: str | os.PathLike) -> list[dict]:
    """Runs the experiment `config.kind` and writes results into `workdir`; returns the rows."""
    import mergejax.finetune  # noqa: F401  (registers the "finetune" kind)

    workdir = check_workdir(workdir)
    rows = KINDS.get(config.kind)(config, workdir)
    results.write(workdir, rows)
    print(results.table(rows), flush=True)
    return rows


def image_batches(images: np.ndarray, batch_size: int, num_batches: int, seed: int):
    """A function returning the same `num_batches` shuffled batches of images each call."""
    def batches():
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(images))
        size = min(batch_size, len(images))
        for b in range(min(num_batches, len(images) // size)):
            yield images[order[b * size:(b + 1) * size]]
    return batches


def result_row(method: str, metrics: dict, seconds: float, **extra) -> dict:
    """One results row: the method's name, its accuracies, seconds and extra fields."""
    return {"method": method, **metrics, "seconds": round(seconds, 3), **extra}


@KINDS.decorator("multitask")
def run_multitask(config, workdir: Path) -> list[dict]:
    """Endpoints trained on disjoint (or identical) label subsets, merged by matching methods."""
    check_methods(config.merge.methods, "matching")
    unknown = sorted(set(config.export.formats) - set(model_io.FORMATS))
    if unknown:
        raise ValueError(f"unknown config.export.formats {unknown}; valid: {model_io.FORMATS}")
    # ---------------------------------------------------------------- data
    dataset = data_lib.load(config.data.name, config.data.data_dir or None)
    tasks = data_lib.split_classes(
        dataset.num_classes, config.data.num_tasks, seed=config.seed,
        kind=config.data.task_kind, classes_per_task=config.data.classes_per_task or None)
    logging.info("tasks: %s", tasks)
    shared_heads = len(set(tasks)) == 1
    model = model_from_config(config, num_classes=len(tasks[0]))
    spec = specs.for_model(model)
    # ---------------------------------------------------------------- endpoints
    from mergejax.endpoints import get_or_train

    settings = train_settings(config)
    example = dataset.splits["train"][0][:1]
    checkpoints = tuple(config.endpoints.checkpoints)
    if checkpoints:  # imported endpoints (orbax / torch / safetensors) instead of training
        if len(checkpoints) != len(tasks):
            raise ValueError(f"config.endpoints.checkpoints has {len(checkpoints)} files for "
                             f"{len(tasks)} tasks {tasks}; give one per task, in task order")
        endpoints = [model_io.load_endpoint(p, model, example) for p in checkpoints]
    else:
        endpoints = [get_or_train(workdir, dataset, task, model, settings, config.seed + i,
                                  name=f"model_{chr(97 + i)}") for i, task in enumerate(tasks)]
    test_x, test_y = dataset.splits["test"]
    train_x = np.concatenate([data_lib.select(*dataset.splits["train"], t)[0] for t in tasks])
    stat_batches = image_batches(train_x, config.data.batch_size, config.data.stat_batches,
                                  config.seed)
    repair_batches = image_batches(train_x, config.data.batch_size, config.merge.repair_batches,
                                    config.seed + 1)

    def score(heads):
        return evaluate.evaluate(model, heads, test_x, test_y, tasks,
                                 config.data.eval_batch_size)

    rows = []
    for i, (v, t) in enumerate(zip(endpoints, tasks)):
        rows.append(result_row(f"model_{chr(97 + i)}", score([(v, t)]), 0.0))
    rows.append(result_row("ensemble", score(list(zip(endpoints, tasks))), 0.0))
    # ---------------------------------------------------------------- merges
    stats_cache: dict = {}  # statistics are collected once, by the first method needing them
    for entry in config.merge.methods:
        name, variants, stop_after = parse_method(entry)
        method = methods.get(name)
        hparams = {**method.hparams, **dict(config.merge.get(name, {}))}
        hparams.pop("search", None)  # validation search is for finetune runs
        problem = MatchingProblem(model, spec, endpoints, spec.prefix(stop_after), stat_batches,
                                  key=jax.random.key(config.seed), stats_cache=stats_cache)
        start = time.perf_counter()
        transforms = method.fn("matching")(problem, **hparams)
        merged = specs.apply_merge(spec, endpoints, transforms,
                                   tails="average" if shared_heads else "per_model")
        if variants:  # for BatchNorm nets REPAIR is exactly a BatchNorm reset
            merged = (repair.repair(model, spec, endpoints, merged, transforms, repair_batches())
                      if "repair" in variants else
                      [repair.reset_batch_stats(model, v, repair_batches()) for v in merged])
        seconds = time.perf_counter() - start
        heads = [(merged[0], tasks[0])] if shared_heads else list(zip(merged, tasks))
        extra = {"hparams": {**hparams, **({"stop_after": stop_after} if stop_after else {})}}
        if config.export.formats:
            model_io.export(workdir / "export", entry, model, [v for v, _ in heads],
                            config.export.formats, example,
                            meta={"tasks": [list(t) for _, t in heads]})
        rows.append(result_row(entry, score(heads), seconds, **extra))
        logging.info("%s: %s", entry, rows[-1])
    return rows
