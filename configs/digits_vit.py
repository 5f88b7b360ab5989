"""Digits 5+5 with a tiny ViT (patch 2 on the 8x8 digits): every matching method on attention.

    python launch.py --config=configs/digits_vit.py --workdir=/tmp/mergejax_vit

Trains one `vit_tiny` (width 32, depth 2, 4 heads, mean pooling) per task from its own
initialisation, then merges them with every matching method: 24 s from scratch on the 2-core
Zen 5 box (reusing trained endpoints: copy a previous run's `endpoints/` into the workdir).
Each block's q, k, v and proj share one head-grouped attention space (see
`mergejax.specs.architectures.vit_spec`); MuDSC, ZipIt! and Permute match it head by head
and Git Re-Basin weight matching too (`group_heads=True`, their default;
`--config.merge.zipit.group_heads=False` splits heads).
Expected (joint / task avg, %, seed 0, 2026-12-02): endpoints 96.5 and 97.4 on their own task,
ensemble 80.3 / 96.9; mudsc+repair 44.2 / 58.9, zipit+repair 37.6 / 58.0, permute+repair
23.6 / 40.2, weight_matching+repair 26.3 / 41.7, average 25.6 / 38.9, average+repair
20.4 / 37.4. Over seeds 0-4 (`--config.seed=N`) the three activation matchers are within 1.5
points of each other (joint ~30-32 ± 8): seed 0's ordering is noise (README).
Arguments: `:width=N` (embedding width), `:depth=N`, `:quick` (tiny run for tests).
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, width=32, depth=2, quick=False)
    c = base_config()
    c.model.name = "vit_tiny"
    c.model.width = args.width
    c.model.depth = args.depth
    c.model.pool = "mean"  # 97.8% on task a vs 95.7% with the class token (lr 0.05)
    c.train.epochs = 40
    c.train.batch_size = 32  # ~17 steps per epoch: batches of 128 leave the ViT at ~87%
    c.train.lr = 0.1
    c.train.warmup_epochs = 3.0
    c.merge.methods = ("average", "average+repair", "weight_matching+repair", "permute+repair",
                       "zipit+repair", "mudsc+repair")
    c.merge.zipit.alpha = 0.5  # as in digits_resnet20.py
    c.merge.zipit.beta = 1.0
    if args.quick:
        c.diagnostics.points = 3  # a smoke run: the curves' ends and middle
        c.merge.methods = ("average", "permute+repair", "mudsc+repair")
        c.model.width = 16
        c.model.depth = 1
        c.train.epochs = 2
        c.data.stat_batches = 2
        c.merge.repair_batches = 2
    return c
