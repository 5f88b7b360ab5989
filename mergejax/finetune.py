"""The fine-tuned workflow: one base model, one fine-tuned copy per task, weight-space merges.

As in the task-arithmetic / TALL-masks setting: a base is trained first (here on all tasks'
classes, standing in for pre-training), then each task fine-tunes a copy of the base backbone
with its own new head. Weight-space methods merge the backbones (`params` without the head);
every task is evaluated with the merged backbone and its own fine-tuned head. BatchNorm
statistics are averaged over the fine-tuned models (`+reset` recomputes them). Hyperparameters
of a method are chosen on the validation split only (per task where the method says so).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from mergejax import data as data_lib
from mergejax import evaluation, methods, repair, train
from mergejax.diagnostics.weight_space import write_run_sections
from mergejax.endpoints import endpoint_key, get_or_train
from mergejax.entries import entry_hparams, parse_method
from mergejax.kinds import KINDS
from mergejax.models import Model, Variables
from mergejax.results import RowLog, result_row
from mergejax.run_setup import (
    load_tasks,
    merge_images,
    model_from_config,
    repair_settings,
    statistics_and_repair_batches,
    train_settings,
)


def split_head(variables: Variables, head: str) -> tuple[dict, dict]:
    """(backbone params without `head`, head params)."""
    params = dict(variables["params"])
    head_params = params.pop(head)
    return params, head_params


def assemble(backbone: dict, head_params: dict, batch_stats: dict | None) -> Variables:
    """A full variable tree from a backbone, a head and (optional) BatchNorm statistics."""
    out = {"params": {**backbone, **head_params}}
    if batch_stats is not None:
        out["batch_stats"] = batch_stats
    return out


def candidate_grid(method, settings: dict, searched: tuple[str, ...] | None = None
                   ) -> list[dict]:
    """Every combination of the grids of the hyperparameters named in `searched` (default:
    every grid the method declares); the others keep their values in `settings` (defaults:
    the method's signature)."""
    searched = tuple(method.search) if searched is None else tuple(searched)
    unknown = sorted(set(searched) - set(method.search))
    if unknown:
        raise ValueError(f"method {method.name!r} has no search grid for {unknown}; "
                         f"searchable: {sorted(method.search)}")
    base = method.check_hparams("weight_space", settings)
    axes = {k: method.search[k] for k in searched}
    if not axes:
        return [base]
    return [{**base, **dict(zip(axes, combo))} for combo in itertools.product(*axes.values())]


@dataclasses.dataclass(frozen=True)
class FinetuneSetup:
    """Everything a weight-space run merges and scores, built once by `prepare`.

    Attributes:
      tasks: the label subsets, one per fine-tuned model.
      task_models: task t's model (its head has len(tasks[t]) classes).
      base: the base model's variables; base_backbone its params without the head.
      finetuned: task t's fine-tuned variables; backbones their params without the heads;
        heads `[{head: params}]`.
      mean_stats: the fine-tuned models' BatchNorm statistics averaged (None without BN).
      dataset: the data (splits train / validation / test).
      score: `(per-task variables, split) -> evaluation.evaluate_heads` metrics on `split`.
      with_heads: `(merged backbone | per-task list, stats, reset) -> per-task variables`.
    """

    tasks: list
    task_models: list[Model]
    base: Variables
    base_backbone: dict
    finetuned: list[Variables]
    backbones: list[dict]
    heads: list[dict]
    mean_stats: dict | None
    dataset: data_lib.Dataset
    score: Callable[[Sequence[Variables], str], dict]
    with_heads: Callable[..., list[Variables]]


def prepare(config, workdir: Path) -> FinetuneSetup:
    """Data, base and per-task fine-tuned models (trained or read from `workdir`), and the
    scoring functions every weight-space run (`finetune`, `search`) shares."""
    # ---------------------------------------------------------------- data
    dataset, tasks = load_tasks(config)
    classes = data_lib.union(tasks)
    logging.info("tasks: %s", tasks)
    # ---------------------------------------------------------------- base and fine-tuned
    base_model = model_from_config(config, num_classes=len(classes))
    base_settings = train_settings(config)
    base = get_or_train(workdir, dataset, classes, base_model, base_settings, config.seed, "base")
    base_key = endpoint_key(dataset.name, classes, base_model, base_settings, config.seed)
    ft_settings = train.TrainSettings(**{**base_settings.__dict__, **dict(config.finetune)})
    head = base_model.head
    base_backbone, _ = split_head(base, head)
    task_models: list[Model] = []
    finetuned: list[Variables] = []
    for i, task in enumerate(tasks):
        model = model_from_config(config, num_classes=len(task))
        fresh = model.init(jax.random.key(config.seed + 1000 + i),
                           np.asarray(dataset.splits["train"][0][:1]))
        init = assemble(base_backbone, {head: fresh["params"][head]}, base.get("batch_stats"))
        finetuned.append(get_or_train(workdir, dataset, task, model, ft_settings,
                                      config.seed + 1 + i, f"finetuned_{i}", init=init,
                                      parent=base_key))
        task_models.append(model)
    heads = [{head: split_head(v, head)[1]} for v in finetuned]
    backbones = [split_head(v, head)[0] for v in finetuned]
    mean_stats = None
    if "batch_stats" in base:
        mean_stats = jax.tree.map(lambda *s: np.mean(s, axis=0),
                                  *[v["batch_stats"] for v in finetuned])
    _, repair_batches = statistics_and_repair_batches(config, merge_images(config, dataset,
                                                                           tasks))
    estimator, _ = repair_settings(config)

    def score(per_task_variables: Sequence[Variables], split: str) -> dict:
        heads_ = list(zip(task_models, per_task_variables, tasks))
        return evaluation.evaluate_heads(heads_, *dataset.splits[split], tasks,
                                         config.data.eval_batch_size)

    def with_heads(merged, stats, reset: bool) -> list[Variables]:
        per_task = merged if isinstance(merged, list) else [merged] * len(tasks)
        out = [assemble(bb, h, stats) for bb, h in zip(per_task, heads)]
        if reset:
            out = [repair.reset_batch_stats(m, v, repair_batches(), estimator=estimator)
                   for m, v in zip(task_models, out)]
        return out

    return FinetuneSetup(list(tasks), task_models, base, base_backbone, finetuned, backbones,
                         heads, mean_stats, dataset, score, with_heads)


@KINDS.decorator("finetune")
def run_finetune(config, workdir: Path, emit: Callable[[dict], None] | None = None
                 ) -> list[dict]:
    """Base + per-task fine-tuned models, merged by weight-space methods.

    `emit(row)` is called with every finished row (the caller writes the results files); a
    method that raises gives an `error` row and the others still run. The config is checked
    by `mergejax.validation` before.
    """
    s = prepare(config, workdir)
    base_heads = s.with_heads(s.base_backbone, s.base.get("batch_stats"), False)
    log = RowLog(emit)
    log.add(result_row("base", s.score(base_heads, "test"), 0.0))
    log.add(result_row("finetuned", s.score(s.finetuned, "test"), 0.0))
    # ---------------------------------------------------------------- merges
    key = jax.random.key(config.seed)
    sweeps: dict[str, list] = {}  # entry -> [(hparams, validation scores)] of its candidates
    for entry in config.merge.methods:
        log.add_entry(entry, lambda start, entry=entry: merge_entry(
            config, entry, key, s, start, record=sweeps.setdefault(entry, [])))
    # ---------------------------------------------------------------- diagnostics
    write_run_sections(config, workdir, s.base_backbone, s.backbones, log.rows, sweeps)
    return log.rows


def merge_entry(config, entry: str, key: jax.Array, setup: FinetuneSetup, start: float,
                record: list | None = None) -> dict:
    """The row of one weight-space method entry: its hyperparameters searched on validation
    (`candidate_grid`), the best tested; `start` is when the row's clock started. `record`
    (a list) receives `(hparams, validation scores)` of every candidate."""
    base_backbone, backbones, mean_stats = setup.base_backbone, setup.backbones, setup.mean_stats
    tasks, score, with_heads = setup.tasks, setup.score, setup.with_heads
    parsed = parse_method(entry, "weight_space")
    name, variants = parsed.name, parsed.variants
    if parsed.stop_after:
        raise ValueError(f"{entry!r}: partial merging (@space) is for matching methods")
    method = methods.get(name)
    fn = method.fn("weight_space")
    settings = entry_hparams(config, parsed, "weight_space")  # entry [...] over config
    reset = bool(variants)
    candidates = []
    searched = config.get("merge_search", {}).get(name)
    if parsed.hparams:  # a value the entry sets is fixed, not searched
        searched = tuple(s for s in (method.search if searched is None else searched)
                         if s not in parsed.hparams)
    for hp in candidate_grid(method, settings, searched):
        merged = fn(base_backbone, backbones, key=key, **hp)
        val = score(with_heads(merged, mean_stats, reset), "validation")
        candidates.append((hp, merged, val))
        if record is not None:
            record.append((hp, val))
    if method.per_task_search and isinstance(candidates[0][1], list):
        # choose per task: task t's model from the candidate best on task t's validation
        chosen_hp, merged = [], []
        for t in range(len(tasks)):
            tname = evaluation.task_name(t)
            hp, m, _ = max(candidates, key=lambda c, tname=tname: c[2]["per_task_acc"][tname])
            chosen_hp.append(hp)
            merged.append(m[t])
        hparams = {"per_task": chosen_hp}
    else:
        hparams, merged, _ = max(candidates, key=lambda c: c[2]["task_avg_acc"])
    final = with_heads(merged, mean_stats, reset)
    seconds = time.perf_counter() - start
    return result_row(entry, score(final, "test"), seconds, hparams=hparams,
                      num_candidates=len(candidates))
