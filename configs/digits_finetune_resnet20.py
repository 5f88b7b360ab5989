"""Weight-space merging on digits: a ResNet-20 base, fine-tuned on 5 tasks of 2 digits each.

    python launch.py --config=configs/digits_finetune_resnet20.py --workdir=/tmp/mergejax_ft

As digits_finetune_mlp.py with a ResNet-20 (width 1); BatchNorm statistics of every merge are
recomputed (`+reset`). A few minutes on 2 cores. Arguments: `:width=N`, `:tasks=N`, `:quick`.
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, width=1, tasks=5, quick=False)
    c = base_config()
    c.kind = "finetune"
    c.data.num_tasks = args.tasks
    c.data.classes_per_task = 10 // args.tasks
    c.model.name = "resnet20"
    c.model.width = args.width
    c.train.epochs = 1  # a weak base, as in digits_finetune_mlp.py
    c.train.lr = 0.005
    c.finetune.epochs = 10
    c.finetune.lr = 0.01
    c.finetune.batch_size = 32  # ~200 examples per task: several steps per epoch
    c.merge.methods = tuple(f"{m}+reset" for m in (
        "average", "task_arithmetic", "ties", "dare", "breadcrumbs", "tall_masks", "consensus"))
    if args.quick:
        c.train.epochs = 1
        c.finetune.epochs = 1
        c.merge.repair_batches = 2
    return c
