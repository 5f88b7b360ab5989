"""Post-merge repair: BatchNorm reset, and REPAIR (Jordan et al., ICLR 2023) for nets without it.

ZipIt! and REPAIR recompute BatchNorm running statistics of a merged model on a few batches of
training data in train mode (`reset_batch_stats`; estimator "per_batch" is torch's
momentum=None that they use, "population" weighs every image once). For BatchNorm nets that
*is* REPAIR: the BatchNorm affine parameters are already the merge-weighted interpolation of
the endpoints'.

Without BatchNorm, REPAIR rescales each merged layer so that its pre-activations have, per
channel, the merge-weighted interpolation of the endpoints' mean and standard deviation
(REPAIR's notebooks insert a BatchNorm with weight (1-a)sigma_0 + a sigma_1 and bias
(1-a)mu_0 + a mu_1, reset it, and fold it into the conv; `repair` does the fold directly).

Forward passes are data-parallel: each batch is sharded over the `data` axis of the run's mesh
(`mergejax.distributed`), the variables replicated; the per-batch, per-channel moments are
reduced on the devices (rows padded to fill the mesh masked out) and only those (C,) vectors
reach the host, where batches are combined in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mergejax import distributed
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec
from mergejax.specs.spec import Space, flatten, unflatten

ESTIMATORS = ("population", "per_batch")


@functools.lru_cache(maxsize=16)
def batch_stats_fn(model: Model, mesh: jax.sharding.Mesh, *, stacked: bool = False):
    """A jitted `fn(variables, x, mask) -> (stats, positions)`: each BatchNorm layer's train-mode
    statistics of one batch alone, replicated on `mesh`. Cached per (model, mesh, stacked).

    Args of `fn`:
      variables: the model's variables, replicated on `mesh`; with `stacked`, K models stacked
        on a leading axis of every leaf (scored at once, one vmapped forward).
      x: (B, H, W, C) images sharded over `data` (`distributed.put_batch`).
      mask: (B,) bool, False on padded rows, or None (no padding).

    Returns of `fn`:
      stats: the `batch_stats` tree, per BatchNorm layer `{"mean": (C,), "var": (C,)}` float32
        ((K, C) with `stacked`): the mean and biased variance over x's unmasked rows and all
        positions.
      positions: `{BatchNorm path (tuple of names): () int}` positions per channel and example
        at that layer (its H * W), the same for all K.

    Momentum 0 makes the "running" statistics after one train-mode call equal the batch's own;
    the positions come from the BatchNorm outputs captured in the same call.
    """
    exact = model.with_bn_momentum(0.0)

    def stats(variables, x, mask):
        with distributed.masked_batch_norm(mask):
            _, state = exact.module.apply(
                variables, x, train=True, mutable=["batch_stats", "intermediates"],
                capture_intermediates=lambda mdl, _: isinstance(mdl, nn.BatchNorm))
        positions = {path[:-1]: np.prod(out[0].shape[1:-1], dtype=np.int64)
                     for path, out in traverse_util.flatten_dict(state["intermediates"]).items()
                     if path[-1] == "__call__"}
        return state["batch_stats"], positions

    if stacked:  # positions depend on shapes only, so they are not stacked
        stats = jax.vmap(stats, in_axes=(0, None, None), out_axes=(0, None))
    return jax.jit(stats, out_shardings=distributed.replicated_sharding(mesh))


def reset_batch_stats(model: Model, variables: Variables, batches: Iterable[np.ndarray], *,
                      estimator: str = "population", stacked: bool = False) -> Variables:
    """`variables` with BatchNorm running statistics recomputed over `batches` (B, H, W, C).

    Two estimators of each channel's running mean and variance:

    - ``"population"``: every image weighs the same: the batch means and *biased* batch
      variances averaged with weights proportional to the batch sizes (the variance is the
      mean within-batch variance, the one a train-mode BatchNorm normalises with).
    - ``"per_batch"``: torch's BatchNorm with `momentum=None` (what ZipIt! and REPAIR use):
      the running mean is the plain mean of the batch means and the running variance the plain
      mean of the batches' *unbiased* variances (n / (n - 1), n = B*H*W positions at that
      layer), so every batch weighs the same and a ragged last batch counts as much as a full one.

    Accumulated in float64, stored as float32. Models without BatchNorm are returned unchanged.
    With `stacked`, `variables` are K models stacked on a leading axis of every leaf, each reset
    as if alone by one vmapped forward per batch (statistics leaves (K, C)).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown BatchNorm estimator {estimator!r}; valid: {ESTIMATORS}")
    if "batch_stats" not in variables:
        return variables
    mesh = distributed.mesh()
    fn = batch_stats_fn(model, mesh, stacked=stacked)
    on_mesh = distributed.replicate(variables, mesh)
    # Results are read back only at the end (a few (C,) vectors per batch), so the host prepares
    # the next batch while the devices run; on CPU meshes at most two batches are in flight
    # (`distributed.wait` on the one before: the train-mode forward has collectives).
    pending = []
    for x in batches:
        xs, mask = distributed.put_batch(np.asarray(x), mesh)
        pending.append((len(x), fn(on_mesh, xs, mask)))
        if len(pending) > 1:
            distributed.wait(pending[-2][1], mesh)
    acc: dict = {}  # layer path -> (total weight, weighted mean sum, weighted var sum)
    for size, result in pending:
        stats, positions = distributed.to_host(result)
        flat = traverse_util.flatten_dict(stats)
        for path, value in flat.items():
            layer, leaf = path[:-1], path[-1]
            if leaf != "mean":
                continue
            add_batch_moments(acc, layer, value, flat[(*layer, "var")],
                              int(positions[layer]) * size, size, estimator)
    return {**variables, "batch_stats": combined_batch_stats(acc)}


