"""The "search" run kind: AutoMerge-style per-block recipe search over fine-tuned models.

Base and per-task fine-tuned models as in the finetune kind (`mergejax.finetune.prepare`); the
backbones (params without the task heads) are written as flat .safetensors inputs; every trial
turns a point of the `SearchSpace` into a multi-document recipe, merges it in memory exactly as
`python -m mergejax.recipe` would (`mergejax.recipe.merge_flats`) and scores it on the
validation split only. BatchNorm statistics are not searched: they are the fine-tuned models'
mean, recomputed on training images when `search.reset`. The best recipe is written as YAML and
run through the recipe runner into a merged checkpoint; the test split is read once, for the
result rows. The weight-space methods of `merge.methods` run as in the finetune kind, with
their grids searched on the same validation split, as baselines.

Outputs in WORKDIR/search/: inputs/*.safetensors, study.db (optuna, SQLite: a killed search
resumes), trials.csv, best_recipe.yml, merged/ (model.safetensors, orbax/, recipe.yml); and
WORKDIR/plots/search_best_so_far.png.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import yaml

from mergejax import data as data_lib
from mergejax import evaluation, finetune
from mergejax.io.atomic import atomic_write_bytes, atomic_write_text
from mergejax.kinds import KINDS
from mergejax.recipe import merge_flats, parse_all, save_flat_safetensors
from mergejax.recipe.output import run as run_recipe
from mergejax.results import RowLog, result_row
from mergejax.search import batched
from mergejax.search.blocks import model_blocks
from mergejax.search.space import SearchSpace
from mergejax.search.study import plot_best_so_far, run_search, trials_csv
from mergejax.specs import flatten, unflatten

SEARCH_DIR = "search"


def space_from_config(config, names, num_models: int) -> SearchSpace:
    """The search space of `config.search` over the backbone tensors `names` of `num_models`
    fine-tuned models."""
    s = config.search
    groups = [tuple(g) for g in s.blocks] or None
    return SearchSpace(model_blocks(names, groups), num_models=num_models,
                       methods=tuple(s.methods), weight=tuple(s.weight),
                       density=tuple(s.density), lam=tuple(s.lam))


def recipe_yaml(docs, header: str) -> str:
    """A multi-document recipe YAML with `header` as its leading comment."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.safe_dump_all(docs, sort_keys=False)


def batched_scorer(setup: finetune.FinetuneSetup, space: SearchSpace, flats, seed: int,
                   batch_size: int):
    """`[points] -> [per-task validation accuracies]`: the points merged together
    (`batched.PopulationMerger`) and every task's head evaluated in one vmapped forward per
    batch, scored exactly as `evaluation.evaluate_heads` scores one model."""
    merger = batched.PopulationMerger(space, flats[0], flats[1:], seed)
    x, y = setup.dataset.splits["validation"]
    keep = np.isin(y, data_lib.union(setup.tasks))
    x, y = x[keep], y[keep]

    def score_points(points):
        backbones = [unflatten(f)["params"] for f in merger.merge(points)]
        probs = []  # per task head: (K, N, classes of the task)
        for model, head in zip(setup.task_models, setup.heads):
            variables = [finetune.assemble(b, head, setup.mean_stats) for b in backbones]
            probs.append(evaluation.softmax(batched.stacked_logits(model, variables, x,
                                                                   batch_size)))
        out = []
        for k in range(len(points)):
            m = evaluation.accuracies([p[k] for p in probs], setup.tasks, y, setup.tasks)
            out.append([m["per_task_acc"][evaluation.task_name(t)]
                        for t in range(len(setup.tasks))])
        return out

    return score_points


