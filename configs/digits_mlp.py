"""Digits 5+5 with a two-hidden-layer MLP: the fastest full run (6 s on a 2-core CPU).

    python launch.py --config=configs/digits_mlp.py --workdir=/tmp/mergejax_mlp

Expected: endpoints 97-100% on their own task, ensemble 85.8% joint; mudsc+repair 85.3,
zipit+repair 81.8, regmean 81.0 (permute-aligned, on every training image of each task),
weight_matching+repair 79.9, permute+repair 73.3, average+repair 71.6.
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
    c.merge.methods = ("average", "average+repair", "weight_matching+repair", "permute+repair",
                       "zipit+repair", "mudsc+repair", "zipit@hidden0+repair", "regmean")
    c.merge.zipit.alpha = 0.5  # as in digits_resnet20.py
    c.merge.zipit.beta = 1.0
    if args.quick:
        c.diagnostics.points = 3  # a smoke run: the curves' ends and middle
        c.merge.methods = ("average+repair", "permute+repair", "zipit+repair")
        c.model.hidden = (32, 32)
        c.train.epochs = 2
        c.data.stat_batches = 2
        c.merge.repair_batches = 2
    return c
