"""CIFAR-100 50+50 with ResNet-20 x4, as in ZipIt! Table 1b (cross-entropy heads).

    python launch.py --config=configs/cifar_resnet20.py --workdir=/tmp/cifar100 \
        --config.data.data_dir=$TFDS_DATA_DIR

Needs CIFAR-100 prepared offline with tfds (the error message says how). Expected on a GPU:
endpoints ~75% on their own 50 classes; ZipIt! well above Permute, Permute above weight averaging
(ZipIt! App. "Cross Entropy on CIFAR": ZipIt!20/20 27.9 / Permute 20.0 / W.Avg 2.7 joint at x8).
On a 2-core CPU, width 4 at 32x32 costs ~20 s per training step: use a lent GPU, or `:width=1`.
Arguments: `:width=N`, `:quick`.
"""

from mergejax.config_lib import matching_cifar_config


def get_config(arg=None):
    return matching_cifar_config(arg, dataset="cifar100", model="resnet20", width=4, lr=0.4)