@KINDS.decorator("search")
def run_search_kind(config, workdir: Path, emit: Callable[[dict], None] | None = None
                    ) -> list[dict]:
    """Base + fine-tuned models; a recipe searched per block on validation; baselines.

    Rows: base, finetuned (the ceiling), `search` (the best recipe on the test split, with its
    point, trial count and seconds) and one per `merge.methods` entry (as the finetune kind).
    """
    s = finetune.prepare(config, workdir)
    out = workdir / SEARCH_DIR
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    # ---------------------------------------------------------------- inputs on disk
    paths = [out / "inputs" / "base.safetensors"] + [
        out / "inputs" / f"finetuned_{i}.safetensors" for i in range(len(s.tasks))]
    flats = [flatten({"params": b}) for b in [s.base_backbone, *s.backbones]]
    for path, flat in zip(paths, flats):
        save_flat_safetensors(path, flat)  # atomic; the same bytes on a resumed run
    inputs = {Path(os.path.abspath(p)): flat for p, flat in zip(paths, flats)}
    refs = [str(Path(os.path.abspath(p))) for p in paths]
    space = space_from_config(config, sorted(flats[0]), len(s.tasks))
    logging.info("search blocks: %s", {b: len(n) for b, n in space.blocks.items()})
    reset = bool(config.search.reset)

    def merged_variables(point):
        docs = space.to_recipe(point, refs[0], refs[1:])
        flat, _ = merge_flats(parse_all(docs, check_files=False), inputs, seed=config.seed)
        return docs, unflatten(flat)["params"]

    def score_point(point):  # validation only: the test split is never read here
        _, backbone = merged_variables(point)
        m = s.score(s.with_heads(backbone, s.mean_stats, reset), "validation")
        return [m["per_task_acc"][evaluation.task_name(t)] for t in range(len(s.tasks))]

    score_points = None
    if not reset and batched.supports(space):  # precomputed, vectorised trials
        score_points = batched_scorer(s, space, flats, int(config.seed),
                                      config.data.eval_batch_size)

    task_names = [evaluation.task_name(t) for t in range(len(s.tasks))]

    def on_trial(so_far):  # trials.csv is current after every trial
        atomic_write_bytes(out / "trials.csv", trials_csv(so_far, task_names))

    start = time.perf_counter()
    result = run_search(space, score_point, trials=int(config.search.trials),
                        storage=out / "study.db", sampler=config.search.sampler,
                        seed=int(config.seed), objective=config.search.objective,
                        on_trial=on_trial, population=int(config.search.population),
                        score_points=score_points)
    atomic_write_bytes(out / "trials.csv", trials_csv(result, task_names))
    (workdir / "plots").mkdir(exist_ok=True)
    plot_best_so_far(result, workdir / "plots" / "search_best_so_far.png",
                     title=f"recipe search ({config.search.sampler}, {config.search.objective})")
    best = result.best
    docs, backbone = merged_variables(best.point)
    header = (f"Best recipe of a {config.search.sampler} search: trial {best.number} of "
              f"{len(result.trials)}, validation {config.search.objective} score "
              f"{best.value:.4f}.\nReproduce its weights:\n  python -m mergejax.recipe "
              f"{out / 'best_recipe.yml'} --out-dir DIR --random-seed {config.seed}")
    atomic_write_text(out / "best_recipe.yml", recipe_yaml(docs, header))
    run_recipe(parse_all(docs), out / "merged", seed=int(config.seed), overwrite=True)
    seconds = time.perf_counter() - start
    # ---------------------------------------------------------------- rows
    log = RowLog(emit)
    base_heads = s.with_heads(s.base_backbone, s.base.get("batch_stats"), False)
    log.add(result_row("base", s.score(base_heads, "test"), 0.0))
    log.add(result_row("finetuned", s.score(s.finetuned, "test"), 0.0))
    log.add(result_row("search", s.score(s.with_heads(backbone, s.mean_stats, reset), "test"),
                       seconds, hparams=dict(best.point), num_candidates=len(result.trials),
                       validation_score=best.value))
    key = jax.random.key(config.seed)
    for entry in config.merge.methods:
        log.add_entry(entry, lambda start, entry=entry: finetune.merge_entry(
            config, entry, key, s, start))
    return log.rows
