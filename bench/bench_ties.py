"""Benchmark: mergejax TIES (JAX, streaming, radix-select thresholds) vs a numpy TIES that
finds its thresholds with `np.partition`.

    python bench/bench_ties.py                 # 3 task vectors x 25M float32 in 10 leaves
    python bench/bench_ties.py --params 2000000

Prints a markdown table. Both implementations do the same work: task vectors from (base,
fine-tuned) trees, top-20% magnitude trim over the whole model per task (exact threshold),
sign election by mass with the majority zero-sign rule, disjoint mean, theta_0 + lam * merged;
their outputs are compared.

Timing: both run interleaved in this process, median of `--reps` runs after one warm-up call
(the JAX warm-up, which includes compilation, is reported separately).
Memory: each implementation runs twice in a fresh subprocess; "peak extra" is the peak resident
set during a call (VmHWM, reset via /proc/self/clear_refs just before it) minus the resident set
at that point, i.e. what the merge adds on top of its inputs, including its output (1 model copy
= 4 * params bytes). JAX's 1st call also holds compiler memory and grows its allocator; its 2nd
call reuses memory the allocator kept, so the truth lies between the two columns. Falls back to
ru_maxrss deltas where /proc is unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

LAM, DENSITY = 1.0, 0.2


def make_inputs(params: int, tasks: int, leaves: int, seed: int = 0):
    """(base, [finetuned]) as dicts of numpy float32 leaves of roughly equal size."""
    rng = np.random.default_rng(seed)
    sizes = np.full(leaves, params // leaves)
    sizes[: params % leaves] += 1

    def normal(shape, scale, offset=None):  # in place: no input-sized temporaries
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= scale
        if offset is not None:
            x += offset
        return x

    base = {f"layer{i:02d}": normal(n, 0.02) for i, n in enumerate(sizes)}
    fts = [{k: normal(v.shape, 1e-3, v) for k, v in base.items()} for _ in range(tasks)]
    return base, fts


def numpy_ties(base, finetuned, density=DENSITY, lam=LAM):
    """Reference TIES in numpy: global per-task threshold by np.partition, dis-mean, majority
    zero-sign rule (same streaming structure: provisional +1, fix-up if the majority is not +)."""
    keys = list(base)
    d = sum(base[k].size for k in keys)
    kth = d - int(d * density)  # tall_masks topk_values_mask: kth smallest, 1-based
    thr = []
    for ft in finetuned:
        a = np.concatenate([np.abs(ft[k] - base[k]) for k in keys])
        thr.append(np.partition(a, kth - 1)[kth - 1])
        del a

    def leaf(k, zero_sign):
        taus = []
        for t, ft in enumerate(finetuned):
            x = ft[k] - base[k]
            x[np.abs(x) < thr[t]] = 0
            taus.append(x)
        total = taus[0].copy()
        for x in taus[1:]:
            total += x
        s = np.sign(total)
        nonzero = np.logical_or.reduce([x != 0 for x in taus])
        stats = int(s.sum(dtype=np.int64)), bool(((s == 0) & nonzero).any())
        s[s == 0] = zero_sign
        num = np.zeros_like(total)
        cnt = np.zeros_like(total)
        for x in taus:
            sel = np.where(s > 0, x > 0, x < 0)
            num += np.where(sel, x, 0)
            cnt += sel
        return base[k] + lam * (num / np.maximum(cnt, 1)), stats

    out, stats = {}, {}
    for k in keys:
        out[k], stats[k] = leaf(k, 1.0)
    majority = int(np.sign(sum(s for s, _ in stats.values())))
    if majority != 1:
        for k in keys:
            if stats[k][1]:
                out[k] = leaf(k, float(majority))[0]
    return out


def jax_ties(base, finetuned):
    from mergejax.methods.ties import ties

    out = ties(base, finetuned, lam=LAM, density=DENSITY, disjoint="mean",
               zero_sign="majority", scope="global")
    import jax

    return jax.block_until_ready(out)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(impl: str, params: int, tasks: int, leaves: int) -> None:
    """Runs one merge in this process and prints JSON with the peak RSS it adds.

    Baseline = RSS once the inputs exist (and JAX is imported); the peak counter is reset
    there (/proc/self/clear_refs), so input generation does not mask the merge's peak. Without
    /proc, falls back to ru_maxrss deltas (a lower bound).
    """
    base, fts = make_inputs(params, tasks, leaves)
    if impl == "jax":
        # Import before the baseline: the runtime itself is not part of the merge's memory.
        import mergejax.methods.ties  # noqa: F401
    fn = jax_ties if impl == "jax" else numpy_ties
    peaks, method = [], "VmHWM - VmRSS"
    for _ in range(2):  # 1st call includes JAX compilation and allocator warm-up
        if _reset_peak_rss():
            before = _proc_status_kb("VmRSS")
        else:
            method = "ru_maxrss"
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn(base, fts)
        after = (_proc_status_kb("VmHWM") if method != "ru_maxrss"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        del out
        peaks.append(after - before)
    print(json.dumps({"impl": impl, "peak_extra_kb": peaks, "method": method}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=25_000_000)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--leaves", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess runs")
    ap.add_argument("--worker", choices=["jax", "numpy"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.params, args.tasks, args.leaves)
        return

    import jax

    base, fts = make_inputs(args.params, args.tasks, args.leaves)
    t0 = time.perf_counter()
    out_j = jax_ties(base, fts)
    first = time.perf_counter() - t0
    out_n = numpy_ties(base, fts)
    diff = max(float(np.max(np.abs(np.asarray(out_j[k]) - out_n[k]))) for k in base)
    same = all(np.array_equal(np.asarray(out_j[k]), out_n[k]) for k in base)
    del out_j, out_n
    times = {"jax": [], "numpy": []}
    for _ in range(args.reps):  # interleaved: the box is noisy, both see the same conditions
        for name, fn in (("jax", jax_ties), ("numpy", numpy_ties)):
            t0 = time.perf_counter()
            out = fn(base, fts)
            times[name].append(time.perf_counter() - t0)
            del out
    mem = {}
    if not args.no_memory:
        del base, fts
        for impl in ("jax", "numpy"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl,
                   "--params", str(args.params), "--tasks", str(args.tasks),
                   "--leaves", str(args.leaves)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            mem[impl], mem_method = rec["peak_extra_kb"], rec["method"]
    copy_mb = 4 * args.params / 2**20
    print(f"TIES, {args.tasks} task vectors x {args.params:,} float32 params in "
          f"{args.leaves} leaves, density {DENSITY}, dis-mean, global trim; "
          f"jax {jax.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs\n")
    print("| implementation | median time (s) | runs (s) | peak extra RSS, 1st call (MB) "
          "| peak extra RSS, 2nd call (MB) | 2nd call in model copies |")
    print("|---|---|---|---|---|---|")
    for impl, label in (("jax", "mergejax `ties` (radix select, streaming)"),
                        ("numpy", "numpy (`np.partition` thresholds)")):
        ts = times[impl]
        runs = ", ".join(f"{t:.2f}" for t in ts)
        if impl in mem:
            mb1, mb2 = (x / 1024 for x in mem[impl])
            m = f"{mb1:.0f} | {mb2:.0f} | {mb2 / copy_mb:.2f}"
        else:
            m = "- | - | -"
        print(f"| {label} | {np.median(ts):.3f} | {runs} | {m} |")
    if mem:
        print(f"\nMemory: peak RSS added by a merge in a fresh process ({mem_method}), first "
              f"and second call; includes the output (1 model copy = {copy_mb:.0f} MB). "
              "JAX's first call also holds compiler memory.")
    print(f"JAX first call (incl. compilation): {first:.2f} s. Outputs bitwise equal: {same} "
          f"(max |diff| {diff:.3g}). Speed-up numpy/jax: "
          f"{np.median(times['numpy']) / np.median(times['jax']):.2f}x.")


if __name__ == "__main__":
    main()
