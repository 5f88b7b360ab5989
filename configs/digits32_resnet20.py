"""ZipIt!'s merging protocol on digits at 32x32: ResNet-20 x2, tasks 0-4 and 5-9.

    python launch.py --config=configs/digits32_resnet20.py --workdir=/tmp/d32

Digits bilinearly upsampled to 32x32, replicated to 3 channels and normalised by the training
pixels' scalar mean and std (dataset `digits32`). One ResNet-20 per task, then the protocol of
ZipIt!'s evaluation scripts: the endpoints' BatchNorm statistics are reset first, statistics and
every reset read all training images of the tasks in dataset order (batches of 128, the last
partial batch kept), and every BatchNorm reset is torch's `momentum=None`
(`repair.estimator="per_batch"`). `tests/test_zipit_parity.py` checks this pipeline image for
image against a plain torch reference of ZipIt!'s algorithm.

Expected (width 1): endpoints 98.3% / 99.6% on their own task's test digits, ensemble 94.3%
joint; joint (task avg) average+repair 24.5 (37.8), permute+repair 51.9 (74.1), zipit+repair
56.9 (78.3), zipit@stream2+repair 61.9 (81.1), zipit@stream1+repair 79.2 (92.3). The torch
reference reproduces average/permute/zipit+repair exactly on these endpoints. Measured 3.0 min
from scratch on a 2-core CPU shared with other jobs (load average 5-6; training is ~2 min of
it), 74 s when the endpoints are reused.
Endpoints from PyTorch instead of training (ZipIt!'s `resnet20(w=1, num_classes=5)` layout):
`--config.endpoints.checkpoints="('a.pt','b.pt')"`.
Arguments: `:width=N`, `:quick` (tiny run for tests: one epoch, the first 2 batches for
statistics and resets, zipit+repair only).
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, width=1, quick=False)
    c = base_config()
    c.data.name = "digits32"
    c.data.task_classes = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    # ZipIt!'s protocol: every training image of the tasks, in order, last partial batch kept
    c.data.shuffle_statistics = False
    c.data.stat_batches = 0
    c.merge.repair_batches = 0
    c.repair.estimator = "per_batch"
    c.repair.reset_endpoints = True
    c.model.name = "resnet20"
    c.model.width = args.width
    # 32x32 ResNet-20 costs ~16x the 8x8 digits per image: few epochs of small batches
    c.train.epochs = 8
    c.train.batch_size = 64
    c.train.lr = 0.05
    c.merge.methods = ("average+repair", "permute+repair", "zipit+repair",
                       "zipit@stream2+repair", "zipit@stream1+repair")
    # as configs/digits_resnet20.py: (0.5, 1.0), MuDSC's choice; ZipIt!'s code defaults are
    # (0.3, 0.125)
    c.merge.zipit.alpha = 0.5
    c.merge.zipit.beta = 1.0
    if args.quick:
        c.diagnostics.points = 3  # a smoke run: the curves' ends and middle
        c.model.width = 1
        c.train.epochs = 1
        c.data.stat_batches = 2  # still in order, still per_batch, just fewer images
        c.merge.repair_batches = 2
        c.merge.methods = ("zipit+repair",)
    return c
