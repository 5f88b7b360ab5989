"""Benchmark: recipe-search trials per second, batched against one at a time.

    python bench/bench_search.py                      # digits 5+5, MLP 128-128 fine-tunes
    python bench/bench_search.py --config configs/digits_search_resnet20.py --trials 24

The same random points of the search space (4 blocks or more, every default method) are scored
on the validation split three ways, in this process, after one warm-up of each:

- runner: one at a time through the recipe runner (`mergejax.recipe.merge_flats`, the path of
  `python -m mergejax.recipe`), evaluated with `evaluation.evaluate_heads` (the baseline);
- fast, population 1: one at a time through `mergejax.search.batched` (task vectors, sorted
  magnitudes and DARE draws precomputed; vectorised merge; vmapped forward);
- fast, population K: K points merged and evaluated together.

Prints a markdown table of trials per second and the speed-up over the runner. Endpoints are
trained once into --workdir (reused by later runs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mergejax import finetune
from mergejax.config_lib import load_config_file
from mergejax.recipe import merge_flats, parse_all
from mergejax.search.run import batched_scorer, space_from_config
from mergejax.search.space import NumpyTrial
from mergejax.specs import flatten, unflatten

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "digits_finetune_mlp.py"))
    p.add_argument("--config-arg", default="tasks=2")
    p.add_argument("--workdir", default="/tmp/mergejax_bench_search")
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--population", type=int, default=8)
    args = p.parse_args(argv)

    import mergejax.search.run  # noqa: F401  (registers the search kind)

    arg = args.config_arg if "finetune" in Path(args.config).name else None
    config = load_config_file(args.config, arg)
    setup = finetune.prepare(config, Path(args.workdir))
    flats = [flatten({"params": b}) for b in [setup.base_backbone, *setup.backbones]]
    space = space_from_config(config, sorted(flats[0]), len(setup.tasks))
    rng = np.random.default_rng(0)
    points = [space.sample(NumpyTrial(rng)) for _ in range(args.trials + args.population)]
    warm, points = points[:args.population], points[args.population:]
    refs = [Path(f"/in/{i}") for i in range(len(flats))]
    inputs = dict(zip(refs, flats))

    def runner(point):
        docs = space.to_recipe(point, str(refs[0]), [str(r) for r in refs[1:]])
        merged, _ = merge_flats(parse_all(docs, check_files=False), inputs, seed=config.seed)
        m = setup.score(setup.with_heads(unflatten(merged)["params"], setup.mean_stats, False),
                        "validation")
        return [m["per_task_acc"][k] for k in sorted(m["per_task_acc"])]

    fast = batched_scorer(setup, space, flats, int(config.seed), config.data.eval_batch_size)
    rows = []
    for name, k, fn in (("runner, one at a time", 1, lambda ps: [runner(q) for q in ps]),
                        ("fast, population 1", 1, fast),
                        (f"fast, population {args.population}", args.population, fast)):
        for i in range(0, len(warm), k):
            fn(warm[i:i + k])  # compiles and caches for this path
        start = time.perf_counter()
        scores = []
        for i in range(0, len(points), k):
            scores += fn(points[i:i + k])
        rows.append((name, len(points) / (time.perf_counter() - start), scores))
    base = rows[0][1]
    agree = max(float(np.max(np.abs(np.subtract(r[2], rows[0][2])))) for r in rows)
    print(f"{len(points)} trials, {len(space.blocks)} blocks, methods {space.methods}, "
          f"{sum(v.size for v in flats[0].values()):,} backbone parameters, "
          f"{len(setup.dataset.splits['validation'][1])} validation images; largest score "
          f"difference from the runner {agree:.4f}")
    print("| path | trials / s | speed-up over the runner |")
    print("|---|---|---|")
    for name, rate, _ in rows:
        print(f"| {name} | {rate:.2f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
