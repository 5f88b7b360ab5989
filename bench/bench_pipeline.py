"""ZipIt!'s full zip of two ResNet-20, stage by stage: mergejax against the same pipeline in
PyTorch (`tests/zipit_reference.py`: torch forward hooks, float64 per-batch sums of outer
products, the greedy loop, merge by W* = sum_i M_i W_i U_i, one `momentum=None` reset).

    python bench/bench_pipeline.py [--width 1] [--images 1200] [--reps 3]
    python bench/bench_pipeline.py --endpoints /tmp/d32/endpoints/model_a,/tmp/d32/endpoints/model_b
    python bench/bench_pipeline.py --endpoints A,B --cpu-devices 2   # one XLA device per core

Both pipelines run on the same endpoints (mergejax's, converted with
`mergejax.converters.to_torch`; random initialisation with random BatchNorm statistics unless
`--endpoints` names two checkpoints `mj.load` reads) and the same images: the first `--images`
of digits32's train + validation splits (32x32x3), in batches of 128, the last partial batch
kept. Stages, as ZipIt!'s evaluation runs them (endpoint resets excluded):

- statistics: features of both models at all 12 merge points, covariance and correlation;
- matching: ZipIt!'s greedy zip (alpha 0.5, beta 1.0) at every merge point;
- apply: the merged trunk and the two heads;
- BN reset: the merged model's BatchNorm statistics, torch's momentum=None
  (mergejax `reset_batch_stats(..., estimator="per_batch")`).

Torch runs on its default threads (one per core). XLA:CPU runs most of a program on one thread,
so to give mergejax the same cores, `--cpu-devices N` makes N XLA CPU devices
(`jax_num_cpu_devices`, or `JAX_NUM_CPU_DEVICES=N` for any mergejax run) and every stage shards
its batches over them, as it would over the GPUs of a host.

Each stage is timed on its first call (mergejax: jit compilation included) and then `--reps`
more times (the median is the steady state), the two pipelines alternating. Prints a markdown
table and checks that both pipelines give the same zip matrices.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics as stats_lib
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import zipit_reference as ref  # noqa: E402

import mergejax as mj  # noqa: E402
from mergejax import data, distributed, repair, specs  # noqa: E402
from mergejax import statistics as mj_statistics  # noqa: E402
from mergejax.converters import to_torch  # noqa: E402
from mergejax.kernels.sharding import data_mesh  # noqa: E402
from mergejax.methods import get as get_method  # noqa: E402

ALPHA, BETA = 0.5, 1.0


def _endpoints(model, paths):
    """Two endpoints: loaded from `paths`, else random weights and BatchNorm statistics."""
    if paths:
        return [mj.load(p, model) for p in paths]
    from helpers import random_batch_stats  # tests/helpers.py

    x = np.zeros((1, 32, 32, 3), np.float32)
    return [random_batch_stats(jax.tree.map(np.asarray, model.init(jax.random.key(i), x)), i)
            for i in range(2)]


def mergejax_stages(model, spec, endpoints, batches):
    """Stage name -> a function running it on the previous stage's output."""
    zipit = get_method("zipit").fn("matching")
    out = {}

    def statistics():
        out["moments"] = jax.block_until_ready(
            mj_statistics.collect(model, spec, endpoints, batches))

    def matching():
        out["transforms"] = jax.block_until_ready(
            zipit(spec, endpoints, out["moments"], key=jax.random.key(0),
                  spaces=spec.space_names, alpha=ALPHA, beta=BETA))

    def apply():
        out["merged"] = specs.apply_merge(spec, endpoints, out["transforms"])

    def reset():
        # the heads share the trunk: one reset serves both (as mergejax.merge does)
        out["reset"] = repair.reset_trees(model, out["merged"], batches, estimator="per_batch")

    return out, {"statistics": statistics, "matching": matching, "apply": apply,
                 "BN reset": reset}


def torch_stages(state_dicts, batches, width):
    """As `mergejax_stages`, for the torch reference."""
    out = {}
    models = [ref.endpoint(sd, 20, width, 5) for sd in state_dicts]
    points = ref.merge_points()

    @torch.no_grad()
    def statistics():
        out["stats"] = ref.feature_statistics(models, batches, points)

    def matching():
        out["transforms"] = {p: ref.zipit_match(out["stats"][p]["corr"], ALPHA, BETA)
                             for p in points}

    @torch.no_grad()
    def apply():
        trunk, heads = ref.merge_state_dicts([m.state_dict() for m in models],
                                             out["transforms"])
        out["model"] = ref.merged_model(trunk, heads, 20, width)

    def reset():
        ref.reset_bn(out["model"], batches)

    return out, {"statistics": statistics, "matching": matching, "apply": apply,
                 "BN reset": reset}


def _on_mesh(mesh, fn):
    """Run a stage with `mesh` as the run's mesh (`mergejax.distributed.use_mesh`)."""
    with distributed.use_mesh(mesh):
        return fn()


