"""Mesh and data-sharding helpers for data-parallel kernels.

Kernels shard the leading (batch) axis of their inputs over a 1-D mesh axis named ``data``
(:data:`DATA`). A mesh from :func:`data_mesh` uses ``AxisType.Auto`` so that ``jax.jit`` may
insert reshards for inputs that arrive with another sharding; meshes with ``Explicit`` axes are
accepted too (see :func:`constrain`).

Multi-host: call ``jax.distributed.initialize()`` first; every process then passes its own
``global_batch // process_count`` examples to :func:`shard_batch`. A run's stages take their
mesh and batches from ``mergejax.distributed`` (one mesh per run, built on these helpers).
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
_BATCH = P(DATA)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with one axis ``data`` over ``devices`` (default: all global devices).

    Works with a single device (a mesh of size 1). Axis type is ``Auto`` (``jax.make_mesh``
    defaults to ``Explicit`` since JAX 0.10, which turns ``shard_map`` in_specs into assertions).
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,), devices=devices)


def data_size(mesh: Mesh) -> int:
    """Number of shards along the ``data`` axis of ``mesh``."""
    return int(mesh.shape[DATA])


def pad_batch(x, multiple: int):
    """Zero-pad the leading axis of every array in ``x`` to a multiple of ``multiple`` (host side).

    Args:
      x: an array (B, ...) or a pytree of arrays sharing the leading size B.
      multiple: the wanted divisor, e.g. the number of (local) devices on the ``data`` axis.

    Returns:
      ``(padded, mask)``: ``padded`` has leading size ``Bp = ceil(B / multiple) * multiple``;
      ``mask`` is a bool numpy array (Bp,), True for the B real examples. Pass the mask to the
      kernel so padded rows carry zero weight.
    """
    leaves = jax.tree.leaves(x)
    b = int(leaves[0].shape[0])
    bp = -(-b // multiple) * multiple

    def pad(a):
        a = np.asarray(a)
        return np.pad(a, [(0, bp - b)] + [(0, 0)] * (a.ndim - 1)) if bp != b else a

    return jax.tree.map(pad, x), np.arange(bp) < b


def shard_batch(x, mesh: Mesh):
    """Put a host batch on ``mesh`` with its leading axis sharded over ``data``.

    Args:
      x: a host array (B_local, ...) or a pytree of them. In a single process B_local is the
        global batch; with several processes each passes its own slice (B_global / processes).
      mesh: a mesh with a ``data`` axis, e.g. from :func:`data_mesh`.

    Returns:
      The same pytree of global ``jax.Array`` s, sharded ``P('data')``, global leading size
      B_local * process_count.

    Raises:
      ValueError: if B_local is not divisible by the number of ``data`` shards held by this
        process (JAX arrays are evenly sharded). Use :func:`pad_batch` first and pass its mask.
    """
    sharding = NamedSharding(mesh, P(DATA))
    # Shards of the data axis that live on this process (all of them in a single process).
    local = data_size(mesh) * len(mesh.local_devices) // mesh.devices.size
    for a in jax.tree.leaves(x):
        if a.shape[0] % local:
            raise ValueError(
                f"batch of {a.shape[0]} is not divisible by the {local} local 'data' shards; "
                "pad it with kernels.sharding.pad_batch and pass the mask")
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), x)


def constrain(x, mesh: Mesh, spec: P = _BATCH):
    """Inside ``jax.jit``: ask for ``x`` (a pytree) laid out as ``spec`` on ``mesh``.

    Default ``spec`` shards the leading (batch) axis over ``data``; use ``P()`` for replicated.
    ``with_sharding_constraint`` for ``Auto`` meshes, ``jax.reshard`` for ``Explicit`` ones (each
    rejects the other kind of axis).
    """
    sharding = NamedSharding(mesh, spec)
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def replicate(x, mesh: Mesh | None):
    """``x`` (any pytree) replicated on every device of ``mesh``; unchanged if ``mesh`` is None."""
    if mesh is None:
        return x
    return jax.device_put(x, NamedSharding(mesh, P()))


def cpu_collectives(mesh: Mesh | None) -> bool:
    """True if a program sharded over ``mesh`` runs XLA:CPU collectives between several devices
    of this process. XLA:CPU runs every local device's share of a program on one thread pool; a
    host that runs far ahead (past the per-device in-flight limit) can make a launch hold a
    thread that a running all-reduce needs, and XLA aborts (see ``kernels.statistics``), so
    callers wait for such programs before dispatching more."""
    return (mesh is not None and len(mesh.local_devices) > 1
            and mesh.devices.flat[0].platform == "cpu")
