"""CIFAR-10 5+5 with VGG-11 (BatchNorm), as in ZipIt!'s VGG appendix.

    python launch.py --config=configs/cifar_vgg11.py --workdir=/tmp/cifar10_vgg \
        --config.data.data_dir=$TFDS_DATA_DIR

Needs CIFAR-10 prepared offline with tfds. Expected (ZipIt! App., VGG11 x1, CE): W.Avg 10.2,
Permute 25.4, ZipIt!22/22 33.2 joint. Arguments: `:width=N`, `:quick`.
"""

from mergejax.config_lib import matching_cifar_config


def get_config(arg=None):
    return matching_cifar_config(arg, dataset="cifar10", model="vgg11", width=1, lr=0.05)
