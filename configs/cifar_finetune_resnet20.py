"""Weight-space merging on CIFAR-100: a ResNet-20 base, fine-tuned on 10 tasks of 10 classes.

    python launch.py --config=configs/cifar_finetune_resnet20.py --workdir=/tmp/cifar_ft \
        --config.data.data_dir=$TFDS_DATA_DIR

Needs CIFAR-100 prepared offline with tfds (the error message says how). The base trains on all
100 classes (standing in for pre-training); each task fine-tunes a copy with its own 10-way head;
every weight-space method merges the ten backbones, hyperparameters chosen on validation, with
BatchNorm statistics recomputed. Expected ordering (TALL-masks paper): TALL masks near the
fine-tuned ceiling; TIES and Consensus above task arithmetic. A GPU run; on the 2-core CPU use
`:width=1` and expect hours. Arguments: `:width=N`, `:tasks=N`, `:quick`.
"""

from mergejax.config_lib import base_config, parse_arg, shrink_for_mock_data


def get_config(arg=None):
    args = parse_arg(arg, width=2, tasks=10, quick=False)
    c = base_config()
    c.kind = "finetune"
    c.data.name = "cifar100"
    c.data.num_tasks = args.tasks
    c.data.classes_per_task = 100 // args.tasks
    c.model.name = "resnet20"
    c.model.width = args.width
    c.train.epochs = 30
    c.train.lr = 0.1
    c.finetune.epochs = 10
    c.finetune.lr = 0.01
    c.merge.methods = tuple(f"{m}+reset" for m in (
        "average", "task_arithmetic", "ties", "dare", "breadcrumbs", "tall_masks", "consensus"))
    c.merge.repair_batches = 20
    if args.quick:
        shrink_for_mock_data(c)
        c.data.num_tasks = 2
        c.data.classes_per_task = 5
        c.merge.methods = ("task_arithmetic+reset", "ties+reset", "tall_masks+reset")
        for name in ("task_arithmetic", "ties", "tall_masks"):  # no validation grid: fast
            c.merge_search[name] = ()
    return c
