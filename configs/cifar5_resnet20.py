"""CIFAR-10 5+5 with ResNet-20 x4, as in ZipIt! Table 1a (but cross-entropy heads).

    python launch.py --config=configs/cifar5_resnet20.py --workdir=/tmp/cifar10 \
        --config.data.data_dir=$TFDS_DATA_DIR

Needs CIFAR-10 prepared offline with tfds (the error message says how). Expected ordering:
ZipIt! > Permute > weight averaging in joint accuracy. Arguments: `:width=N`, `:quick`.
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, width=4, quick=False)
    c = base_config()
    c.data.name = "cifar10"
    c.data.num_tasks = 2
    c.data.stat_batches = 20
    c.model.name = "resnet20"
    c.model.width = args.width
    c.train.epochs = 100
    c.train.lr = 0.4
    c.train.warmup_epochs = 5.0
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
