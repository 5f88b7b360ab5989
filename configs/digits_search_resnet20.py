"""Recipe search on digits (AutoMerge's setting): a ResNet-20 base fine-tuned on two tasks of
5 digits, a merge method and its weights / densities searched per block on validation.

    pip install -e ".[search]"   # optuna (TPE, CMA-ES) and cmaes
    python launch.py --config=configs/digits_search_resnet20.py --workdir=/tmp/mergejax_search

Blocks are the ones a user would name (`mergejax.search.blocks`): the stem (conv1, bn1), and
the stages layer1, layer2, layer3 (the heads stay per task). Per block: a method from ties,
task_arithmetic, dare_linear, dare_ties; w_A = w, w_B = 1 - w in [0, 1]; densities in [0.5, 1]
(AutoMerge's space); TPE, AutoMerge's dynamically weighted score of the per-task validation
accuracies. Baselines: every weight-space method with its own grid searched on the same
validation split, and the fine-tuned ceiling. Outputs in WORKDIR/search/ (trials.csv,
best_recipe.yml, merged/, study.db: a killed run resumes) and WORKDIR/plots/.
Arguments: `:trials=N`, `:sampler=tpe|cmaes|random`, `:width=N`, `:quick` (tests).
"""

from pathlib import Path

from mergejax.config_lib import load_config_file, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, trials=60, sampler="tpe", width=1, quick=False)
    # base and fine-tuning exactly as configs/digits_finetune_resnet20.py, two tasks of 5 digits
    base = f"tasks=2,width={args.width}" + (",quick" if args.quick else "")
    c = load_config_file(Path(__file__).with_name("digits_finetune_resnet20.py"), base)
    c.kind = "search"
    c.search.trials = 4 if args.quick else args.trials
    c.search.sampler = args.sampler
    c.merge.methods = ("ties",) if args.quick else ("average", "task_arithmetic", "ties", "dare")
    return c
