"""FS-Merge on MNIST (the paper's split-MNIST setting): two MLPs from different initialisations,
one per 5-digit task of `mnist5k`, merged from `images` images per task, against ZipIt!, MuDSC,
RegMean and distillation on the same endpoints and the same images.

    pip install -e ".[mnist]"
    python launch.py --config=configs/mnist_fsmerge.py:images=16 --workdir=/tmp/mergejax_mfs
    python launch.py --config=configs/mnist_fsmerge.py:images=100 --workdir=/tmp/mergejax_mfs
    python launch.py --config=configs/mnist_fsmerge.py:images=1000 --workdir=/tmp/mergejax_mfs

MLP 256-256 on the 28x28 digits flattened, 20 epochs per endpoint (seeded task split; the
workdir's endpoints serve every budget). Every merge reads only the budget's images (the
matching methods' statistics and REPAIR too). FS-Merge: ZipIt! init, diagonal + rank-12 low
rank, global objective, AdamW one-cycle at lr 1e-3, 8 shifted copies per image, `steps` steps;
distillation the same budget and steps.
Arguments: `:images=N` (per task; 0 = all), `:steps=N`, `:quick` (tests).
"""

from mergejax.config_lib import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, images=100, steps=1000, quick=False)
    c = base_config()
    c.data.name = "mnist5k"
    c.data.num_tasks = 2
    c.data.images_per_task = args.images
    c.model.name = "mlp"
    c.model.hidden = (256, 256)
    c.train.epochs = 20
    c.train.lr = 0.05
    c.merge.methods = ("zipit+repair", "mudsc+repair", "regmean", "fs_merge", "distill")
    c.merge.zipit.alpha = 0.5  # as in digits_mlp.py
    c.merge.zipit.beta = 1.0
    c.merge.fs_merge.init = "zipit"
    c.merge.fs_merge.steps = args.steps
    c.merge.fs_merge.lr = 1e-3  # the paper's 1e-4 underfits in 1000 steps here (README)
    c.merge.distill.steps = args.steps
    if args.quick:
        c.model.hidden = (32, 32)
        c.train.epochs = 1
        c.data.stat_batches = 2
        c.merge.repair_batches = 2
        c.merge.fs_merge.steps = 20
        c.merge.distill.steps = 20
        c.merge.fs_merge.augment = 1
        c.merge.distill.augment = 1
    return c
