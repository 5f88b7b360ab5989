"""CIFAR-10 5+5 with a small ViT (patch 4 on 32x32, 64 tokens): every matching method, with and
without group matching of the attention heads (the MuDSC paper's ViT setting).

    python launch.py --config=configs/cifar_vit.py --workdir=/tmp/cifar10_vit \
        --config.data.data_dir=$TFDS_DATA_DIR

Needs CIFAR-10 prepared offline with tfds (the error message says how). Two tasks of 5 classes;
one `vit_tiny` (width 64, depth 4, 4 heads, MLP ratio 2, mean pooling) per task from its own
initialisation, 100 epochs each. Not measured here: a GPU run (on the 2-core CPU one epoch of
the width-64 ViT takes minutes). Expected from the MuDSC paper (ViTs from different
initialisations on CIFAR): MuDSC above ZipIt!, group matching above ungrouped. The tiny MNIST
run of configs/mnist_vit.py shows the second and not the first (see its docstring).
Arguments: `:width=N`, `:depth=N`, `:quick` (a tiny run for tests under tfds mock data).
"""

from mergejax.config_lib import base_config, parse_arg, shrink_for_mock_data


def get_config(arg=None):
    args = parse_arg(arg, width=64, depth=4, quick=False)
    c = base_config()
    c.data.name = "cifar10"
    c.data.num_tasks = 2
    c.data.stat_batches = 20
    c.model.name = "vit_tiny"
    c.model.patch = 4
    c.model.width = args.width
    c.model.depth = args.depth
    c.model.pool = "mean"  # as configs/mnist_vit.py
    c.train.epochs = 100
    c.train.lr = 0.05
    c.train.warmup_epochs = 5.0
    c.merge.methods = ("average+repair", "weight_matching+repair", "permute+repair",
                       "permute[group_heads=False]+repair", "zipit+repair",
                       "zipit[group_heads=False]+repair", "mudsc+repair",
                       "mudsc[group_heads=False]+repair")
    c.merge.repair_batches = 20
    if args.quick:
        c.diagnostics.points = 3  # a smoke run: the curves' ends and middle
        shrink_for_mock_data(c)
        c.model.width = 16  # 4 heads of 4: the smallest width with several per head
        c.model.depth = 1
        c.merge.mudsc.iters = 2
    return c
