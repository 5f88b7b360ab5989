"""CIFAR-10 5+5 with VGG-11 (BatchNorm), as in ZipIt!'s VGG appendix.

    python launch.py --config=configs/cifar_vgg11.py --workdir=/tmp/cifar10_vgg \
        --config.data.data_dir=$TFDS_DATA_DIR

Needs CIFAR-10 prepared offline with tfds. Expected (ZipIt! App., VGG11 x1, CE): W.Avg 10.2,
Permute 25.4, ZipIt!22/22 33.2 joint. Arguments: `:width=N`, `:quick`.
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, width=1, quick=False)
    c = base_config()
    c.data.name = "cifar10"
    c.data.num_tasks = 2
    c.data.stat_batches = 20
    c.model.name = "vgg11"
    c.model.width = args.width
    c.train.epochs = 100
    c.train.lr = 0.05
    c.merge.methods = ("average+repair", "weight_matching+repair", "permute+repair",
                       "zipit+repair", "mudsc+repair")
    c.merge.repair_batches = 20
    if args.quick:
        c.train.epochs = 1
        c.train.batch_size = 8
        c.data.batch_size = 8
        c.data.eval_batch_size = 16
        c.data.stat_batches = 1
        c.merge.repair_batches = 1
    return c
