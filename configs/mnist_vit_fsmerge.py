"""FS-Merge on MNIST with the tiny ViT: two `vit_tiny`s from different initialisations
(configs/mnist_vit.py's endpoints) merged from `images` images per task, against ZipIt!, MuDSC,
RegMean and distillation on the same endpoints and the same images.

    pip install -e ".[mnist]"
    python launch.py --config=configs/mnist_vit_fsmerge.py:images=100 --workdir=/tmp/mergejax_mvit

The same workdir as configs/mnist_vit.py reuses its endpoints. Every merge reads only the
budget's images (matching statistics and REPAIR too). FS-Merge: ZipIt! init (head-grouped),
diagonal + rank-12 low rank, global objective, AdamW one-cycle at lr 1e-3, 8 shifted copies
per image; distillation the same budget and steps.
Arguments: `:images=N` (per task; 0 = all), `:steps=N`, `:quick` (tests).
"""

from pathlib import Path

from mergejax.config_lib import load_config_file, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, images=100, steps=1000, quick=False)
    c = load_config_file(Path(__file__).with_name("mnist_vit.py"), "quick" if args.quick else None)
    c.data.images_per_task = args.images
    c.merge.methods = ("zipit+repair", "mudsc+repair", "regmean", "fs_merge", "distill")
    c.merge.fs_merge.init = "zipit"
    c.merge.fs_merge.steps = args.steps
    c.merge.fs_merge.lr = 1e-3  # as configs/mnist_fsmerge.py
    c.merge.distill.steps = args.steps
    if args.quick:
        c.merge.fs_merge.steps = 10
        c.merge.distill.steps = 10
        c.merge.fs_merge.augment = 1
        c.merge.distill.augment = 1
    return c