def add_batch_moments(acc: dict, layer: tuple, mean, var, n: int, batch_size: int,
                      estimator: str) -> None:
    """Adds one batch's per-channel moments of BatchNorm `layer` to `acc` (float64, host).

    `mean`/`var`: (..., C) the batch's mean and biased variance over its `n` values per channel
    (batch x positions); leading axes (e.g. K stacked models) pass through. `estimator`:
    "per_batch" (torch `momentum=None`: every batch weighs the same, unbiased variance) or
    "population" (every image weighs the same).
    """
    mu = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    if estimator == "per_batch":  # torch momentum=None: batches weigh the same
        w, mu_w, var_w = 1, mu, var * (n / max(n - 1, 1))
    else:  # every image weighs the same
        w = batch_size
        mu_w, var_w = mu * w, var * w
    k, m, v = acc.get(layer, (0, 0.0, 0.0))
    acc[layer] = (k + w, m + mu_w, v + var_w)


def combined_batch_stats(acc: dict) -> dict:
    """The `batch_stats` tree (float32 mean and var per layer) of what `add_batch_moments`
    accumulated."""
    if not acc:
        raise ValueError("BatchNorm reset needs at least one batch of data")
    new = {}
    for layer, (k, m, v) in acc.items():
        new[(*layer, "mean")] = (m / k).astype(np.float32)
        new[(*layer, "var")] = (v / k).astype(np.float32)
    return traverse_util.unflatten_dict(new)


def _shares_trunk(model: Model, trees: Sequence[Variables]) -> bool:
    """True when the trees differ at most in the head (a full zip): one reset serves all."""
    def trunk(tree):
        return {k: v for k, v in flatten(tree).items()
                if not k.startswith(f"params/{model.head}/")}

    first = trunk(trees[0])
    return all(rest.keys() == first.keys()
               and all(np.array_equal(np.asarray(v), np.asarray(first[k]))
                       for k, v in rest.items())
               for rest in map(trunk, trees[1:]))


def reset_trees(model: Model, trees: Sequence[Variables], batches: Sequence[np.ndarray], *,
                estimator: str = "population") -> list[Variables]:
    """`reset_batch_stats` of every tree; trees sharing their whole trunk (the heads of a full
    zip) are reset once and share the result."""
    trees = list(trees)
    if len(trees) > 1 and "batch_stats" in trees[0] and _shares_trunk(model, trees):
        stats = reset_batch_stats(model, trees[0], batches, estimator=estimator)["batch_stats"]
        return [{**t, "batch_stats": stats} for t in trees]
    return [reset_batch_stats(model, t, batches, estimator=estimator) for t in trees]


