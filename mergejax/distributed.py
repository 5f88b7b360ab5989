"""Where a run's work goes: one `data` mesh over every device of every process, and this
process's part of each batch.

Every data-parallel stage (training, statistics, BatchNorm reset and REPAIR, evaluation,
batched search trials) asks this module for the run's mesh (`mesh()`, built once per process
over `jax.devices()`: all devices of all processes) and places its batches with `put_batch`:
the global host batch, identical on every process (same seeds), is zero-padded to a multiple of
the `data` axis, this process keeps only its own rows (`local_rows`) and they become one global
array sharded `P('data')` (`jax.make_array_from_process_local_data` on several processes).
Variables are replicated (`replicate`). Padding rows get mask False, and every stage gives them
zero weight (`masked_batch_norm` for train-mode BatchNorm), so numbers do not depend on the
device count.

Multi-host: `initialize` (before anything touches devices) wraps `jax.distributed.initialize`
and selects gloo CPU collectives, so N local CPU processes work as N hosts. Process 0 is the
writer (`is_writer`): only it writes files; `broadcast` hands its values (a loaded checkpoint,
a decision) to the others.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax.kernels.processes import initialize  # noqa: F401 (re-exported)
from mergejax.kernels.sharding import DATA, cpu_collectives, data_mesh, data_size, pad_batch

_OVERRIDE: list[Mesh] = []


def process_index() -> int:
    """This process's index in [0, process_count())."""
    return jax.process_index()


def process_count() -> int:
    """The number of processes of the run (1 without `initialize`)."""
    return jax.process_count()


def is_writer() -> bool:
    """True on the one process that writes files (process 0)."""
    return jax.process_index() == 0


DEVICES_ENV = "MERGEJAX_DATA_DEVICES"


@functools.cache
def _global_mesh() -> Mesh:
    # Fake CPU devices (tests) make data parallelism pure overhead; this env var lets a
    # single-process run use only its first k devices.
    k = os.environ.get(DEVICES_ENV, "").strip()
    if not k:
        return data_mesh()
    if not k.isdigit() or not 1 <= int(k) <= jax.device_count() or jax.process_count() > 1:
        raise ValueError(f"{DEVICES_ENV}={k!r}: must be an integer in [1, "
                         f"{jax.device_count()}], and unset on several processes")
    return data_mesh(jax.devices()[:int(k)])


def mesh() -> Mesh:
    """The run's mesh: one `data` axis over all devices of all processes (or the first
    `MERGEJAX_DATA_DEVICES` of them, or the mesh of an enclosing `use_mesh`). Built on first
    use, then the same object, so compiled functions cached on it are reused."""
    return _OVERRIDE[-1] if _OVERRIDE else _global_mesh()


@contextlib.contextmanager
def use_mesh(m: Mesh) -> Iterator[Mesh]:
    """Within the block, `mesh()` is `m` (e.g. a one-device mesh to compare against)."""
    _OVERRIDE.append(m)
    try:
        yield m
    finally:
        _OVERRIDE.pop()


def batch_sharding(m: Mesh) -> NamedSharding:
    """Leading axis sharded over `data`."""
    return NamedSharding(m, P(DATA))


def replicated_sharding(m: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(m, P())


def local_rows(n: int, m: Mesh) -> slice:
    """The rows of a global batch of `n` (a multiple of the `data` size) held by this process.

    Raises ValueError if this process's devices do not hold one contiguous block of rows.
    """
    index = batch_sharding(m).addressable_devices_indices_map((n,))
    starts = sorted(ix[0].start or 0 for ix in index.values())
    stops = sorted(n if ix[0].stop is None else ix[0].stop for ix in index.values())
    if any(b != a for a, b in zip(stops[:-1], starts[1:])):
        raise ValueError(f"the devices of process {jax.process_index()} hold rows "
                         f"{list(zip(starts, stops))} of the mesh's 'data' axis, not one block")
    return slice(starts[0], stops[-1])


def put_batch(x, m: Mesh | None = None):
    """A global host batch on the mesh, sharded over `data`, padded rows masked.

    Args:
      x: a numpy array (B, ...) or a pytree of them sharing B, the same on every process.
      m: the mesh (default: `mesh()`).

    Returns:
      `(arrays, mask)`: global jax arrays of leading size Bp (B rounded up to a multiple of
      the `data` axis), sharded `P('data')`; `mask` a (Bp,) bool array sharded the same way,
      True on the B real rows, or None when no row was padded.
    """
    m = mesh() if m is None else m
    padded, mask = pad_batch(x, data_size(m))
    rows = local_rows(len(mask), m)
    sharding = batch_sharding(m)

    def put(a):
        a = np.asarray(a)[rows]
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        return jax.make_array_from_process_local_data(sharding, a)

    arrays = jax.tree.map(put, padded)
    return arrays, (None if mask.all() else put(mask))


def replicate(tree, m: Mesh | None = None):
    """`tree` (equal on every process) replicated on every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh() if m is None else m))


def wait(tree, m: Mesh | None = None):
    """Blocks on `tree` when `m` (default: the run's mesh) spans several local CPU devices
    (`kernels.sharding.cpu_collectives`: one collective program in flight at a time); on
    GPU/TPU a no-op. Returns `tree`."""
    if cpu_collectives(mesh() if m is None else m):
        jax.block_until_ready(tree)
    return tree


@contextlib.contextmanager
def masked_batch_norm(mask) -> Iterator[None]:
    """Within the block (while tracing), train-mode BatchNorm layers compute their batch
    statistics on rows where `mask` (B,) is True only; no-op when `mask` is None."""
    if mask is None:
        yield
        return

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            x = args[0]
            kwargs = {**kwargs, "mask": mask.reshape((-1,) + (1,) * (x.ndim - 1))}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def broadcast(tree):
    """Process 0's `tree` (numpy leaves) on every process; unchanged in a single process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def to_host(tree):
    """A pytree of replicated (possibly multi-process) arrays as numpy, from the local copy."""
    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(get, tree)
