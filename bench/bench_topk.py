"""Exact magnitude top-k threshold: host select vs the XLA radix select vs `np.partition`.

    taskset -c 1 python bench/bench_topk.py [--sizes 1,8,32] [--density 0.2] [--reps 3]

Prints two markdown tables (times in ms, min over `--reps` runs after a warm-up; the kernels
run interleaved because this 2-core box is shared and noisy; the header prints the load).

1. The select alone, on the int32 bit patterns of |x| (`kernels.topk.abs_bits`), rank
   `topk_kth(n, density)`, for n = `--sizes` million entries of two kinds of input:
   `float32` = |N(0, 1)| (no ties), `bf16 diff` = |f - b| of bf16 arrays b ~ 0.02 N(0, 1),
   f = bf16(b + 1e-3 N(0, 1)) (a bf16 fine-tune's task vector: ~2000 distinct values) and
   `bf16 ulps` = the same with f = b + a few ulps (bench_out_of_core.py's fine-tunes: a few
   hundred distinct values, plateaus of ties at the rank).
   Columns: `host` = `kth_smallest_bits_np` (the new select), `host+scratch` = the same with a
   reused partition buffer (as `tensor_thresholds` does for the 2nd..T-th model), `xla` = the
   jitted `kth_smallest_bits` (two scatter-add histograms, the old per-tensor path),
   `np.partition` on the float32 magnitudes and on the int32 patterns (both copy the input).
   Every result is checked equal to the float32 partition.
2. Per-tensor thresholds of 2 bf16 fine-tunes (`bf16 ulps`, (n / 1024, 1024) tensors on the
   device). One leaf of a per-tensor TIES merge (`merge_leaves`' kernel): `old` = the kernel
   with its in-kernel XLA select (`trim="tensor"`), `new` = `tensor_thresholds` (XLA forms the
   |tau| bits, the host selects) + the kernel applying them (`trim="global"`); `thresholds` =
   the first part alone. Streamed, as the out-of-core recipe finds a large tensor's threshold
   over its 64 MB row blocks: `streamed_thresholds` with the XLA histogram passes vs the
   bracketed host select. Merged leaves and thresholds are checked equal bit for bit.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mergejax.kernels import topk
from mergejax.methods import task_vectors as tv

BF16 = np.dtype(ml_dtypes.bfloat16)


def best_ms(fns: dict, reps: int) -> dict:
    """{name: min wall ms} of each zero-argument fn (results blocked on), interleaved."""
    for f in fns.values():
        jax.block_until_ready(f())
    out = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            out[k] = min(out[k], (time.perf_counter() - t) * 1e3)
    return out


def bf16_pair(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(base, fine-tune) bf16 (n,) arrays: base ~ 0.02 N(0,1), fine-tune = base + 1e-3 N(0,1)."""
    b = rng.standard_normal(n, dtype=np.float32)
    b *= 0.02
    f = rng.standard_normal(n, dtype=np.float32)
    f *= 1e-3
    f += b
    return b.astype(BF16), f.astype(BF16)


