"""The multitask run: one model per task from its own initialisation, merged by matching
(or by a learned method fitted on `config.data.images_per_task` images per task).

data -> endpoints (trained, or imported checkpoints) -> statistics (once, shared by every
method) -> match -> merge -> repair -> evaluate -> export. Registered as kind "multitask".
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax

from mergejax import distributed, evaluation, learned_merging, merging, model_io, repair, specs
from mergejax.entries import entry_hparams, parse_method
from mergejax.kinds import KINDS
from mergejax.results import RowLog, result_row
from mergejax.run_setup import (
    budget_images,
    load_tasks,
    merge_images,
    model_from_config,
    repair_settings,
    statistics_and_repair_batches,
    train_settings,
)
from mergejax.statistics import StatisticsCache


@KINDS.decorator("multitask")
def run_multitask(config, workdir: Path, emit: Callable[[dict], None] | None = None
                  ) -> list[dict]:
    """Endpoints trained on disjoint (or identical) label subsets, merged by matching methods.

    `emit(row)` is called with every finished row (the caller writes the results files); a
    method that raises gives an `error` row and the others still run. The config is checked
    by `mergejax.validation` before (method families, spaces, export formats, estimator).
    """
    estimator, reset_endpoints = repair_settings(config)
    # ---------------------------------------------------------------- data
    dataset, tasks = load_tasks(config)
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
    stat_batches, repair_batches = statistics_and_repair_batches(
        config, merge_images(config, dataset, tasks))
    if reset_endpoints:  # as ZipIt!'s evaluation scripts do, before evaluating or merging
        endpoints = [repair.reset_batch_stats(model, v, repair_batches(), estimator=estimator)
                     for v in endpoints]

    def score(heads, scored=model):  # a learned merge may return a model of another width
        return evaluation.evaluate(scored, heads, test_x, test_y, tasks,
                                   config.data.eval_batch_size)

    log = RowLog(emit)
    for i, (v, t) in enumerate(zip(endpoints, tasks)):
        log.add(result_row(f"model_{chr(97 + i)}", score([(v, t)]), 0.0))
    log.add(result_row("ensemble", score(list(zip(endpoints, tasks))), 0.0))
    # ---------------------------------------------------------------- merges
    # statistics are collected once, for the spaces of the first method needing them
    statistics = StatisticsCache(model, spec, endpoints, stat_batches)
    images = functools.cache(lambda: budget_images(config, dataset, tasks))
    aligned: dict[str, dict] = {}  # method -> its first full matching, for the diagnostics
    for entry in config.merge.methods:
        if learned_merging.is_learned(entry):  # fitted on each task's images: no matching
            log.add_entry(entry, lambda start, entry=entry: learned_merging.learned_row(
                config, workdir, entry, model, spec, endpoints, tasks, images(),
                repair_batches, estimator, example, score, start))
            continue
        log.add_entry(entry, lambda start, entry=entry: _merge_one(
            config, workdir, entry, model, spec, endpoints, tasks, statistics, repair_batches,
            estimator, shared_heads, example, score, start, aligned))
    # ---------------------------------------------------------------- diagnostics
    from mergejax.diagnostics.matching import write_matching_diagnostics

    write_matching_diagnostics(config, workdir, model, spec, endpoints, tasks, aligned,
                               statistics, test_x, test_y, repair_batches, estimator)
    return log.rows


def _merge_one(config, workdir, entry, model, spec, endpoints, tasks, statistics,
               repair_batches, estimator, shared_heads, example, score, start,
               aligned) -> dict:
    """The row of one method entry: match, merge, repair, export, evaluate."""
    parsed = parse_method(entry, "matching")
    name, variants, stop_after = parsed.name, parsed.variants, parsed.stop_after
    hparams = entry_hparams(config, parsed, "matching")  # entry [...] over config.merge.<name>
    transforms = merging.match(name, spec, endpoints, statistics,
                               spaces=spec.prefix(stop_after),
                               key=jax.random.key(config.seed), hparams=hparams)
    if stop_after is None:
        aligned.setdefault(name, transforms)
    # several processes: all merge with process 0's matching (no float tie can split them)
    transforms = distributed.broadcast(transforms)
    fix = "repair" if "repair" in variants else "reset" if "reset" in variants else None
    merged = merging.merge_endpoints(
        model, spec, endpoints, transforms, tails="average" if shared_heads else "per_model",
        fix=fix, batches=repair_batches, estimator=estimator)
    seconds = time.perf_counter() - start
    heads = [(merged[0], tasks[0])] if shared_heads else list(zip(merged, tasks))
    extra = {"hparams": {**hparams, **({"stop_after": stop_after} if stop_after else {})}}
    if config.export.formats:
        model_io.export(workdir / "export", entry, model, [v for v, _ in heads],
                        config.export.formats, example,
                        meta={"tasks": [list(t) for _, t in heads]})
    return result_row(entry, score(heads), seconds, **extra)
