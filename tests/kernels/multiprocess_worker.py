"""One process of the multi-process ``FeatureStats`` test (tests/kernels/test_multiprocess.py).

Usage: ``python multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID OUT.npz``, or
``python multiprocess_worker.py stress ITERS UPDATES`` (one process, see :func:`stress`).

The parent sets ``JAX_PLATFORMS=cpu`` and the number of local CPU devices (``JAX_NUM_CPU_DEVICES``)
in this process's environment. The process joins a ``jax.distributed`` cluster coordinated on
127.0.0.1:PORT, builds a ``data`` mesh over all processes' devices, streams its own slice of every
batch of :func:`dataset` into ``FeatureStats`` (``shard_batch`` ->
``make_array_from_process_local_data``; CPU collectives go through gloo), and process 0 writes the
finalised mean/cov/corr to OUT.npz. Every process checks that its replica of the state agrees.
"""

import sys

import numpy as np

# (global batch size, middle axes) of the streamed batches; the last one has a size that no
# process count divides evenly per device, so it goes through ``pad_batch`` and a mask.
BATCHES = [(24, (3,)), (12, (3,)), (24, (3,)), (10, (3,))]
DIM = 10


def dataset(seed: int = 0) -> list[np.ndarray]:
    """Fixed global batches (B, 3, DIM) float32, correlated features around a large offset."""
    rng = np.random.default_rng(seed)
    mix = np.eye(DIM) + rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)
    return [(rng.standard_normal((b, *mid, DIM)) @ mix + 50.0).astype(np.float32)
            for b, mid in BATCHES]


def local_slice(batch: np.ndarray, num_processes: int, process_id: int) -> np.ndarray:
    """This process's contiguous slice of a global batch (sizes differ by at most one)."""
    return np.array_split(batch, num_processes)[process_id]


def main(port: int, num_processes: int, process_id: int, out: str) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
    from mergejax.kernels.sharding import data_mesh, pad_batch, shard_batch
    from mergejax.kernels.statistics import FeatureStats

    assert jax.process_count() == num_processes, jax.process_count()
    mesh = data_mesh()  # every process's devices, in global device order
    local = len(mesh.local_devices)
    state = FeatureStats.init(DIM, mesh)
    for batch in dataset():
        x = local_slice(batch, num_processes, process_id)
        # Every process must hand over the same local size; pad all to the largest slice.
        size = -(-batch.shape[0] // num_processes)
        x = np.pad(x, [(0, size - len(x))] + [(0, 0)] * (x.ndim - 1))
        real = np.arange(size) < len(local_slice(batch, num_processes, process_id))
        (x, real), _ = pad_batch((x, real), local)  # padded rows of ``real`` are False
        gx, gmask = shard_batch((x, real), mesh)
        assert gx.shape[0] == x.shape[0] * num_processes and not gx.is_fully_addressable
        state = state.update(gx, mesh=mesh, mask=gmask)
    # one partial state per device of all processes, combined into one replicated state
    assert state.count.shape == (mesh.devices.size,)
    state = state.combined()
    mean, cov, corr = state.finalize(name="multiprocess")
    # The combined state is replicated: every local replica must hold the same numbers.
    for arr in (mean, cov, corr):
        shards = [np.asarray(s.data) for s in arr.addressable_shards]
        assert all(np.array_equal(shards[0], s) for s in shards[1:])
    if process_id == 0:
        np.savez(out, mean=np.asarray(mean.addressable_data(0)),
                 cov=np.asarray(cov.addressable_data(0)), corr=np.asarray(corr.addressable_data(0)),
                 count=np.asarray(state.count.addressable_data(0)),
                 devices=np.array(mesh.devices.size))
    jax.distributed.shutdown()


def stress(iters: int, updates: int) -> None:
    """Regression for an XLA:CPU deadlock: a jitted forward on device 0 feeding sharded updates
    on a mesh of all (fake) CPU devices, with nothing else syncing, so async dispatch would run
    ahead. Before ``FeatureStats.update`` waited on CPU meshes, 30 x 100 updates on 8 fake devices
    aborted every time ("Expected 8 threads to join the rendezvous, but only 7 of them arrived")."""
    import jax
    import jax.numpy as jnp

    from mergejax.kernels.sharding import data_mesh
    from mergejax.kernels.statistics import FeatureStats

    mesh = data_mesh()
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    x = rng.standard_normal((64, 8, 64)).astype(np.float32)
    forward = jax.jit(lambda w, x: [jnp.tanh(x @ w), 2 * jnp.tanh(x @ w)])
    for i in range(iters):
        state = FeatureStats.init(256, mesh)
        for j in range(updates):
            state = state.update(forward(w, x + j), mesh=mesh)
        state.finalize(name=f"stress {i}")
    print(f"stress ok: {iters} x {updates} updates on {mesh.devices.size} devices", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "stress":
        stress(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
