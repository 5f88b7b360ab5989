"""Augmented copies of a few images: random shifts (pad, then crop back), jitted.

FS-Merge and distillation fit on a handful of original images per task plus augmented copies
(the FS-Merge paper: 100 or 16 originals and 800 augmented images per task). Digits are small
(8x8, 28x28), so the augmentation is a translation of up to `max(1, H // 8)` pixels in each
direction with zero fill (1 pixel on 8x8 digits, 3 on 28x28): large enough to vary the image,
small enough not to push a digit out of the frame. Deterministic for a seed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=8)
def _shift_fn(pad: int):
    """jit fn(key, images (n, H, W, C)) -> randomly shifted images, one shift per image."""

    def shift_one(key, image):
        h, w, _ = image.shape
        padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        dy, dx = jax.random.randint(key, (2,), 0, 2 * pad + 1)
        return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))

    @jax.jit
    def shift(key, images):
        keys = jax.random.split(key, images.shape[0])
        return jax.vmap(shift_one)(keys, images)

    return shift


def max_shift(height: int) -> int:
    """The largest shift (pixels) used for images of `height` rows: max(1, height // 8)."""
    return max(1, height // 8)


def augment(images: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """The originals followed by `copies` randomly shifted copies of each.

    Args:
      images: (n, H, W, C) float32.
      copies: augmented copies per original (0 returns the originals).
      seed: the randomness; the same seed gives the same images.

    Returns:
      (n * (1 + copies), H, W, C) float32: rows [0, n) are the originals, rows
      [k*n, (k+1)*n) the k-th copy of each original (so row j is a copy of original j % n).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"augment expects images (n, H, W, C), got shape {images.shape}")
    if copies < 0:
        raise ValueError(f"augment copies must be >= 0, got {copies}")
    if copies == 0 or len(images) == 0:
        return images
    fn = _shift_fn(max_shift(images.shape[1]))
    keys = jax.random.split(jax.random.key(seed), copies)
    out = [images] + [np.asarray(fn(k, jnp.asarray(images))) for k in keys]
    return np.concatenate(out)
