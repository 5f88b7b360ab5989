"""The whole ZipIt! merge of two ResNet-20 x4 on digits, statistics included, against a plain
numpy pipeline of the published algorithm (numpy covariance, the naive greedy loop).

    python bench/bench_merge.py [--width 4] [--batches 8]

Both pipelines see the same taps (the Flax models' activations, computed once per batch and
counted in each); they differ in how statistics and matching are computed. Times are medians of
`--reps` runs after one warm-up. Prints a markdown table.
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
from mergejax.kernels.zip_match import zip_match  # noqa: E402
from mergejax.statistics import _taps_fn, collect  # noqa: E402


def numpy_pipeline(model, spec, endpoints, batches):
    """Reference-style: per batch, numpy float64 sums of features and outer products
    (ZipIt!'s CovarianceMetric), then the naive greedy loop per space."""
    fn = _taps_fn(model, tuple(s.tap for s in spec.spaces))
    sums = {}
    for x in batches:
        taps = fn(list(endpoints), x)
        for s in spec.spaces:
            f = np.concatenate([np.asarray(t).reshape(-1, s.width) for t in taps[s.tap]], 1)
            f = f.astype(np.float64)
            n, m, o = sums.get(s.name, (0, 0.0, 0.0))
            sums[s.name] = (n + len(f), m + f.sum(0), o + f.T @ f)
    out = {}
    for s in spec.spaces:
        n, m, o = sums[s.name]
        mean = m / n
        cov = o / n - np.outer(mean, mean)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        corr = cov / np.clip(np.outer(sd, sd), 1e-7, None)
        out[s.name] = zipit_oracle(corr.astype(np.float32), 0.3, 0.125, 2)
    return out


def mergejax_pipeline(model, spec, endpoints, batches):
    stats = collect(model, spec, endpoints, batches)
    out = {s: zip_match(m.corr, alpha=0.3, beta=0.125, num_models=2) for s, m in stats.items()}
    return jax.block_until_ready(out)


def _time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
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
    batches = lambda: (x[i * 128:(i + 1) * 128] for i in range(args.batches))
    t_ref = _time(lambda: numpy_pipeline(model, spec, endpoints, batches()), args.reps)
    t_ours = _time(lambda: mergejax_pipeline(model, spec, endpoints, batches()), args.reps)
    start = time.perf_counter()
    transforms = mergejax_pipeline(model, spec, endpoints, batches())
    jax.block_until_ready(specs.apply_merge(spec, endpoints, transforms))
    t_all = time.perf_counter() - start
    widths = sorted({s.width for s in spec.spaces})
    print(f"ResNet-20 x{args.width} on digits, {args.batches} batches of 128, "
          f"{len(spec.spaces)} spaces (2n in {[2 * w for w in widths]})\n")
    print("| pipeline | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| numpy statistics + naive greedy loop (published algorithm) | {t_ref:.2f} | 1.0x |")
    print(f"| mergejax statistics + zip_match | {t_ours:.2f} | {t_ref / t_ours:.1f}x |")
    print(f"| mergejax, + apply_merge (whole merge) | {t_all:.2f} | |")


if __name__ == "__main__":
    main()
