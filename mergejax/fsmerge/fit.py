"""The fitting loop shared by FS-Merge and distillation: optax AdamW, one-cycle schedule.

A *problem* is a hashable object with `loss(mu, consts, batch) -> scalar`: `mu` is the learned
pytree, `consts` the frozen arrays (endpoint weights, initial matrices), `batch` a dict of
arrays with a leading batch axis. One jitted step (cached on the problem and the settings, `mu`
and the optimiser state donated) runs per batch; with several devices the batch is sharded over
the `data` axis of a mesh and everything else replicated, so XLA runs it data-parallel.
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mergejax.io.atomic import atomic_file
from mergejax.kernels.sharding import data_mesh, shard_batch
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


def batch_plan(n: int, batch_size: int) -> tuple[int, Any]:
    """(batch size used, mesh or None): the batch is a multiple of the device count when there
    are several devices and at least that many images, else unsharded."""
    b = min(batch_size, n)
    devices = jax.device_count()
    if devices > 1 and b >= devices:
        return b - b % devices, data_mesh()
    return b, None


def fit_loop(problem, mu: Any, consts: Any, data: Mapping[str, np.ndarray], settings: FitSettings,
        *, seed: int, desc: str = "fit") -> tuple[Any, dict[str, list[float]]]:
    """Runs `settings.steps` AdamW steps of `problem.loss` on random batches of `data`.

    Args:
      problem: hashable, with `loss(mu, consts, batch) -> scalar`.
      mu, consts: the learned and the frozen pytrees.
      data: `{name: (n, ...)}` host arrays; each batch holds the same rows of every array.
      settings: steps, batch size, learning rate, weight decay, schedule.
      seed: the batch order.
      desc: progress-bar label.

    Returns:
      (fitted mu as numpy arrays, `{"loss": [loss of every step]}`).
    """
    n = len(next(iter(data.values())))
    b, mesh = batch_plan(n, settings.batch_size)
    step = _compiled(problem)
    mu = jax.tree.map(jnp.array, mu)  # a copy: the step donates it
    opt_state = _ADAMW(learning_rate=settings.lr, weight_decay=settings.weight_decay).init(mu)
    if mesh is not None:  # replicated everywhere, so every step sees the same shardings
        mu, opt_state, consts = jax.device_put((mu, opt_state, consts),
                                               NamedSharding(mesh, P()))
    lrs = settings.learning_rates()
    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    losses = []
    sync = mesh is not None and jax.devices()[0].platform == "cpu"
    bar = tqdm(range(settings.steps), desc=desc, leave=False, mininterval=2.0)
    for s in bar:
        if len(order) < b:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:b], order[b:]
        batch = {k: np.asarray(v)[idx] for k, v in data.items()}
        if mesh is not None:
            batch = shard_batch(batch, mesh)
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
    """`problem.loss` averaged over `data` in batches (weighted by batch size)."""
    n = len(next(iter(data.values())))
    fn = _loss_fn(problem)
    total = 0.0
    for start in range(0, n, batch_size):
        batch = {k: np.asarray(v)[start:start + batch_size] for k, v in data.items()}
        total += float(fn(mu, consts, batch)) * len(next(iter(batch.values())))
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