def bf16_ulps(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(base, fine-tune) bf16 (n,): |base| in [2^-10, 2^-3), fine-tune = base bits + -3..3."""
    bits = ((rng.integers(117, 124, n, dtype=np.uint16) << 7)
            | rng.integers(0, 128, n, dtype=np.uint16)
            | (rng.integers(0, 2, n, dtype=np.uint16) << 15))
    ft = bits + rng.integers(-3, 4, n, dtype=np.int16).view(np.uint16)
    return bits.view(BF16), ft.view(BF16)


def select_table(sizes, density: float, reps: int) -> None:
    print(f"\n### Select only (rank n - int({density} n)), ms\n")
    print("| n | input | host | host+scratch | xla | np.partition f32 | np.partition i32 | "
          "xla / host | partition f32 / host |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    xla = jax.jit(topk.kth_smallest_bits)
    rng = np.random.default_rng(0)
    for m in sizes:
        n = int(m * 2**20)
        b, f = bf16_pair(n, rng)
        inputs = {"float32": np.abs(rng.standard_normal(n, dtype=np.float32)),
                  "bf16 diff": np.abs(f.astype(np.float32) - b.astype(np.float32))}
        b, f = bf16_ulps(n, rng)
        inputs["bf16 ulps"] = np.abs(f.astype(np.float32) - b.astype(np.float32))
        del b, f
        scratch = np.empty(n, np.int32)
        kth = topk.topk_kth(n, density)
        for name, a in inputs.items():
            bits = a.view(np.int32)
            want = np.partition(a, kth - 1)[kth - 1]
            got = [topk.kth_smallest_bits_np(bits, kth), xla(bits, kth)]
            assert all(np.int32(g).view(np.float32) == want for g in got), (n, name)
            t = best_ms({"host": partial(topk.kth_smallest_bits_np, bits, kth),
                         "scratch": partial(topk.kth_smallest_bits_np, bits, kth,
                                            scratch=scratch),
                         "xla": partial(xla, bits, kth),
                         "f32": partial(np.partition, a, kth - 1),
                         "i32": partial(np.partition, bits, kth - 1)}, reps)
            print(f"| {m}M | {name} | {t['host']:.1f} | {t['scratch']:.1f} | {t['xla']:.1f} | "
                  f"{t['f32']:.1f} | {t['i32']:.1f} | {t['xla'] / t['host']:.1f}x | "
                  f"{t['f32'] / t['host']:.1f}x |", flush=True)


def _old_leaf(base, members, kth):
    one = (jnp.ones(len(members), jnp.float32), jnp.float32(1), jnp.float32(1))
    return tv._merge_leaf(base, members, None, 0, jnp.full(len(members), kth, jnp.int32), *one,
                          prep=None, trim="tensor", combine="mean", add_base=True)[0]


def _new_leaf(base, members, kth):
    one = (jnp.ones(len(members), jnp.float32), jnp.float32(1), jnp.float32(1))
    thr = jnp.asarray(tv.tensor_thresholds(base, members, kth))
    return tv._merge_leaf(base, members, None, 0, thr, *one, prep=None, trim="global",
                          combine="mean", add_base=True)[0]


def _streamed(base, members, ranks, rows: int, reduce=None):
    def blocks():
        return ((base[i:i + rows], [m[i:i + rows] for m in members])
                for i in range(0, base.shape[0], rows))

    return tv.streamed_thresholds(blocks, ranks, reduce=reduce)


def _identity(h):
    return h


def merge_table(sizes, density: float, reps: int) -> None:
    print(f"\n### Per-tensor thresholds of 2 bf16 fine-tunes (density {density}; inputs on the "
          "device), ms\n")
    print("Leaf merge: `old` = the TIES leaf kernel with its in-kernel XLA select, `new` = "
          "`tensor_thresholds` + the kernel applying them; `thresholds` = the first part alone. "
          "Streamed (the out-of-core recipe's path: the tensor in 64 MB row blocks): "
          "`streamed_thresholds` with the histogram passes (forced by an identity `reduce`) vs "
          "its bracketed host select.\n")
    print("| n | leaf old | leaf new | thresholds | old / new | streamed histograms | "
          "streamed bracket | hist / bracket |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(1)
    for m in sizes:
        n = int(m * 2**20)
        base, f0 = bf16_ulps(n, rng)
        f1 = bf16_ulps(n, rng)[1]
        base, members = jax.device_put((base.reshape(-1, 1024), (f0.reshape(-1, 1024),
                                                                 f1.reshape(-1, 1024))))
        del f0, f1
        kth = topk.topk_kth(n, density)
        rows = max(1, (64 << 20) // (4 * 1024))
        a = np.asarray(_old_leaf(base, members, kth))
        b = np.asarray(_new_leaf(base, members, kth))
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), n
        hist = _streamed(base, members, [kth, kth], rows, _identity)
        assert np.array_equal(hist, _streamed(base, members, [kth, kth], rows)), n
        t = best_ms({"old": partial(_old_leaf, base, members, kth),
                     "new": partial(_new_leaf, base, members, kth),
                     "thr": partial(tv.tensor_thresholds, base, members, kth),
                     "hist": partial(_streamed, base, members, [kth, kth], rows, _identity),
                     "bracket": partial(_streamed, base, members, [kth, kth], rows)}, reps)
        print(f"| {m}M | {t['old']:.0f} | {t['new']:.0f} | {t['thr']:.0f} | "
              f"{t['old'] / t['new']:.1f}x | {t['hist']:.0f} | {t['bracket']:.0f} | "
              f"{t['hist'] / t['bracket']:.1f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,8,32", help="millions (2^20) of entries")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-merge", action="store_true", help="only the select table")
    args = ap.parse_args()
    sizes = [float(s) if "." in s else int(s) for s in args.sizes.split(",")]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# {cpus} CPU(s) available to this process; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; jax {jax.__version__}, "
          f"numpy {np.__version__}")
    select_table(sizes, args.density, args.reps)
    if not args.skip_merge:
        merge_table(sizes, args.density, args.reps)


if __name__ == "__main__":
    main()
