"""FS-Merge on digits: two MLPs from different initialisations merged from a few images per task,
against ZipIt!, MuDSC, RegMean and distillation on the same endpoints and the same images.

    python launch.py --config=configs/digits_fsmerge.py --workdir=/tmp/mergejax_fsmerge
    python launch.py --config=configs/digits_fsmerge.py:images=16 --workdir=/tmp/mergejax_fsmerge

Endpoints as configs/digits_mlp.py (hidden 256-256, 30 epochs; the same workdir serves both).
Every merge reads only `images` training images per task (`data.images_per_task`, a seeded
class-stratified subset): the matching methods' statistics and REPAIR too. FS-Merge starts from
ZipIt!'s merge (`init="zipit"`), diagonal + rank-12 low-rank matrices, global feature
reconstruction, AdamW with a one-cycle schedule at lr 1e-3, 8 shifted copies per image;
distillation gets the same budget and steps.
Arguments: `:images=N` (per task; 0 = all), `:steps=N`, `:quick` (tests).
"""

from pathlib import Path

from mergejax.config_lib import load_config_file, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, images=100, steps=1000, quick=False)
    c = load_config_file(Path(__file__).with_name("digits_mlp.py"), "quick" if args.quick else None)
    c.data.images_per_task = args.images
    c.merge.methods = ("zipit+repair", "mudsc+repair", "regmean", "fs_merge", "distill")
    c.merge.fs_merge.init = "zipit"
    c.merge.fs_merge.steps = args.steps
    c.merge.fs_merge.lr = 1e-3  # the paper's 1e-4 underfits in 1000 steps here (README)
    c.merge.distill.steps = args.steps
    c.merge.zipit.alpha = 0.5
    c.merge.zipit.beta = 1.0
    if args.quick:
        c.merge.fs_merge.steps = 20
        c.merge.distill.steps = 20
        c.merge.fs_merge.augment = 1
        c.merge.distill.augment = 1
    return c
