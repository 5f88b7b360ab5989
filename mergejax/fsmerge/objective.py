"""Fitting objectives: reconstruct each task's endpoint features from the merged model.

Both compare, for an image of task t, the merged model's features mapped to endpoint t's
feature space with endpoint t's features, never another endpoint's (the published code's
`rec_with_ids`):

- "global": mean squared error at the head input. The map is the head's own unmerge U_t, the
  one folded into endpoint t's head, so the loss measures the features the evaluated heads read.
  Endpoint targets are computed once before the fit.
- "local": the global term and one term per space with a tap (the merged model's activation
  there, mapped back by the U of the first layer that reads the space, against endpoint t's
  activation), each scale-normalised (divided by the mean square of its target) so every layer
  weighs the same. Endpoint activations are computed on the fly.

The head-input features are read by swapping the head for a linear map: a model with
`num_classes = N*d` whose head kernel is U^T (d', N*d) outputs every endpoint's mapped features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mergejax.fsmerge.fold import fold_tails, fold_trunk, matrices
from mergejax.fsmerge.params import parameterisation
from mergejax.fsmerge.plan import Plan
from mergejax.models import Model
from mergejax.models.base import tap_activations
from mergejax.specs import unflatten

OBJECTIVES = ("global", "local")


def with_outputs(model: Model, outputs: int) -> Model:
    """`model` with a head of `outputs` units (to read features through a linear head)."""
    return dataclasses.replace(model, module=model.module.clone(num_classes=outputs))


def head_paths(model: Model, flat: Mapping[str, Any]) -> tuple[str, str | None]:
    """(head kernel path, head bias path or None) of `model` in flat variables `flat`."""
    kernel = f"params/{model.head}/kernel"
    if kernel not in flat:
        raise ValueError(f"model {model.name!r}: no head kernel {kernel} in the variables")
    bias = f"params/{model.head}/bias"
    return kernel, bias if bias in flat else None


def forward(model: Model, trunk: Mapping[str, Any], head_kernel: jax.Array, x: jax.Array, *,
            train: bool, taps: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`x` (B, H, W, C) through `trunk` (flat variables without the head) and a linear head
    `head_kernel` (d', k) (zero bias): ((B, k), {tap: activation} if `taps`)."""
    flat = {**trunk, f"params/{model.head}/kernel": head_kernel}
    if getattr(model.module, "head_bias", True):  # only open_clip-style ViTs have none
        flat[f"params/{model.head}/bias"] = jnp.zeros((head_kernel.shape[1],), jnp.float32)
    variables = unflatten(flat)
    net = with_outputs(model, head_kernel.shape[1])
    mutable = (["batch_stats"] if train and "batch_stats" in variables else []) + (
        ["intermediates"] if taps else [])
    if not mutable:
        return net.module.apply(variables, x, train=train), {}
    out, state = net.module.apply(variables, x, train=train, mutable=mutable)
    return out, tap_activations(state.get("intermediates", {}))


