"""Host-side batching and augmentation (numpy; deterministic for a seed).

Batches keep one shape so that jitted steps compile once: training drops the ragged tail,
evaluation pads the last batch and returns a mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from mergejax.registry import Registry

_AUGMENTS: Registry = Registry("augmentation")
_AUGMENTS.register("none", lambda x, rng: x)


@_AUGMENTS.decorator("crop_flip")
def _crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop after `pad`-pixel zero padding and random horizontal flip (CIFAR standard)."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, b))
    rows = dy[:, None] + np.arange(h)[None]
    cols = dx[:, None] + np.arange(w)[None]
    out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = rng.random(b) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  rng: np.random.Generator, augment: str = "none"
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled, augmented batches of exactly `batch_size` (ragged tail dropped).

    If the split is smaller than one batch, one batch of all examples is returned.
    """
    aug = _AUGMENTS.get(augment)
    order = rng.permutation(len(labels))
    size = min(batch_size, len(labels))
    for start in range(0, len(order) - size + 1, size):
        idx = order[start:start + size]
        yield aug(images[idx], rng), labels[idx]


def eval_batches(images: np.ndarray, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, int]]:
    """Batches of exactly `batch_size` in order, the last padded; yields (batch, n_valid)."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]),
                                                    chunk.dtype)])
        yield chunk, n


def image_batches(images: np.ndarray, batch_size: int, num_batches: int = 0, *, seed: int = 0,
                  shuffle: bool = True, keep_last: bool = False
                  ) -> Callable[[], Iterator[np.ndarray]]:
    """A function returning the same image batches (B, H, W, C) every call.

    Args:
      images: (N, H, W, C).
      batch_size: images per batch (at most N).
      num_batches: the most batches to give (0: all).
      seed: the shuffle's seed.
      shuffle: a seeded permutation of the images (False: the images in order).
      keep_last: give the last, smaller batch too (as a torch DataLoader without drop_last).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def batches():
        order = (np.random.default_rng(seed).permutation(len(images)) if shuffle
                 else np.arange(len(images)))
        size = min(batch_size, len(images))
        starts = range(0, len(images) - (0 if keep_last else size - 1), size)
        for b, start in enumerate(starts):
            if num_batches and b >= num_batches:
                return
            yield images[order[start:start + size]]

    return batches
