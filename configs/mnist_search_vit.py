"""Recipe search on MNIST with a tiny ViT: a base fine-tuned on two tasks of 5 digits
(configs/mnist_finetune_vit.py at `tasks=2`), a recipe searched per block.

    pip install -e ".[mnist,search]"
    python launch.py --config=configs/mnist_search_vit.py --workdir=/tmp/mvit_search

Blocks (`mergejax.search.blocks`): the stem (patch embedding, positions), the transformer
blocks, the final norm. Per block a method from ties, task_arithmetic, dare_linear, dare_ties,
w_A = w, w_B = 1 - w in [0, 1], densities in [0.5, 1]; TPE; AutoMerge's dynamically weighted
objective. Baselines: task arithmetic, TIES and DARE with their grids searched on the same
validation split; the fine-tuned ceiling.
Arguments: `:trials=N`, `:sampler=tpe|cmaes|random`, `:quick` (tests).
"""

from pathlib import Path

from mergejax.config_lib import load_config_file, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, trials=60, sampler="tpe", quick=False)
    base = "tasks=2" + (",quick" if args.quick else "")
    c = load_config_file(Path(__file__).with_name("mnist_finetune_vit.py"), base)
    c.kind = "search"
    c.search.trials = 4 if args.quick else args.trials
    c.search.sampler = args.sampler
    c.merge.methods = ("task_arithmetic", "ties", "dare") if not args.quick else ("ties",)
    return c
