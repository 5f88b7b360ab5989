"""Shared test fixtures: tiny models with random BatchNorm statistics."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mergejax import models


def random_batch_stats(variables, seed=0):
    """Variables with BatchNorm mean ~ U(-0.5, 0.5) and var ~ U(0.5, 2) (as in the golden)."""
    if "batch_stats" not in variables:
        return variables
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    flat = {k: (rng.uniform(-0.5, 0.5, a.shape) if k.endswith("mean")
                else rng.uniform(0.5, 2.0, a.shape)).astype(np.float32) for k, a in flat.items()}
    return {**variables, "batch_stats": traverse_util.unflatten_dict(flat, sep="/")}


TINY = {
    "mlp": (dict(num_classes=5, hidden=(16, 12)), (4, 8, 8, 1)),
    "resnet20": (dict(width=1, num_classes=5), (4, 8, 8, 1)),
    "vgg11": (dict(width=1, num_classes=5), (2, 32, 32, 3)),
    "resnet50": (dict(width=0.125, num_classes=5, stage_sizes=(2, 1, 1, 1)), (2, 32, 32, 3)),
}


def tiny(name, seed=0):
    """(model, variables with random BN stats, input batch) for a tiny `name` model."""
    kwargs, shape = TINY[name]
    model = models.create(name, **kwargs)
    x = jax.random.normal(jax.random.key(seed + 100), shape)
    variables = model.init(jax.random.key(seed), jnp.zeros(shape))
    return model, random_batch_stats(jax.tree.map(np.asarray, variables), seed), np.asarray(x)
