"""Feature statistics of N models at the taps of a merge spec (model-aware glue over kernels).

For every space to merge, the activations of all N models at the space's tap are streamed into
`mergejax.kernels.statistics.FeatureStats` as one joint feature vector (the models side by side
along the channel axis), so the result holds the within- and cross-model covariance/correlation
of the N*n features.

Each batch's forward pass of every endpoint and the statistics update of every space run in one
compiled program (the taps never leave it). A tap sown as row parts (`Model.feature_parts`: a
transformer's stream and attention taps) is folded as one row set (`FeatureStats.fold_parts`),
so its concatenation is never written. With several devices the batch is sharded over the
`data` axis of the run's mesh (`mergejax.distributed`: all devices of all processes, padded rows
masked), the endpoints replicated, and every device folds its rows into its own partial state;
the partial states are combined once, at the end (`FeatureStats.combined`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from mergejax import distributed
from mergejax.kernels.sharding import DATA, data_size
from mergejax.kernels.statistics import FeatureStats, Moments
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec


@functools.lru_cache(maxsize=16)
def taps_fn(model: Model, taps: tuple[str, ...]):
    """jit fn(endpoints, x) -> {tap: [activation of model i at tap (B, ..., C)]}, cached."""

    def taps_of_all(endpoints, x):
        outs = [model.features(v, x)[1] for v in endpoints]
        return {t: [o[t] for o in outs] for t in taps}

    return jax.jit(taps_of_all)


@functools.lru_cache(maxsize=16)
def fused_step_fn(model: Model, space_taps: tuple[tuple[str, str], ...],
                  mesh: jax.sharding.Mesh | None = None):
    """jit fn(states, endpoints, x, mask) -> states: one batch's forward of every endpoint and
    the statistics update of every space, in one compiled program (the taps never leave it;
    the states are donated). `mesh` None: one device; else x (B, ...) and mask (B,) or None
    come sharded over its `data` axis and the states are per-device partial states
    (`FeatureStats.init(d, mesh)`): the program has no collective."""

    def step(states, endpoints, x, mask=None):
        # on a mesh: this device's rows, endpoints and partial states (inside shard_map)
        outs = [model.feature_parts(v, x)[1] for v in endpoints]
        new = {}
        for s, t in space_taps:
            # a tap sown as row parts: their rows folded as one set (the same statistics as
            # their concatenation, which is never written)
            new[s] = states[s].fold_parts([list(p) for p in zip(*(o[t] for o in outs))], mask)
        return new

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    data = P(DATA)

    def sharded(states, endpoints, x, mask=None):
        # Forward and update per device, written per device (shard_map) rather than left to
        # the SPMD partitioner: the same numbers, with no collective and less glue.
        args = (states, endpoints, x) if mask is None else (states, endpoints, x, mask)
        in_specs = (data, P(), data) if mask is None else (data, P(), data, data)
        return jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=data)(*args)

    return jax.jit(sharded, donate_argnums=0)


def collect(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
            batches: Iterable[np.ndarray], spaces: Sequence[str] | None = None,
            mesh: jax.sharding.Mesh | None = None) -> dict[str, Moments]:
    """Per space, `Moments(mean (N*n,), cov (N*n, N*n), corr (N*n, N*n))` of the N models.

    Args:
      model, spec: the architecture and its merge spec.
      endpoints: N variable trees.
      batches: image batches (B, H, W, C); conv features count every spatial position.
      spaces: spaces to collect (default: all spaces with a tap).
      mesh: a mesh with a `data` axis. Default: the run's mesh (`mergejax.distributed.mesh()`);
        a one-device mesh runs the unsharded program. On a mesh, every device keeps its own
        partial statistics and the step has no collective (each device's forward and update
        see only its rows), so the host never waits for a step; the partial states are
        combined once, at the end.

    Raises:
      ValueError naming the tap when an activation is NaN or infinite.
    """
    wanted = [spec.space(s) for s in (spaces if spaces is not None else spec.space_names)]
    wanted = [s for s in wanted if s.tap is not None]
    mesh = distributed.mesh() if mesh is None else mesh
    sharded = data_size(mesh) > 1 or jax.process_count() > 1
    n_models = len(endpoints)
    states = {s.name: FeatureStats.init(n_models * s.width, mesh if sharded else None)
              for s in wanted}
    step = fused_step_fn(model, tuple((s.name, s.tap) for s in wanted),
                         mesh if sharded else None)
    endpoints = distributed.replicate(list(endpoints), mesh) if sharded else list(endpoints)
    seen = 0
    for x in batches:
        x, mask = distributed.put_batch(np.asarray(x), mesh) if sharded else (x, None)
        states = step(states, endpoints, x, mask)
        seen += 1
    if not seen:
        raise ValueError("statistics need at least one batch of images")
    return {s.name: states[s.name].finalize(name=s.tap, widths=[s.width] * n_models)
            for s in wanted}


class StatisticsCache:
    """Feature statistics of fixed endpoints on fixed data, collected on demand, once per space.

    A run (or one `mergejax.merge` call) makes one cache; every matching method asks it for the
    spaces it merges, and only spaces not seen before cost a pass over the data (all missing
    spaces in one pass).

    Args:
      model, spec, endpoints: as for `collect`.
      batches: returns a fresh iterable of image batches (B, H, W, C) each call.
    """

    def __init__(self, model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                 batches: Callable[[], Iterable[np.ndarray]]):
        self.model, self.spec, self.endpoints, self.batches = model, spec, endpoints, batches
        self._moments: dict[str, Moments] = {}

    def get(self, spaces: Sequence[str]) -> dict[str, Moments]:
        """`{space: Moments}` for every space of `spaces` that has a tap."""
        observed = [s for s in spaces if self.spec.space(s).tap is not None]
        missing = [s for s in observed if s not in self._moments]
        if missing:
            self._moments.update(collect(self.model, self.spec, self.endpoints, self.batches(),
                                         spaces=missing))
        return {s: self._moments[s] for s in observed}
