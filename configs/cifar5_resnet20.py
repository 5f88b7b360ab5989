"""CIFAR-10 5+5 with ResNet-20 x4, as in ZipIt! Table 1a (but cross-entropy heads).

    python launch.py --config=configs/cifar5_resnet20.py --workdir=/tmp/cifar10 \
        --config.data.data_dir=$TFDS_DATA_DIR

Needs CIFAR-10 prepared offline with tfds (the error message says how). Expected ordering:
ZipIt! > Permute > weight averaging in joint accuracy. Arguments: `:width=N`, `:quick`.
"""

from mergejax.config_lib import matching_cifar_config


def get_config(arg=None):
    return matching_cifar_config(arg, dataset="cifar10", model="resnet20", width=4, lr=0.4)
