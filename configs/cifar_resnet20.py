"""CIFAR-100 50+50 with ResNet-20 x4, as in ZipIt! Table 1b (cross-entropy heads).

    python launch.py --config=configs/cifar_resnet20.py --workdir=/tmp/cifar100 \
        --config.data.data_dir=$TFDS_DATA_DIR

Needs CIFAR-100 prepared offline with tfds (the error message says how). Expected on a GPU:
endpoints ~75% on their own 50 classes; ZipIt! well above Permute, Permute above weight averaging
(ZipIt! App. "Cross Entropy on CIFAR": ZipIt!20/20 27.9 / Permute 20.0 / W.Avg 2.7 joint at x8).
On a 2-core CPU, width 4 at 32x32 costs ~20 s per training step: use a lent GPU, or `:width=1`.
Arguments: `:width=N`, `:quick`.
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, width=4, quick=False)
    c = base_config()
    c.data.name = "cifar100"
    c.data.num_tasks = 2
    c.data.stat_batches = 20
    c.model.name = "resnet20"
    c.model.width = args.width
    c.train.epochs = 100
    c.train.lr = 0.4
    c.train.warmup_epochs = 5.0
    c.train.schedule = "cosine"
    c.merge.methods = ("average+repair", "weight_matching+repair", "permute+repair",
                       "zipit+repair", "mudsc+repair")
    c.merge.repair_batches = 20
    if args.quick:
        c.model.width = 1
        c.train.epochs = 1
        c.train.batch_size = 16
        c.data.batch_size = 16
        c.data.stat_batches = 1
        c.merge.repair_batches = 1
    return c
