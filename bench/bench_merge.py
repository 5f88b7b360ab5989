"""The whole ZipIt! merge of two ResNet-20 x4 on digits, statistics included, by stage, against a
plain numpy pipeline of the published algorithm (ZipIt!'s CovarianceMetric sums in numpy, the
naive greedy loop).

    python bench/bench_merge.py [--width 4] [--batches 8] [--reps 3]

Stages: forward passes that produce the taps (shared by both pipelines), statistics of the 12
feature spaces, matching, and apply_merge. Times are medians of `--reps` runs after a warm-up.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))

from zipit_oracle import zipit_oracle  # noqa: E402

from mergejax import data, models, specs  # noqa: E402
from mergejax.kernels.statistics import FeatureStats  # noqa: E402
from mergejax.kernels.zip_match import zip_match  # noqa: E402
from mergejax.statistics import taps_fn  # noqa: E402


def numpy_statistics(spec, taps_per_batch):
    """ZipIt!'s CovarianceMetric in float64 numpy: sums of features and outer products."""
    sums = {}
    for taps in taps_per_batch:
        for s in spec.spaces:
            f = np.concatenate([np.asarray(t).reshape(-1, s.width) for t in taps[s.tap]], 1)
            f = f.astype(np.float64)
            n, m, o = sums.get(s.name, (0, 0.0, 0.0))
            sums[s.name] = (n + len(f), m + f.sum(0), o + f.T @ f)
    out = {}
    for s in spec.spaces:
        n, m, o = sums[s.name]
        cov = o / n - np.outer(m / n, m / n)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        out[s.name] = (cov / np.clip(np.outer(sd, sd), 1e-7, None)).astype(np.float32)
    return out


def mergejax_statistics(spec, taps_per_batch):
    states = {s.name: FeatureStats.init(2 * s.width) for s in spec.spaces}
    for taps in taps_per_batch:
        for s in spec.spaces:
            states[s.name] = states[s.name].update(taps[s.tap])
    return {s.name: states[s.name].finalize(name=s.tap).corr for s in spec.spaces}


def _time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    ds = data.load("digits")
    model = models.create("resnet20", width=args.width, num_classes=5)
    x = ds.splits["train"][0]
    endpoints = [jax.tree.map(np.asarray, model.init(jax.random.key(s), x[:1])) for s in (0, 1)]
    spec = specs.for_model(model)
    fn = taps_fn(model, tuple(s.tap for s in spec.spaces))
    batches = [x[i * 128:(i + 1) * 128] for i in range(args.batches)]
    forward = lambda: [fn(endpoints, b) for b in batches]
    t_forward = _time(forward, args.reps)
    taps = jax.block_until_ready(forward())
    t_np_stats = _time(lambda: numpy_statistics(spec, taps), args.reps)
    t_stats = _time(lambda: mergejax_statistics(spec, taps), args.reps)
    corrs = mergejax_statistics(spec, taps)
    t_np_match = _time(lambda: {k: zipit_oracle(np.asarray(c), 0.3, 0.125, 2)
                                for k, c in corrs.items()}, args.reps)
    match = lambda: {k: zip_match(c, alpha=0.3, beta=0.125) for k, c in corrs.items()}
    t_match = _time(match, args.reps)
    transforms = match()
    t_apply = _time(lambda: specs.apply_merge(spec, endpoints, transforms), args.reps)
    widths = sorted({s.width for s in spec.spaces})
    print(f"ResNet-20 x{args.width} on digits, 2 models, {args.batches} batches of 128 images, "
          f"{len(spec.spaces)} feature spaces (2n in {[2 * w for w in widths]}); median of "
          f"{args.reps}\n")
    print("| stage | numpy / published algorithm (s) | mergejax (s) | speed-up |")
    print("|---|---|---|---|")
    print(f"| forward passes for the taps (shared) | {t_forward:.3f} | {t_forward:.3f} | |")
    print(f"| statistics, 12 spaces | {t_np_stats:.3f} | {t_stats:.3f} | "
          f"{t_np_stats / t_stats:.1f}x |")
    print(f"| ZipIt! matching, 12 spaces | {t_np_match:.3f} | {t_match:.3f} | "
          f"{t_np_match / t_match:.1f}x |")
    print(f"| apply_merge | | {t_apply:.3f} | |")
    total_np = t_forward + t_np_stats + t_np_match + t_apply
    total = t_forward + t_stats + t_match + t_apply
    print(f"| whole merge | {total_np:.3f} | {total:.3f} | {total_np / total:.1f}x |")


if __name__ == "__main__":
    main()
