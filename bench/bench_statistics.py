"""Throughput of the feature-statistics update vs this machine's matmul rate, in the same run.

    python bench/bench_statistics.py [--sizes 256,1024,2048,4096] [--rows 16384] [--reps R]

For each feature width d, X has N rows (float32, features 1000 + N(0, 1) with correlations).
The script prints a markdown table. Every rate is *nominal* GFLOP/s = 2*N*d^2 / time, the FLOPs of
a full X^T X. Symmetry-exploiting kernels (our blocked Gram, numpy's syrk for ``X.T @ X``) can
therefore go past 100% of the gemm rate. Columns:

* ``update``: one ``FeatureStats.update`` of all N rows (centring, mean correction, Gram, Chan
  merge, min/max, finiteness). It is jitted, its state is donated, and it runs on the default
  device.
* ``stream``: the same N rows as N/1024 updates of 1024 rows.
* ``jax XᵀY``: a jitted ``X.T @ Y`` with Y a distinct array, which forces a full gemm.
  ``jax XᵀX`` is the same with Y = X.
* ``np XᵀY``: numpy/OpenBLAS sgemm. ``np XᵀX``: numpy calls syrk here, which does half the FLOPs.
* ``% jax`` = update rate / jax XᵀY rate. ``% best gemm`` = update / max(jax XᵀY, np XᵀY).

Timings are medians over ``--reps`` (default 3, and 2 for d >= 4096 to keep the run short).
The kernels run interleaved, with the order rotated on each repetition, because this 2-core box
is shared and noisy; the header prints the load average. Compile time is excluded and reported
separately (``compile s``). Each timed call is preceded by a 50 ms pause, so that numpy's
spinning OpenBLAS threads do not slow down the next kernel.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.kernels.statistics import FeatureStats


def timed(fn):
    # OpenBLAS worker threads keep spinning for a while after a numpy call and would steal the
    # 2 cores from whatever runs next; let them go to sleep first.
    time.sleep(0.05)
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def bench(d: int, n: int, reps: int) -> dict:
    rng = np.random.default_rng(d)
    mix = (np.eye(d) + rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    x_np = rng.standard_normal((n, d), dtype=np.float32) @ mix + np.float32(1000.0)
    y_np = x_np + np.float32(1.0)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    gemm = jax.jit(lambda a, b: jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST))
    chunks = [x[i:i + 1024] for i in range(0, n, 1024)]

    state = {"s": FeatureStats.init(d)}

    def update():
        state["s"] = state["s"].update(x)
        return state["s"]

    def stream():
        for c in chunks:
            state["s"] = state["s"].update(c)
        return state["s"]

    kernels = {
        "update": update,
        "stream": stream,
        "jax XᵀY": lambda: gemm(x, y),
        "jax XᵀX": lambda: gemm(x, x),
        "np XᵀY": lambda: x_np.T @ y_np,
        "np XᵀX": lambda: x_np.T @ x_np,
    }
    compile_s = timed(update)  # first call: trace + compile (+ one run)
    for k in ("stream", "jax XᵀY"):
        jax.block_until_ready(kernels[k]())  # compile the other jits (numpy needs no warm-up)
    times = {k: [] for k in kernels}
    names = list(kernels)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(kernels[k]))
    # Sanity: the accumulated statistics are still finite and usable.
    state["s"].finalize(name=f"bench d={d}")
    gflop = 2.0 * n * d * d / 1e9
    rates = {k: gflop / float(np.median(v)) for k, v in times.items()}
    return {"d": d, "ms": 1e3 * float(np.median(times["update"])), "compile": compile_s, **rates}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024,2048,4096")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions per kernel (default 3, and 2 for d >= 4096)")
    args = parser.parse_args()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, load average "
          f"{load}; N = {args.rows} rows, float32, median of {args.reps or '3 (2 for d >= 4096)'}; "
          "rates are nominal GFLOP/s = 2*N*d^2 / t\n")
    cols = ["update", "stream", "jax XᵀY", "jax XᵀX", "np XᵀY", "np XᵀX"]
    print("| d | update ms | " + " | ".join(cols) + " | % jax XᵀY | % best gemm | compile s |")
    print("|---" * (len(cols) + 5) + "|")
    for d in (int(s) for s in args.sizes.split(",")):
        r = bench(d, args.rows, args.reps or (2 if d >= 4096 else 3))
        best = max(r["jax XᵀY"], r["np XᵀY"])
        print(f"| {d} | {r['ms']:.1f} | " + " | ".join(f"{r[c]:.0f}" for c in cols)
              + f" | {100 * r['update'] / r['jax XᵀY']:.0f}% | {100 * r['update'] / best:.0f}%"
              + f" | {r['compile']:.2f} |", flush=True)
    print("\nnp XᵀX is numpy's syrk (half the FLOPs, so its nominal rate is ~2x real). "
          "update/stream compute only the upper block-triangle of the Gram for d >= 768.")


if __name__ == "__main__":
    main()