def select(out: jax.Array, ids: jax.Array, num_models: int) -> jax.Array:
    """Block `ids[b]` of row b of `out` (B, ..., N*d): (B, ..., d)."""
    blocks = out.reshape(*out.shape[:-1], num_models, out.shape[-1] // num_models)
    idx = ids.reshape((-1,) + (1,) * (blocks.ndim - 1))
    return jnp.take_along_axis(blocks, idx, axis=blocks.ndim - 2)[..., 0, :]


def weighted_mean(x: jax.Array, weight: jax.Array | None) -> jax.Array:
    """Mean of `x` (B, ...) over every element, rows weighted by `weight` (B,) (None: all 1).

    Padded rows of a sharded batch have weight 0 and so no effect; with every weight 1 this is
    `jnp.mean(x)`."""
    rows = jnp.mean(x.reshape(x.shape[0], -1), axis=1)
    if weight is None:
        return jnp.mean(rows)
    return jnp.sum(rows * weight) / jnp.maximum(jnp.sum(weight), 1e-12)


def mse(pred: jax.Array, target: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Mean squared error over every element of (B, ...) rows weighted by `weight` (B,)."""
    return weighted_mean(jnp.square(pred - target), weight)


def normalised(pred: jax.Array, target: jax.Array, weight: jax.Array | None = None
               ) -> jax.Array:
    """MSE divided by the target's mean square (a constant of the batch), rows weighted."""
    scale = jax.lax.stop_gradient(weighted_mean(jnp.square(target), weight))
    return mse(pred, target, weight) / jnp.maximum(scale, 1e-12)


@dataclasses.dataclass(frozen=True)
class FSProblem:
    """An FS-Merge fit: the plan, the merged `model`, the parameterisation, the objective and
    the local taps `((space, tap, reading layer), ...)`. Hashable: compiled steps cache on it.

    `loss(mu, consts, batch)`: consts = `{"frozen", "stacked"}` (see `fold`), batch =
    `{"x": (B,H,W,C), "ids": (B,) task ids, "target": (B, d) head-input features}` and
    optionally `"weight"` (B,) per-row weights (0 on a sharded batch's padding).
    """

    plan: Plan
    model: Model
    endpoint_model: Model
    param: str
    objective: str
    num_models: int
    train: bool
    taps: tuple[tuple[str, str, str], ...] = ()

    def variables_trunk(self, mu, consts):
        """(the folded trunk's flat leaves, `{layer: U}`) for the learned state `mu`."""
        p = parameterisation(self.param)
        merges, unmerges = matrices(self.plan, p, consts["frozen"], mu)
        trunk = fold_trunk(self.plan, merges, unmerges, consts["frozen"], mu, consts["stacked"])
        return trunk, unmerges

    def head_features(self, trunk, unmerges, consts, x, *, taps: bool
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """((B, N*d) every endpoint's head-input features mapped from the merged model, taps).

        With the head the only tail, one forward whose head is U^T (d', N*d) gives them all.
        Other tails (a CCT's `attention_pool`, kept per endpoint) shape the head input
        differently per endpoint: one forward per endpoint with its folded tails, its head
        block U_i^T (d', d) (N times the compute; the taps are the first forward's, as every
        tapped space lies before the tails)."""
        head = f"params/{self.model.head}"
        head_u = unmerges[head]  # (N*d, d')
        if len(self.plan.tails) == 1:
            return forward(self.model, trunk, head_u.T, x, train=self.train, taps=taps)
        d = head_u.shape[0] // self.num_models
        outs, first_taps = [], {}
        for i in range(self.num_models):
            tails = {k: v for k, v in fold_tails(self.plan, unmerges, consts["stacked"],
                                                 i).items()
                     if not k.startswith(f"{head}/")}
            out, t = forward(self.model, {**trunk, **tails}, head_u[i * d:(i + 1) * d].T, x,
                             train=self.train, taps=taps and i == 0)
            outs.append(out)
            first_taps = first_taps or t
        return jnp.concatenate(outs, axis=-1), first_taps

    def loss(self, mu, consts, batch):
        """The objective's scalar loss on `batch` (see the class docstring)."""
        trunk, unmerges = self.variables_trunk(mu, consts)
        local = self.objective == "local"
        out, taps = self.head_features(trunk, unmerges, consts, batch["x"], taps=local)
        pred = select(out, batch["ids"], self.num_models)
        weight = batch.get("weight")
        if not local:
            return mse(pred, batch["target"], weight)
        total = normalised(pred, batch["target"], weight)
        stacked = consts["stacked"]
        ends = [unflatten({k: v[i] for k, v in stacked.items()})
                for i in range(self.num_models)]
        end_taps = [self.endpoint_model.features(v, batch["x"])[1] for v in ends]
        for _, tap, reader in self.taps:
            mapped = jnp.tensordot(taps[tap], unmerges[reader].T, axes=1, precision="highest")
            target = jnp.stack([t[tap] for t in end_taps])  # (N, B, ..., d)
            target = jnp.take_along_axis(
                target, batch["ids"].reshape((1, -1) + (1,) * (target.ndim - 2)), axis=0)[0]
            total = total + normalised(select(mapped, batch["ids"], self.num_models),
                                       jax.lax.stop_gradient(target), weight)
        return total / (1 + len(self.taps))
