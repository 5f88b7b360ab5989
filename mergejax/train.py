"""Training an endpoint with optax: SGD with momentum, cosine or one-cycle schedule, decay.

Deterministic for a seed: the init key and the numpy shuffling generator both derive from it.
The jitted step is cached per (model, optimiser settings, mesh) and compiles once per batch
shape, so training several endpoints of one architecture compiles once.

Data-parallel: every batch is sharded over the `data` axis of the run's mesh
(`mergejax.distributed`), the variables and optimiser state are replicated, and the gradient
is the mean over the global batch, so the numbers do not depend on the device count. On
several processes each process draws the same global batch (same seed) and puts only its own
rows on its devices; all processes train the one model together.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mergejax import distributed
from mergejax.data import train_batches
from mergejax.models import Model, Variables
from mergejax.registry import Registry


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimiser settings (hashable, so the compiled step can be cached on them)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0


_SCHEDULES: Registry[Callable[[float, int, int], optax.Schedule]] = Registry("lr schedule")
_SCHEDULES.register("cosine", lambda lr, total, warmup: optax.warmup_cosine_decay_schedule(
    0.0, lr, max(warmup, 1), max(total, max(warmup, 1) + 1)))
_SCHEDULES.register("onecycle", lambda lr, total, warmup: optax.linear_onecycle_schedule(
    max(total, 2), lr))
_SCHEDULES.register("constant", lambda lr, total, warmup: optax.constant_schedule(lr))


def make_optimizer(settings: TrainSettings, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (Nesterov momentum) with decoupled L2 weight decay on the given schedule."""
    total = settings.epochs * steps_per_epoch
    warmup = int(settings.warmup_epochs * steps_per_epoch)
    schedule = _SCHEDULES.get(settings.schedule)(settings.lr, total, warmup)
    return optax.chain(optax.add_decayed_weights(settings.weight_decay),
                       optax.sgd(schedule, momentum=settings.momentum, nesterov=True))


@functools.lru_cache(maxsize=16)
def _train_step(model: Model, settings: TrainSettings, steps_per_epoch: int,
                mesh: jax.sharding.Mesh):
    tx = make_optimizer(settings, steps_per_epoch)

    def loss_fn(params, variables, x, y, mask):
        # Rows padded to fill the mesh (mask False) weigh nothing, BatchNorm statistics included.
        with distributed.masked_batch_norm(mask):
            logits, new_vars = model.apply_train({**variables, "params": params}, x)
        labels = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]),
                                     settings.label_smoothing)
        losses = optax.softmax_cross_entropy(logits, labels)
        if mask is None:
            return losses.mean(), new_vars
        return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.sum(mask), new_vars

    def step(variables, opt_state, x, y, mask):
        (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"], variables, x, y, mask)
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        new_vars = {**new_vars, "params": optax.apply_updates(variables["params"], updates)}
        return new_vars, opt_state, loss

    # Batches arrive sharded over `data`; everything the step returns is replicated.
    return tx, jax.jit(step, out_shardings=distributed.replicated_sharding(mesh))


def train(model: Model, images: np.ndarray, labels: np.ndarray, settings: TrainSettings, *,
          seed: int, augment: str = "none", desc: str = "train",
          variables: Variables | None = None, mesh: jax.sharding.Mesh | None = None
          ) -> tuple[Variables, list[float]]:
    """Trains `model` on (images (N,H,W,C), labels (N,) local ids) from scratch or `variables`.

    Every process passes the same full arrays; batches are sharded over the `data` axis of
    `mesh` (default: the run's mesh, `mergejax.distributed.mesh()`).

    Returns the trained variables (numpy) and the mean loss of every epoch.
    """
    mesh = distributed.mesh() if mesh is None else mesh
    if variables is None:
        variables = model.init(jax.random.key(seed), jnp.asarray(images[:1]))
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(len(labels) // settings.batch_size, 1)
    tx, step = _train_step(model, settings, steps_per_epoch, mesh)
    variables = distributed.replicate(variables, mesh)
    opt_state = distributed.replicate(tx.init(variables["params"]), mesh)
    epoch_losses = []
    bar = tqdm(range(settings.epochs), desc=desc, leave=False, mininterval=2.0)
    for _ in bar:
        losses = []
        for x, y in train_batches(images, labels, settings.batch_size, rng, augment):
            (x, y), mask = distributed.put_batch((x, y), mesh)
            variables, opt_state, loss = step(variables, opt_state, x, y, mask)
            losses.append(distributed.wait(loss, mesh))
        epoch_losses.append(float(np.mean(distributed.to_host(losses))))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}", refresh=False)
    return distributed.to_host(variables), epoch_losses
