"""AutoMerge's CCT search on MNIST: two CCTs fine-tuned from one base (configs/mnist_cct.py),
a recipe searched for AutoMerge's two blocks, the tokenizer and the transformer.

    pip install -e ".[mnist,search]"
    python launch.py --config=configs/mnist_search_cct.py --workdir=/tmp/mcct_search

Base, fine-tuning and baselines exactly as configs/mnist_cct.py (same endpoints: the workdir of
one can be reused by the other); AutoMerge's split (`utils/CCT_split.py`: keys containing
'tokenizer' against the rest) and space: per block a method from ties, task_arithmetic,
dare_linear, dare_ties, w_A = w, w_B = 1 - w in [0, 1], densities in [0.5, 1]; TPE in place of
AutoMerge's SMAC random-forest BO; its dynamically weighted objective.
Arguments: `:trials=N`, `:sampler=tpe|cmaes|random`, `:quick` (tests).
"""

from pathlib import Path

from mergejax.config_lib import load_config_file, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, trials=60, sampler="tpe", quick=False)
    c = load_config_file(Path(__file__).with_name("mnist_cct.py"), "quick" if args.quick else None)
    c.kind = "search"
    c.search.blocks = (("tokenizer", "tokenizer"), ("transformer", ".*"))
    c.search.trials = 4 if args.quick else args.trials
    c.search.sampler = args.sampler
    c.merge.methods = ("task_arithmetic", "ties", "dare") if not args.quick else ("ties",)
    return c
