"""The fitting loop shared by FS-Merge and distillation: optax AdamW, one-cycle schedule.

A *problem* is a hashable object with `loss(mu, consts, batch) -> scalar`: `mu` is the learned
pytree, `consts` the frozen arrays (endpoint weights, initial matrices), `batch` a dict of
arrays with a leading batch axis. One jitted step (cached on the problem, `mu` and the
optimiser state donated) runs per batch.

Data-parallel: every batch is zero-padded to a multiple of the `data` mesh size and sharded over
that axis, with `batch["weight"]` (B,) = 1 for real rows and 0 for padding (a problem's loss is
the weight-averaged row loss); `mu`, the optimiser state and `consts` are replicated, so XLA
runs the step data-parallel and the gradient is the all-reduced one. The batch drawn does not
depend on the device count, so a fit on 8 devices equals the fit on one up to float rounding.
A problem with `train=True` (BatchNorm on batch statistics) is never padded, as padded rows
would enter the statistics: a batch not divisible by the mesh size runs replicated instead.
Deterministic for a seed: batches are drawn from numpy permutations of that seed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mergejax.io.atomic import atomic_file
from mergejax.kernels.sharding import cpu_collectives, data_mesh, data_size, pad_batch, shard_batch
from mergejax.registry import Registry

SCHEDULES: Registry[Callable[[float, int], optax.Schedule]] = Registry("FS-Merge lr schedule")
# the published code's scheduler 'warmup' is torch's OneCycleLR with linear annealing
SCHEDULES.register("onecycle", lambda lr, steps: optax.linear_onecycle_schedule(max(steps, 2), lr))
SCHEDULES.register("cosine_onecycle",
                   lambda lr, steps: optax.cosine_onecycle_schedule(max(steps, 2), lr))
SCHEDULES.register("constant", lambda lr, steps: optax.constant_schedule(lr))


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """Optimiser settings: `steps` AdamW steps of `batch_size` images, peak `lr`, decoupled
    `weight_decay`, `schedule` a `SCHEDULES` name."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-3
    schedule: str = "onecycle"

    def learning_rates(self) -> np.ndarray:
        """(steps,) float32: the learning rate of every step."""
        return self.lr * _unit_schedule(self.schedule, self.steps)


@functools.lru_cache(maxsize=32)
def _unit_schedule(name: str, steps: int) -> np.ndarray:
    """(steps,) float32 multipliers of schedule `name` peaking at 1 (schedules scale with lr)."""
    schedule = SCHEDULES.get(name)(1.0, steps)
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(steps)), np.float32)


# The learning rate and weight decay are inputs of the compiled step (hyperparameters in the
# optimiser state), so fits that differ only in their settings share one compiled step.
_ADAMW = optax.inject_hyperparams(optax.adamw)


@functools.lru_cache(maxsize=16)
def _compiled(problem):
    def step(mu, opt_state, consts, batch, lr):
        opt_state.hyperparams["learning_rate"] = lr
        loss, grads = jax.value_and_grad(problem.loss)(mu, consts, batch)
        updates, opt_state = _ADAMW(learning_rate=0.0, weight_decay=0.0).update(
            grads, opt_state, mu)
        return optax.apply_updates(mu, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _loss_fn(problem):
    return jax.jit(problem.loss)


def device_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, *, pad: bool = True) -> dict:
    """The host `batch` (`{name: (B, ...)}`) on `mesh` with `"weight"` (B',) float32 added.

    B is zero-padded to B' (a multiple of the `data` size, weight 0 on the padding) and sharded
    over `data`. With `pad=False` (BatchNorm in train mode) a B not divisible by the `data` size
    is replicated unpadded instead (B' = B)."""
    weight = np.ones(len(next(iter(batch.values()))), np.float32)
    batch = {**batch, "weight": weight}
    k = data_size(mesh)
    if len(weight) % k and not pad:
        return jax.device_put(batch, NamedSharding(mesh, P()))
    padded, _ = pad_batch(batch, k)  # zero rows: the weight pads with 0 too
    return shard_batch(padded, mesh)


def fit_loop(problem, mu: Any, consts: Any, data: Mapping[str, np.ndarray], settings: FitSettings,
        *, seed: int, desc: str = "fit", mesh: Mesh | None = None
        ) -> tuple[Any, dict[str, list[float]]]:
    """Runs `settings.steps` AdamW steps of `problem.loss` on random batches of `data`.

    Args:
      problem: hashable, with `loss(mu, consts, batch) -> scalar` averaging its row losses
        with `batch["weight"]`, and `train` (True when padded rows would change the forward).
      mu, consts: the learned and the frozen pytrees.
      data: `{name: (n, ...)}` host arrays; each batch holds the same rows of every array.
      settings: steps, batch size (`min(batch_size, n)` rows a step), learning rate, weight
        decay, schedule.
      seed: the batch order.
      desc: progress-bar label.
      mesh: a mesh with a `data` axis to shard the batches over (default: every device).

    Returns:
      (fitted mu as numpy arrays, `{"loss": [loss of every step]}`).
    """
    n = len(next(iter(data.values())))
    b = min(settings.batch_size, n)
    mesh = data_mesh() if mesh is None else mesh
    pad = not getattr(problem, "train", False)
    step = _compiled(problem)
    mu = jax.tree.map(jnp.array, mu)  # a copy: the step donates it
    opt_state = _ADAMW(learning_rate=settings.lr, weight_decay=settings.weight_decay).init(mu)
    # replicated everywhere, so every step sees the same shardings
    mu, opt_state, consts = jax.device_put((mu, opt_state, consts), NamedSharding(mesh, P()))
    lrs = settings.learning_rates()
    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    losses = []
    sync = cpu_collectives(mesh)
    bar = tqdm(range(settings.steps), desc=desc, leave=False, mininterval=2.0)
    for s in bar:
        if len(order) < b:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:b], order[b:]
        batch = device_batch({k: np.asarray(v)[idx] for k, v in data.items()}, mesh, pad=pad)
        mu, opt_state, loss = step(mu, opt_state, consts, batch, lrs[s])
        if sync:  # XLA:CPU collectives: one sharded step in flight (see kernels.statistics)
            loss = jax.block_until_ready(loss)
        losses.append(loss)
        if s % 25 == 0 or s == settings.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
    history = {"loss": [float(v) for v in jax.device_get(losses)]}
    return jax.tree.map(np.asarray, jax.device_get(mu)), history


def mean_loss(problem, mu: Any, consts: Any, data: Mapping[str, np.ndarray],
              batch_size: int = 256) -> float:
    """`problem.loss` averaged over `data` in batches (weighted by batch size), one device."""
    n = len(next(iter(data.values())))
    fn = _loss_fn(problem)
    total = 0.0
    for start in range(0, n, batch_size):
        batch = {k: np.asarray(v)[start:start + batch_size] for k, v in data.items()}
        rows = len(next(iter(batch.values())))
        total += float(fn(mu, consts, {**batch, "weight": np.ones(rows, np.float32)})) * rows
    return total / n


def plot_loss(history: Mapping[str, list[float]], path: str, title: str = "fitting loss"
              ) -> None:
    """Writes the loss curve of `history["loss"]` (the feature-reconstruction mean squared
    error per step, log scale) titled `title` to the PNG `path`, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(history["loss"]) + 1), history["loss"], lw=1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("feature reconstruction MSE")
    ax.set_title(title)
    if min(history["loss"], default=0) > 0:
        ax.set_yscale("log")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
