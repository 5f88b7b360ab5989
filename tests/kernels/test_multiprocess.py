"""``FeatureStats`` across several local processes (the multi-host path, CPU collectives via gloo),
and a subprocess regression for an XLA:CPU collective deadlock with 8 fake devices.

Each process runs ``multiprocess_worker.py``: ``jax.distributed.initialize`` on 127.0.0.1, a
``data`` mesh over every process's devices, and its own slice of each batch fed through
``shard_batch`` (``make_array_from_process_local_data``). Process 0's finalised statistics must
match float64 numpy on the whole dataset.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import multiprocess_worker as worker  # noqa: E402

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT = 120  # seconds for the whole group; the test fails (never hangs) past it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(num_processes: int, local_devices: int, out: pathlib.Path, logs: pathlib.Path):
    """Start the workers, wait for all of them (bounded), kill leftovers; return exit codes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(local_devices))
    env.pop("XLA_FLAGS", None)  # the parent's 8-fake-device flag would override the count
    port = _free_port()
    procs, files = [], []
    try:
        for i in range(num_processes):
            f = open(logs / f"worker{i}.log", "w")
            files.append(f)
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(port), str(num_processes), str(i), str(out)],
                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for f in files:
            f.close()


def _reference():
    rows = np.concatenate([b.reshape(-1, worker.DIM) for b in worker.dataset()]).astype(np.float64)
    cov = np.cov(rows, rowvar=False, bias=True)
    sd = np.sqrt(np.diag(cov))
    return len(rows), rows.mean(0), cov, cov / np.maximum(np.outer(sd, sd), 1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("num_processes,local_devices", [(2, 2), (3, 1)])
def test_feature_stats_across_processes(tmp_path, num_processes, local_devices):
    out = tmp_path / "stats.npz"
    codes = _run_group(num_processes, local_devices, out, tmp_path)
    if codes != [0] * num_processes:
        logs = "\n".join(f"--- worker {i} ---\n" + (tmp_path / f"worker{i}.log").read_text()[-3000:]
                         for i in range(num_processes))
        pytest.fail(f"workers exited with {codes} (None = timed out after {TIMEOUT} s)\n{logs}")
    got = np.load(out)
    n, mean, cov, corr = _reference()
    assert int(got["devices"]) == num_processes * local_devices
    assert int(got["count"]) == n
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got["cov"], cov, atol=1e-5 * np.abs(cov).max(), rtol=0)
    np.testing.assert_allclose(got["corr"], corr, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_streamed_cpu_mesh_updates_do_not_deadlock(tmp_path):
    # In a subprocess: a deadlock makes XLA abort the process after 40 s, or hang.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    log = tmp_path / "stress.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(WORKER), "stress", "30", "100"], env=env,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
            code = None
    out = log.read_text()
    assert code == 0 and "stress ok" in out, f"exit {code} (None = timeout)\n{out[-3000:]}"
