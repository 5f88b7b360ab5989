"""PRNG keys to host seeds: one helper, so every method derives numpy seeds the same way."""

from __future__ import annotations

import jax
import numpy as np


def seed_from_key(key: jax.Array | int | None) -> int:
    """A non-negative host seed (for `np.random.default_rng`) from a JAX PRNG key.

    Accepts new-style typed keys (`jax.random.key(s)`), legacy uint32 keys
    (`jax.random.PRNGKey(s)`), a plain int (returned as is) or None (seed 0). For a key made
    from seed `s` the result is `s` (the key's last word), so `key(3)` and `PRNGKey(3)` agree.
    """
    if key is None:
        return 0
    if isinstance(key, int | np.integer):
        if key < 0:
            raise ValueError(f"seed must be >= 0, got {key}")
        return int(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return int(np.asarray(key).ravel()[-1])
