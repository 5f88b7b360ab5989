"""Training an endpoint with optax: SGD with momentum, cosine or one-cycle schedule, decay.

Deterministic for a seed: the init key and the numpy shuffling generator both derive from it.
The jitted step is cached per (model, optimiser settings, batch shape), so training several
endpoints of one architecture compiles once.
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
def _train_step(model: Model, settings: TrainSettings, steps_per_epoch: int):
    tx = make_optimizer(settings, steps_per_epoch)

    def loss_fn(params, variables, x, y):
        logits, new_vars = model.apply_train({**variables, "params": params}, x)
        labels = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]),
                                     settings.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, labels).mean()
        return loss, new_vars

    @jax.jit
    def step(variables, opt_state, x, y):
        (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"], variables, x, y)
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        new_vars = {**new_vars, "params": optax.apply_updates(variables["params"], updates)}
        return new_vars, opt_state, loss

    return tx, step


def train(model: Model, images: np.ndarray, labels: np.ndarray, settings: TrainSettings, *,
          seed: int, augment: str = "none", desc: str = "train",
          variables: Variables | None = None) -> tuple[Variables, list[float]]:
    """Trains `model` on (images (N,H,W,C), labels (N,) local ids) from scratch or `variables`.

    Returns the trained variables and the mean loss of every epoch.
    """
    if variables is None:
        variables = model.init(jax.random.key(seed), jnp.asarray(images[:1]))
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(len(labels) // settings.batch_size, 1)
    tx, step = _train_step(model, settings, steps_per_epoch)
    opt_state = tx.init(variables["params"])
    epoch_losses = []
    bar = tqdm(range(settings.epochs), desc=desc, leave=False, mininterval=2.0)
    for _ in bar:
        losses = []
        for x, y in train_batches(images, labels, settings.batch_size, rng, augment):
            variables, opt_state, loss = step(variables, opt_state, x, y)
            losses.append(loss)
        epoch_losses.append(float(np.mean(jax.device_get(losses))))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}", refresh=False)
    return jax.tree.map(np.asarray, variables), epoch_losses
