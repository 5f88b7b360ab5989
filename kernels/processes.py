"""Several processes (hosts) of one job: start-up and the few host-side collectives they share.

`initialize` wraps `jax.distributed.initialize` (coordinator, process count and index from
arguments or the environment; gloo collectives for CPU processes, so N local processes work as
N hosts). The collectives exchange small host values (counts, flags, a number) between
processes and are the identity in a single process, so callers need no special case:

- `process_sum`: int64 counts (e.g. histograms) summed over processes, exact beyond 2^31;
- `all_processes`: every process's boolean flag (a barrier that also says who failed);
- `from_process_0`: process 0's (non-negative) integer on every process.
"""

from __future__ import annotations

import os

import jax
import numpy as np

# int64 counts travel as two int31 halves: JAX without x64 has no int64 arrays.
_HALF = 31
_LOW = (1 << _HALF) - 1


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize`, with arguments from flags or the environment.

    Args:
      coordinator: "host:port" of process 0 (env `MERGEJAX_COORDINATOR`); None lets JAX detect
        Slurm / Kubernetes / Cloud TPU.
      num_processes: env `MERGEJAX_NUM_PROCESSES`; process_id: env `MERGEJAX_PROCESS_ID`.

    CPU processes exchange collectives over gloo (set before the backend starts).
    """
    env = os.environ
    coordinator = coordinator or env.get("MERGEJAX_COORDINATOR") or None
    if num_processes is None and env.get("MERGEJAX_NUM_PROCESSES"):
        num_processes = int(env["MERGEJAX_NUM_PROCESSES"])
    if process_id is None and env.get("MERGEJAX_PROCESS_ID"):
        process_id = int(env["MERGEJAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def _gather(x: np.ndarray) -> np.ndarray:
    """(process_count, *x.shape): every process's `x` (int32 or bool), in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def process_sum(counts) -> np.ndarray:
    """`counts` (non-negative integers < 2^62, any shape) summed over all processes, int64.

    Every process must call it with the same shape (a collective).
    """
    c = np.asarray(counts, np.int64)
    if c.size and c.min() < 0:
        raise ValueError("process_sum: counts must be non-negative")
    if jax.process_count() == 1:
        return c
    halves = np.stack([(c >> _HALF).astype(np.int32), (c & _LOW).astype(np.int32)])
    g = _gather(halves).astype(np.int64)
    return (g[:, 0].sum(0) << _HALF) + g[:, 1].sum(0)


def all_processes(flag: bool) -> np.ndarray:
    """(process_count,) bool: every process's `flag`. All processes wait here for each other."""
    if jax.process_count() == 1:
        return np.array([bool(flag)])
    return _gather(np.array(bool(flag))).reshape(-1)


def from_process_0(value: int) -> int:
    """Process 0's `value` (an integer in [0, 2^62)) on every process; the others pass any
    value in range (e.g. 0) and wait for process 0's."""
    if not 0 <= int(value) < 1 << 2 * _HALF:
        raise ValueError(f"from_process_0: {value} is outside [0, 2^62)")
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    halves = np.array([int(value) >> _HALF, int(value) & _LOW], np.int32)
    hi, lo = np.asarray(multihost_utils.broadcast_one_to_all(halves)).tolist()
    return (int(hi) << _HALF) + int(lo)
