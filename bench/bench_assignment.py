"""Benchmark: every `solve_assignment` backend against the scipy backend; prints a markdown table.

    python bench/bench_assignment.py                      # n = 256 ... 4096, ~2-3 min
    python bench/bench_assignment.py --sizes 256,1024     # shorter

Matrices (float32, maximised, as the matchers call it):
- ``random``: U[0, 1) entries, the hard case for JV solvers.
- ``corr``: correlation-like = permuted noisy near-identity, P + 0.1 G (a model against a
  permuted near-copy), the easy case that weight/activation matching produces.

All solvers run in one process, interleaved, with the order rotated every repetition (the box is
noisy, +-10-30%); each cell is the median. Speed-up = t(scipy backend) / t(backend), so > 1 is
faster. The "scipy" backend already calls scipy the fast way (float64, pre-negated); the last
column shows the naive `linear_sum_assignment(score, maximize=True)` on float32 for context.
Every result's total is checked against scipy's optimum. optax is skipped above n = 2048 (several
seconds per solve) and its one-off jit compile per shape is excluded (reported below the table).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from scipy.optimize import linear_sum_assignment

from mergejax.kernels.assignment import (
    _auto_backend,
    assignment_score,
    lapx_available,
    solve_assignment,
)

OPTAX_MAX_N = 2048


def make(kind: str, n: int, seed: int) -> np.ndarray:
    """(n, n) float32 score of the given kind."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random((n, n), dtype=np.float32)
    perm = np.eye(n, dtype=np.float32)[rng.permutation(n)]
    return (perm + 0.1 * rng.standard_normal((n, n), dtype=np.float32)).astype(np.float32)


def default_reps(n: int) -> int:
    return 7 if n <= 1024 else 5 if n <= 2048 else 3


def solvers_for(n: int, backends: list[str]) -> dict:
    out = {b: (lambda s, b=b: solve_assignment(s, backend=b)) for b in backends}
    if n > OPTAX_MAX_N:
        out.pop("optax", None)
    out["scipy-naive"] = lambda s: linear_sum_assignment(s, maximize=True)[1]
    return out


def run(sizes, kinds, backends, reps_override):
    rows, compile_s = [], {}
    for n in sizes:
        for kind in kinds:
            score = make(kind, n, seed=n)
            solvers = solvers_for(n, backends)
            if "optax" in solvers:  # compile (once per shape and dtype) outside the timings
                t = time.perf_counter()
                solve_assignment(score, backend="optax")
                compile_s.setdefault(n, time.perf_counter() - t)
            names = list(solvers)
            times = {k: [] for k in names}
            totals = {}
            reps = reps_override or default_reps(n)
            for r in range(reps):
                order = names[r % len(names) :] + names[: r % len(names)]
                for k in order:
                    t = time.perf_counter()
                    col = solvers[k](score)
                    times[k].append(time.perf_counter() - t)
                    totals[k] = assignment_score(score, col)
            ref = totals["scipy"]
            exact = all(abs(v - ref) <= 1e-6 * max(1.0, abs(ref)) for v in totals.values())
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((n, kind, med, exact))
            cells = " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in med.items())
            print(f"# n={n} {kind} reps={reps}: {cells} exact={exact}", file=sys.stderr, flush=True)
    return rows, compile_s


def table(rows, backends) -> str:
    cols = [b for b in backends if b != "scipy"] + ["scipy-naive"]
    head = "| n | matrix | scipy (ms) | " + " | ".join(f"{c} ms (speed-up)" for c in cols)
    lines = [head + " | same optimum |", "|---" * (4 + len(cols)) + "|"]
    for n, kind, med, exact in rows:
        base = med["scipy"]
        cells = []
        for c in cols:
            if c not in med:
                cells.append("skipped")
            else:
                cells.append(f"{med[c] * 1e3:.1f} ({base / med[c]:.2f}x)")
        lines.append(
            f"| {n} | {kind} | {base * 1e3:.1f} | "
            + " | ".join(cells)
            + f" | {'yes' if exact else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256,512,1024,2048,4096", help="comma-separated n")
    p.add_argument("--kinds", default="random,corr", help="random,corr")
    p.add_argument("--backends", default="scipy,auto,lapx,optax", help="backends to time")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default: 7/5/3 by n)")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    backends = a.backends.split(",")
    if "scipy" not in backends:
        backends.insert(0, "scipy")
    import optax
    import scipy

    try:
        import lap

        lapx_version = getattr(lap, "__version__", "?")
    except ImportError:
        lapx_version = "not installed (lapx backend = scipy)"
    rows, compile_s = run(sizes, a.kinds.split(","), backends, a.reps)
    print(f"`python {' '.join(['bench/bench_assignment.py', *(argv or sys.argv[1:])])}`  ")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; numpy "
        f"{np.__version__}, scipy {scipy.__version__}, jax {jax.__version__}, optax "
        f"{optax.__version__}, lapx {lapx_version}. auto = "
        + ", ".join(f"n={n}: {_auto_backend(n)}" for n in sizes)
        + f" (lapx available: {lapx_available()}). Median wall time, maximise, float32 input.\n"
    )
    print(table(rows, backends))
    if compile_s:
        print(
            "\noptax first call (jit compile + solve), excluded above: "
            + ", ".join(f"n={n}: {t:.2f} s" for n, t in compile_s.items())
            + f". optax skipped for n > {OPTAX_MAX_N} (seconds per solve)."
        )


if __name__ == "__main__":
    main()
