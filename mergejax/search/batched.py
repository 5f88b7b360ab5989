"""Merging and scoring a population of search points at once.

A trial's merge through the recipe runner (`mergejax.recipe.merge_flats`) recomputes every task
vector and calls a method per block. Here everything that does not depend on a point is computed
once: the task vectors tau_t, each tensor's sorted |tau_t| (a magnitude trim at any density is
then a threshold lookup), and DARE's uniform draws (a random drop at any density is then a
comparison). K points are merged together, vectorised over the candidates, with the recipe
runner's semantics (mergekit's generalized task arithmetic, `mergejax.recipe.execute`):

    x_t = sparsify_t(tau_t) * w_t              (magnitude: ties; random + L1 rescale: dare_*)
    consensus (ties, dare_ties): keep x_t where sign(x_t) = sign(sum_t x_t) (0 counts as +),
        divisor = sum of the agreeing w_t (0 -> 1); else divisor = sum_t w_t (|.| < 1e-8 -> 1)
    mixed = sum_t x_t (/ divisor if the method normalises: ties) ; theta = base + lambda * mixed

DARE draws exactly the runner's masks: document j, group 0, model t, leaf i of the block keeps
an entry where uniform(fold_in(fold_in(fold_in(fold_in(key(seed), j), 0), t), i)) < density, as
`jax.random.bernoulli` does. The merges agree with the runner to float32 rounding (sums in
another order); the search re-merges its best point with the runner for the checkpoint it
writes. The K merged backbones are then evaluated in one vmapped forward pass per batch, the
batch sharded over the `data` axis of the run's mesh (`mergejax.distributed`), the K variable
trees replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import distributed
from mergejax.data import eval_batches
from mergejax.recipe.schema import DIV_EPS, METHODS
from mergejax.search.space import SearchSpace
from mergejax.specs import unflatten

_L1_EPS = 1e-7  # mergekit `rescaled_masked_tensor`: no rescale when either norm is below it


def _leaf_order(names: Sequence[str]) -> list[str]:
    """The runner's leaf order inside a group: jax's flatten order of the unflattened tree."""
    from mergejax.methods import task_vectors as tv

    return tv.leaf_paths(unflatten({n: 0 for n in names}))


class PopulationMerger:
    """Merges K points of `space` on the given flat inputs (`{name: array}`), vectorised.

    Args:
      space: the search space (its blocks' tensors must cover the inputs).
      base: the base model's flat variables; models: the fine-tuned models' (same names).
      seed: the recipe runner's seed (`--random-seed`): DARE's draws depend on it.
    """

    def __init__(self, space: SearchSpace, base: Mapping[str, np.ndarray],
                 models: Sequence[Mapping[str, np.ndarray]], seed: int = 0):
        self.space = space
        self.base = {k: np.asarray(v, np.float32) for k, v in base.items()}
        self.thetas = {k: np.stack([np.asarray(m[k], np.float32) for m in models])
                       for k in self.base}
        self.taus = {k: v - self.base[k] for k, v in self.thetas.items()}
        # |tau| sorted per model (flattened): the magnitude trim's threshold at any density
        self.sorted_abs = {k: np.sort(np.abs(t).reshape(len(models), -1), axis=1)
                           for k, t in self.taus.items()}
        self.uniforms: dict[str, np.ndarray] = {}
        if any(METHODS[m].sparsify == "random" for m in space.methods):
            root = jax.random.key(seed)
            multi = len(space.blocks) > 1
            for j, names in enumerate(space.blocks.values()):
                group = jax.random.fold_in(jax.random.fold_in(root, j) if multi else root, 0)
                for i, name in enumerate(_leaf_order(names)):
                    shape = self.taus[name].shape[1:]
                    self.uniforms[name] = np.stack([np.asarray(jax.random.uniform(
                        jax.random.fold_in(jax.random.fold_in(group, t), i), shape,
                        jnp.float32)) for t in range(len(models))])

    def _sparsified(self, method, name: str, density: np.ndarray) -> np.ndarray:
        """(K, T, *shape) task vectors after `method`'s sparsification at densities (K, T)."""
        tau = self.taus[name][None]  # (1, T, *shape)
        k, t = density.shape
        expand = (k, t) + (1,) * (tau.ndim - 2)
        if method.sparsify == "magnitude":
            srt = self.sorted_abs[name]
            n = srt.shape[1]
            kth = n - (n * density).astype(np.int64)  # topk_kth: int(n * density), 1-based
            kth = np.where(density >= 1, 1, np.maximum(kth, 1))
            thr = srt[np.arange(t)[None, :], kth - 1]  # (K, T)
            thr = np.where(density >= 1, -np.inf, thr).astype(np.float32)
            return np.where(np.abs(tau) >= thr.reshape(expand), tau, np.float32(0))
        if method.sparsify == "random":
            # bernoulli(1 - p) with p = float32(1 - density), as the runner's dare computes it
            p = (1.0 - density).astype(np.float32)
            keep_prob = (np.float32(1.0) - p).reshape(expand)
            masked = np.where(self.uniforms[name][None] < keep_prob, tau, np.float32(0))
            axes = tuple(range(2, tau.ndim))
            before = np.abs(tau).sum(axis=axes, keepdims=True, dtype=np.float32)
            after = np.abs(masked).sum(axis=axes, keepdims=True, dtype=np.float32)
            ok = (before >= _L1_EPS) & (after >= _L1_EPS)
            return np.where(ok, masked * (before / np.where(ok, after, 1)), masked)
        return np.broadcast_to(tau, (k, *tau.shape[1:]))

    def _merge_block(self, method, names, weights, densities, lams, params) -> dict:
        """{name: (K, *shape)} for K candidates of one method on one block."""
        out = {}
        normalize = bool(params.get("normalize", method.defaults.get("normalize", False)))
        for name in names:
            x = self._sparsified(method, name, densities)
            w = weights.reshape(weights.shape + (1,) * (x.ndim - 2)).astype(np.float32)
            xs = x * w
            if method.consensus:
                total = xs.sum(axis=1, keepdims=True)
                majority = np.where(total >= 0, 1, -1)
                agree = np.sign(xs) == majority
                mixed = np.where(agree, xs, np.float32(0)).sum(axis=1)
                divisor = (agree * w).sum(axis=1).astype(np.float32)
                divisor[divisor == 0] = 1
            else:
                mixed = xs.sum(axis=1)
                s = weights.sum(axis=1).astype(np.float32)
                divisor = np.where(np.abs(s) < DIV_EPS, 1, s)
                divisor = divisor.reshape((-1,) + (1,) * (mixed.ndim - 1))
            if method.kind == "linear":  # no base: sum_t w_t theta_t (/ sum_t w_t)
                mixed = (self.thetas[name][None] * w).sum(axis=1)
                out[name] = (mixed / divisor if normalize else mixed).astype(np.float32)
                continue
            if normalize:
                mixed = mixed / divisor
            lam = lams.reshape((-1,) + (1,) * (mixed.ndim - 1)).astype(np.float32)
            out[name] = (self.base[name][None] + lam * mixed).astype(np.float32)
        return out

    def merge(self, points: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
        """The K merged flat variables of `points` (in order)."""
        k = len(points)
        merged: dict[str, np.ndarray] = {}
        t = self.space.num_models
        for block, names in self.space.blocks.items():
            by_method: dict[str, list[int]] = {}
            for c, p in enumerate(points):
                by_method.setdefault(p[f"{block}/method"], []).append(c)
            for m, rows in by_method.items():
                sel = [points[c] for c in rows]
                w = np.array([[p[f"{block}/w{i}"] for i in range(t)] for p in sel], np.float64)
                d = np.array([[p[f"{block}/d{i}"] for i in range(t)] for p in sel], np.float64)
                lam = np.array([p[f"{block}/lambda"] for p in sel], np.float64)
                part = self._merge_block(METHODS[m], names, w, d, lam, {})
                for name, values in part.items():
                    if name not in merged:
                        merged[name] = np.empty((k, *values.shape[1:]), np.float32)
                    merged[name][rows] = values
        return [{n: v[c] for n, v in merged.items()} for c in range(k)]


def supports(space: SearchSpace) -> bool:
    """True if every method of `space` has a vectorised merge here (no breadcrumbs' outlier
    trims: those trials go through the recipe runner)."""
    return all(METHODS[m].sparsify in (None, "magnitude", "random") for m in space.methods)


def stacked_logits(model, variables: Sequence[Mapping], images: np.ndarray,
                   batch_size: int = 256) -> np.ndarray:
    """(K, N, C) eval-mode logits of K variable trees of `model` on `images`: one vmapped,
    jitted forward per batch, each batch sharded over the run's `data` mesh axis."""
    mesh = distributed.mesh()
    stacked = distributed.replicate(
        jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *variables), mesh)
    apply = _vmapped(model, mesh)
    out = []
    for x, n in eval_batches(images, batch_size):
        xs, _ = distributed.put_batch(x, mesh)  # padded rows are cut off below
        out.append(distributed.to_host(distributed.wait(apply(stacked, xs), mesh))[:, :n])
    return np.concatenate(out, axis=1)


_VMAPPED: dict = {}


def _vmapped(model, mesh):
    if (model, mesh) not in _VMAPPED:
        _VMAPPED[model, mesh] = jax.jit(jax.vmap(model.apply, in_axes=(0, None)),
                                        out_shardings=distributed.replicated_sharding(mesh))
    return _VMAPPED[model, mesh]
