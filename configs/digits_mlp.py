"""Digits 5+5 with a two-hidden-layer MLP: the fastest full run (about a minute on a 2-core CPU).

    python launch.py --config=configs/digits_mlp.py --workdir=/tmp/mergejax_mlp

Expected: endpoints ~97% on their own task; matching merges far above plain averaging.
Arguments: `:hidden=N` (width of both hidden layers), `:quick`.
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, hidden=256, quick=False)
    c = base_config()
    c.model.name = "mlp"
    c.model.hidden = (args.hidden, args.hidden)
    c.train.epochs = 30
    c.train.lr = 0.05
    c.merge.methods = ("average", "weight_matching", "permute", "zipit")
    if args.quick:
        c.model.hidden = (32, 32)
        c.train.epochs = 2
        c.data.stat_batches = 2
        c.merge.repair_batches = 2
    return c