def run_stages(pipelines, reps):
    """Per pipeline and stage, (first call seconds, [later call seconds]). Stages run in order;
    the pipelines alternate rep by rep, so a change of machine load hits both alike."""
    first = {p: {} for p in pipelines}
    later = {p: {k: [] for k in stages} for p, stages in pipelines.items()}
    for rep in range(reps + 1):
        for p, stages in pipelines.items():
            for name, fn in stages.items():
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if rep == 0:
                    first[p][name] = dt
                else:
                    later[p][name].append(dt)
    return first, later


def _fmt(sec):
    return f"{sec * 1e3:.0f} ms" if sec < 1 else f"{sec:.2f} s"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--endpoints", default="", help="two checkpoints, comma-separated")
    parser.add_argument("--compile-cache", default="",
                        help="JAX persistent compilation cache dir (mergejax.io.compile_cache), as "
                             "launch.py uses; run twice to see a warm cache's first call")
    parser.add_argument("--cpu-devices", type=int, default=0,
                    help="XLA CPU devices (jax_num_cpu_devices; 0: JAX's default, 1): with one "
                         "per core, mergejax's stages run data-parallel over the cores")
    args = parser.parse_args()
    if args.cpu_devices:  # before JAX initialises its backend
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.compile_cache:  # before the first compile of the process
        from mergejax.io import compile_cache

        compile_cache.enable(args.compile_cache)
    start = time.perf_counter()
    ds = data.load("digits32")
    images = np.concatenate([ds.splits["train"][0], ds.splits["validation"][0]])[:args.images]
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    model = mj.model("resnet20", width=args.width, num_classes=5)
    spec = specs.for_model(model)
    endpoints = _endpoints(model, [p for p in args.endpoints.split(",") if p])
    state_dicts = [to_torch(v, "resnet20", width=args.width, num_classes=5) for v in endpoints]

    mj_out, mj_stages = mergejax_stages(model, spec, endpoints, batches)
    t_out, t_stages = torch_stages(state_dicts, batches, args.width)
    pipelines = {"mergejax": mj_stages, "torch": t_stages}
    if jax.device_count() > 1:  # the same stages on one device, interleaved in the same run
        one = data_mesh(jax.devices()[:1])
        pipelines["mergejax, 1 device"] = {
            name: functools.partial(_on_mesh, one, fn)
            for name, fn in mergejax_stages(model, spec, endpoints, batches)[1].items()}
    first, later = run_stages(pipelines, args.reps)
    mj_first, t_first = first["mergejax"], first["torch"]
    mj_later, t_later = later["mergejax"], later["torch"]

    same = all(np.array_equal(np.asarray(mj_out["transforms"][p][1]),
                              t_out["transforms"][p][1].numpy()) for p in ref.merge_points())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"ResNet-20 x{args.width}, 2 models, {len(images)} digits32 images (32x32x3) in "
          f"{len(batches)} batches of <= {args.batch_size}, 12 merge points; zipit alpha "
          f"{ALPHA}, beta {BETA}; jax {jax.__version__} ({jax.devices()[0].platform}, "
          f"{jax.device_count()} device(s)), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, load average {load}; "
          f"steady = median of {args.reps}; same zip matrices: {'yes' if same else 'NO'}\n")
    print("| stage | mergejax steady | torch steady | speed-up | mergejax first call "
          "(incl. compile) | torch first call |")
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0, 0.0]
    for name in mj_stages:
        m_s, t_s = stats_lib.median(mj_later[name]), stats_lib.median(t_later[name])
        row = [m_s, t_s, mj_first[name], t_first[name]]
        totals = [a + b for a, b in zip(totals, row)]
        print(f"| {name} | {_fmt(m_s)} | {_fmt(t_s)} | {t_s / m_s:.2f}x | {_fmt(row[2])} | "
              f"{_fmt(row[3])} |")
    print(f"| **total** | {_fmt(totals[0])} | {_fmt(totals[1])} | {totals[1] / totals[0]:.2f}x "
          f"| {_fmt(totals[2])} | {_fmt(totals[3])} |")
    if "mergejax, 1 device" in later:
        one = later["mergejax, 1 device"]
        print(f"\nThe same run, mergejax on one of the {jax.device_count()} devices:\n")
        print("| stage | mergejax, 1 device steady | torch steady | speed-up | "
              f"{jax.device_count()} devices / 1 device |")
        print("|---|---|---|---|---|")
        total_one = 0.0
        for name in mj_stages:
            o_s = stats_lib.median(one[name])
            m_s, t_s = stats_lib.median(mj_later[name]), stats_lib.median(t_later[name])
            total_one += o_s
            print(f"| {name} | {_fmt(o_s)} | {_fmt(t_s)} | {t_s / o_s:.2f}x | {o_s / m_s:.2f}x |")
        print(f"| **total** | {_fmt(total_one)} | {_fmt(totals[1])} | "
              f"{totals[1] / total_one:.2f}x | {total_one / totals[0]:.2f}x |")
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
