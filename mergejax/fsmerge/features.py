"""Endpoint features the fits need: head inputs (the global objective's targets) and the tap
moments a ZipIt! initialisation matches on."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.fsmerge.objective import forward, head_paths
from mergejax.kernels.sharding import data_mesh
from mergejax.kernels.statistics import FeatureStats, Moments
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec, flatten


def head_width(model: Model, variables: Variables) -> int:
    """Width of the features the head reads (the head kernel's input size)."""
    kernel, _ = head_paths(model, flatten(variables))
    return int(np.shape(flatten(variables)[kernel])[0])


@functools.lru_cache(maxsize=16)
def _head_inputs_fn(model: Model):
    def run(trunk, eye, x):
        return forward(model, trunk, eye, x, train=False)[0]

    return jax.jit(run)


def head_inputs(model: Model, variables: Variables, images: np.ndarray,
                batch_size: int = 256) -> np.ndarray:
    """The features (n, d) the head of `variables` reads for `images` (n, H, W, C), eval mode."""
    flat = flatten(variables)
    d = head_width(model, variables)
    trunk = {k: v for k, v in flat.items() if not k.startswith(f"params/{model.head}/")}
    fn = _head_inputs_fn(model)
    eye = jnp.eye(d, dtype=jnp.float32)
    out = [np.asarray(fn(trunk, eye, images[s:s + batch_size]))
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)


@functools.lru_cache(maxsize=16)
def _taps_fn(model: Model, taps: tuple[str, ...]):
    def run(endpoints, x):
        outs = [model.features(v, x)[1] for v in endpoints]
        return {t: [o[t] for o in outs] for t in taps}

    return jax.jit(run)


def tap_moments(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                images: np.ndarray, batch_size: int = 128) -> dict[str, Moments]:
    """Per space with a tap, the moments of the N endpoints' concatenated activations on
    `images` (n, H, W, C), streamed in batches of `batch_size` exactly as
    `mergejax.statistics.collect` does (that module sits above this layer)."""
    spaces = [s for s in spec.spaces if s.tap is not None]
    mesh = data_mesh() if jax.device_count() > 1 else None
    fn = _taps_fn(model, tuple(sorted({s.tap for s in spaces})))
    states = {s.name: FeatureStats.init(len(endpoints) * s.width, mesh) for s in spaces}
    for start in range(0, len(images), batch_size):
        taps = fn(list(endpoints), images[start:start + batch_size])
        if mesh is not None:
            taps = jax.block_until_ready(taps)
        for s in spaces:
            states[s.name] = states[s.name].update(taps[s.tap], mesh=mesh)
    return {s.name: states[s.name].finalize(name=s.tap, widths=[s.width] * len(endpoints))
            for s in spaces}
