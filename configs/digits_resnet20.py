"""The embedded default: scikit-learn digits, two tasks of 5 digits, ResNet-20.

    python launch.py --config=configs/digits_resnet20.py --workdir=/tmp/mergejax

Trains one ResNet-20 (width 2) per task, then merges them with every matching method and draws
the diagnostics: 2 min 11 s on a 2-core CPU once the endpoints are trained (a second run reuses
them), 92 s of it the interpolation curves (`--config.diagnostics.enabled=False` skips them).
Expected: endpoints 99% on their own task's test digits, ensemble 92.6% joint; zipit+repair
67.8, mudsc+repair 70.7, permute+repair 30.2, average+repair 16.6, zipit@stream1+repair 82.5
(README has the full table).
Arguments: `:width=N`, `:quick` (tiny run for tests).
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, width=2, quick=False)
    c = base_config()
    c.model.name = "resnet20"
    c.model.width = args.width
    c.train.epochs = 15
    c.train.lr = 0.05
    c.merge.methods = ("average", "average+repair", "weight_matching+repair", "permute+repair",
                       "zipit", "zipit+repair", "mudsc+repair", "zipit@stream2+repair",
                       "zipit@stream1+repair")
    # ZipIt!'s code defaults (alpha 0.3, beta 0.125) give 35.0% joint here; the paper finds
    # beta > 0.8 best on CIFAR, and MuDSC's script uses (0.5, 1.0): 67.8% joint on digits.
    c.merge.zipit.alpha = 0.5
    c.merge.zipit.beta = 1.0
    if args.quick:
        c.diagnostics.points = 3  # a smoke run: the curves' ends and middle
        c.merge.methods = ("average", "average+repair", "zipit@stream1+repair")
        c.model.width = 1
        c.train.epochs = 2
        c.data.stat_batches = 2
        c.merge.repair_batches = 2
    return c
