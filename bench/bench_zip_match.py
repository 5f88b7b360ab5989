"""Benchmark: `zip_match` (jitted JAX kernel) against the naive ZipIt! loop (numpy oracle).

    python bench/bench_zip_match.py                      # 2n = 512, 2048, 8192
    python bench/bench_zip_match.py --sizes 512,2048 --reps 3

The naive loop is `tests/kernels/zipit_oracle.py`: a flat argmax over the remaining matrix and a
row + column deletion per step, i.e. the published algorithm's O(n^3) structure. It runs only up
to `--naive-max` (default 2048; ~1.5-2 s per run there on a 2-core CPU). Beyond that its time is
extrapolated from the growth exponent measured between the two largest sizes it ran at, and the
table says so. zip_match is timed after a warm-up call (compile time reported separately), with
`block_until_ready`; every timing is the median of the repetitions, the two implementations
interleaved. Where both ran, the results are checked for equality.

Inputs: the Pearson correlation (float32) of two synthetic "models" with n features each over
1024 samples; model B is a permuted noisy copy of model A.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

from mergejax.kernels.zip_match import zip_match

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from zipit_oracle import zipit_oracle  # noqa: E402


def make_corr(two_n: int, seed: int = 0, samples: int = 1024) -> np.ndarray:
    """(2n, 2n) float32 correlation of [A, B]; B = A's features permuted, with more noise."""
    rng = np.random.default_rng(seed)
    n = two_n // 2
    z = rng.standard_normal((samples, n), dtype=np.float32)
    a = z + 0.5 * rng.standard_normal((samples, n), dtype=np.float32)
    b = z[:, rng.permutation(n)] + 0.8 * rng.standard_normal((samples, n), dtype=np.float32)
    f = np.concatenate([a, b], axis=1)
    f -= f.mean(axis=0)
    f /= f.std(axis=0)
    return (f.T @ f / np.float32(samples)).astype(np.float32)


def _time(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def _fmt(sec: float) -> str:
    return f"{sec * 1e3:.1f} ms" if sec < 1 else f"{sec:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,2048,8192", help="comma-separated 2n values")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (3 above 2n=4096)")
    parser.add_argument("--naive-max", type=int, default=2048,
                        help="largest 2n at which the naive loop is actually run")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--beta", type=float, default=0.125)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    def jax_fn(c):
        return jax.block_until_ready(zip_match(c, alpha=args.alpha, beta=args.beta))

    rows, naive_measured = [], {}
    for two_n in sizes:
        corr = make_corr(two_n)
        corr_dev = jax.device_put(corr)
        compile_s, (_, u_jax) = _time(jax_fn, corr_dev)  # includes compilation
        reps = args.reps if two_n <= 4096 else min(args.reps, 3)
        run_naive = two_n <= args.naive_max
        t_jax, t_naive, same = [], [], None
        for _ in range(reps):
            t_jax.append(_time(jax_fn, corr_dev)[0])
            if run_naive:
                dt, (_, u_np) = _time(zipit_oracle, corr, args.alpha, args.beta, 2)
                t_naive.append(dt)
                same = bool(np.array_equal(np.asarray(u_jax), u_np))
        jax_med = statistics.median(t_jax)
        if run_naive:
            naive = statistics.median(t_naive)
            naive_measured[two_n] = naive
            naive_txt = f"{_fmt(naive)} (median of {reps})"
        else:
            done = sorted(naive_measured)
            if len(done) >= 2:
                (s0, s1) = done[-2:]
                k = math.log(naive_measured[s1] / naive_measured[s0]) / math.log(s1 / s0)
                naive = naive_measured[s1] * (two_n / s1) ** k
                naive_txt = f"~{_fmt(naive)} (extrapolated, n^{k:.2f} from {s0}->{s1})"
            else:
                naive, naive_txt = float("nan"), "not run"
        rows.append((two_n, jax_med, reps, compile_s, naive_txt, naive / jax_med, same))

    dev = jax.devices()[0]
    print(f"zip_match benchmark: jax {jax.__version__}, {dev.platform} ({dev.device_kind}), "
          f"{os.cpu_count()} CPUs, alpha={args.alpha}, beta={args.beta}\n")
    print("| 2n | zip_match (jit) | first call (compile + run) | naive loop (numpy oracle) "
          "| speed-up | same result |")
    print("|---|---|---|---|---|---|")
    for two_n, jax_med, reps, compile_s, naive_txt, speedup, same in rows:
        same_txt = "-" if same is None else ("yes" if same else "**NO**")
        print(f"| {two_n} | {_fmt(jax_med)} (median of {reps}) | {_fmt(compile_s)} "
              f"| {naive_txt} | {speedup:.0f}x | {same_txt} |")


if __name__ == "__main__":
    main()