# ------------------------------------------------------------------------------------ REPAIR
@functools.lru_cache(maxsize=32)
def _moments_fn(model: Model, taps: tuple[str, ...], mesh: jax.sharding.Mesh):
    """jit fn(variables, x, mask) -> {tap: (count, mean (C,), centred sum of squares (C,))}
    over the positions of x's unmasked examples (mask None: all)."""

    def moments(variables, x, mask):
        feats = model.features(variables, x)[1]
        out = {}
        for t in taps:
            f = feats[t].reshape(-1, feats[t].shape[-1]).astype(jnp.float32)
            if mask is None:
                mu = f.mean(0)
                # Centred within the batch, so large-mean channels do not cancel.
                out[t] = (f.shape[0], mu, jnp.sum(jnp.square(f - mu), axis=0))
                continue
            valid = jnp.repeat(mask, f.shape[0] // mask.shape[0])[:, None]
            n = jnp.sum(valid)
            mu = jnp.sum(jnp.where(valid, f, 0.0), axis=0) / n
            out[t] = (n, mu, jnp.sum(jnp.where(valid, jnp.square(f - mu), 0.0), axis=0))
        return out

    return jax.jit(moments, out_shardings=distributed.replicated_sharding(mesh))


def channel_moments(model: Model, variables: Variables, taps: Sequence[str],
                    batches: Sequence[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tap, float64 (mean (C,), std (C,)) of every channel over all positions of `batches`.

    Every position of every image weighs the same (batches of different sizes are combined
    exactly with Chan's parallel update); the std is the biased (population) one.

    Raises:
      ValueError naming the tap when an activation is NaN or infinite.
    """
    mesh = distributed.mesh()
    fn = _moments_fn(model, tuple(taps), mesh)
    variables = distributed.replicate(variables, mesh)
    acc: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    for x in batches:
        xs, mask = distributed.put_batch(np.asarray(x), mesh)
        for t, (n_b, mu_b, m2_b) in distributed.to_host(fn(variables, xs, mask)).items():
            n_b = int(n_b)
            mu_b, m2_b = np.asarray(mu_b, np.float64), np.asarray(m2_b, np.float64)
            if t not in acc:
                acc[t] = (n_b, mu_b, m2_b)
                continue
            n_a, mu_a, m2_a = acc[t]
            n = n_a + n_b
            delta = mu_b - mu_a
            acc[t] = (n, mu_a + delta * (n_b / n), m2_a + m2_b + delta ** 2 * (n_a * n_b / n))
    if not acc:
        raise ValueError("REPAIR needs at least one batch of data")
    out = {}
    for t, (n, mu, m2) in acc.items():
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(m2))):
            raise ValueError(f"non-finite activations at tap {t!r}")
        out[t] = (mu, np.sqrt(np.maximum(m2 / n, 0.0)))
    return out


def _fold_leaves(spec: MergeSpec, space: Space) -> tuple[list[tuple[str, int]], list[str]]:
    """The producing (kernel path, produced axis) pairs and bias paths of `space`.

    The fold is exact only when the pre-activation is sum(kernels . inputs) + biases, so any
    other producing leaf (a norm's scale, running statistics) is an error.
    """
    kernels, biases = [], []
    for path, axis, produces in spec.axes_of(space.name):
        if not produces:
            continue
        leaf_name = path.rsplit("/", 1)[-1]
        if path.startswith("params/") and leaf_name == "kernel":
            kernels.append((path, axis))
        elif path.startswith("params/") and leaf_name == "bias":
            biases.append(path)
        else:
            raise ValueError(f"space {space.name!r}: REPAIR cannot fold into producing leaf "
                             f"{path}; declare the space without a pre_tap")
    if not kernels or not biases:
        raise ValueError(f"space {space.name!r}: REPAIR needs a producing kernel and bias to "
                         f"fold into, found kernels {kernels} and biases {biases}")
    return kernels, biases


def repair(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
           merged: Variables | Sequence[Variables], transforms: Mapping[str, Any],
           batches: Iterable[np.ndarray], *, min_std: float = 1e-6,
           estimator: str = "population") -> Variables | list[Variables]:
    """REPAIR: the merged model with its pre-activation statistics set to the endpoints' blend.

    BatchNorm models (`batch_stats` in the merged variables) get a BatchNorm reset, which is
    REPAIR's exact equivalent. Otherwise, for every merged space (a key of `transforms`) that
    has a `pre_tap`, in depth order: with merge matrix M = [M_1 .. M_N] (n_out, N*n) and the
    endpoints' per-channel pre-activation mean mu_i (n,) and std sigma_i (n,),

        target_mu = sum_i M_i mu_i,   target_sigma = sum_i M_i sigma_i        (n_out,)

    (REPAIR's (mu_a + mu_b)/2, (sigma_a + sigma_b)/2 for M = [I/2, I/2]); the merged model's
    own mean mu_m and std sigma_m are measured on the same batches, and the correction
    pre' = (pre - mu_m) * r + target_mu, r = target_sigma / sigma_m, is folded into the
    producing leaves: kernels are scaled by r along the produced axis, the bias becomes
    (bias - mu_m) * r + target_mu. The merged model is re-measured for every space, since an
    upstream correction changes downstream statistics. Channels whose merged std is at most
    `min_std * (1 + |mu_m|)` (dead or constant) are left untouched. Spaces without `pre_tap`
    and unmerged spaces (past a partial-zip cut) are not touched.

    Args:
      model: the architecture (shared by endpoints and merged model).
      spec: its merge spec; `Space.pre_tap` names the pre-activation taps.
      endpoints: N variable trees, the models that were merged.
      merged: the merged variables, or a list of trees sharing the merged trunk (one per task
        head, as `apply_merge` returns); each gets the same correction.
      transforms: `{space: (merge (n_out, N*n), unmerge (N*n, n_out))}` used for the merge.
      batches: image batches (B, H, W, C) of training data; read into memory once, since
        they are passed over once per repaired space.
      min_std: relative threshold below which a merged channel counts as zero-variance.
      estimator: the BatchNorm reset's estimator (`reset_batch_stats`), for BatchNorm nets.

    Returns:
      The repaired variables, in the form of `merged` (one tree or a list of trees).
    """
    single = isinstance(merged, Mapping)
    trees = [merged] if single else list(merged)
    batches = [np.asarray(x) for x in batches]
    if not batches:
        raise ValueError("REPAIR needs at least one batch of data")
    if any("batch_stats" in t for t in trees):
        out = reset_trees(model, trees, batches, estimator=estimator)
        return out[0] if single else out
    spaces = [s for s in spec.spaces if s.name in transforms and s.pre_tap is not None]
    if not spaces:
        return merged
    folds = {s.name: _fold_leaves(spec, s) for s in spaces}  # fail before any forward pass
    taps = [s.pre_tap for s in spaces]
    per_model = [channel_moments(model, v, taps, batches) for v in endpoints]
    flats = [{k: np.array(v) for k, v in flatten(t).items()} for t in trees]
    for s in spaces:
        merge = np.asarray(transforms[s.name][0], np.float64)
        target_mu = merge @ np.concatenate([m[s.pre_tap][0] for m in per_model])
        target_sigma = merge @ np.concatenate([m[s.pre_tap][1] for m in per_model])
        # The trunk up to a merged space is shared, so any tree measures it.
        mu_m, sigma_m = channel_moments(model, unflatten(flats[0]), [s.pre_tap], batches)[
            s.pre_tap]
        live = sigma_m > min_std * (1.0 + np.abs(mu_m))
        ratio = np.where(live, target_sigma / np.where(live, sigma_m, 1.0), 1.0)
        shift = np.where(live, target_mu - mu_m * ratio, 0.0)
        kernels, biases = folds[s.name]
        for flat in flats:
            for path, axis in kernels:
                leaf = flat[path]
                shape = [1] * leaf.ndim
                shape[axis] = -1
                flat[path] = (leaf * ratio.reshape(shape)).astype(leaf.dtype)
            for j, path in enumerate(biases):
                # pre = sum of every producer's output, so the shift goes on one bias only.
                leaf = flat[path]
                new = leaf * ratio + (shift if j == 0 else 0.0)
                flat[path] = new.astype(leaf.dtype)
    out = [unflatten(f) for f in flats]
    return out[0] if single else out
