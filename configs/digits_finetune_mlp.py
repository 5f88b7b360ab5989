"""Weight-space merging on digits: an MLP base, fine-tuned on 5 tasks of 2 digits each.

    python launch.py --config=configs/digits_finetune_mlp.py --workdir=/tmp/mergejax_ft_mlp

The base is trained for one epoch on all ten digits (standing in for pre-training); each task
fine-tunes a copy with its own head. Every weight-space method merges the five backbones, with
its hyperparameters chosen on the validation split. Expected: `finetuned` is the ceiling; TALL
masks reconstruct near it; TIES and Consensus above task arithmetic. 7.5 s on 2 cores.
Arguments: `:tasks=N`, `:quick`.
"""

from mergejax.config_lib import base_config, parse_arg

METHODS = ("average", "task_arithmetic", "ties", "dare", "breadcrumbs", "tall_masks",
           "consensus")


def get_config(arg=None):
    args = parse_arg(arg, tasks=5, quick=False)
    c = base_config()
    c.kind = "finetune"
    c.data.num_tasks = args.tasks
    c.data.classes_per_task = 10 // args.tasks
    c.model.name = "mlp"
    c.model.hidden = (128, 128)
    # A deliberately weak base (one epoch at a small learning rate): a base that already solves
    # every 2-digit task leaves nothing for merging methods to differ on.
    c.train.epochs = 1
    c.train.lr = 0.005
    c.finetune.epochs = 10
    c.finetune.lr = 0.02
    c.finetune.batch_size = 32  # ~200 examples per task: several steps per epoch
    c.merge.methods = METHODS
    if args.quick:
        c.model.hidden = (16, 16)
        c.train.epochs = 1
        c.finetune.epochs = 1
    return c
