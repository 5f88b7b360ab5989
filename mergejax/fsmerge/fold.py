"""The SuperNet's matrices and their closed-form fold into a plain model of the merged width.

For a trunk layer with endpoint weights W_i (bias b_i), its own merge M (d'_out, N*d_out) and
unmerge U (N*d_in, d'_in), blocks M_i = M[:, i*d_out:(i+1)*d_out], U_i = U[i*d_in:(i+1)*d_in]:

    W' = sum_i M_i W_i U_i     (M_i on the produced axis, U_i^T on the consumed axis)
    b' = sum_i M_i b_i

A tail (endpoint i's head) becomes W_i U_i. Because every nonlinearity, norm and attention acts
between one layer's M and the next layer's U, in merged width, the plain model on the folded
variables computes the SuperNet exactly: the fit differentiates through `fold`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.fsmerge.params import Parameterisation, alignment, parameterisation
from mergejax.fsmerge.plan import Plan
from mergejax.specs import flatten, unflatten

Flat = dict[str, Any]


def along(leaf: jax.Array, matrix: jax.Array, axis: int) -> jax.Array:
    """`matrix` (n_new, n_old) applied to axis `axis` of `leaf` (full float32 precision)."""
    moved = jnp.moveaxis(leaf, axis, 0)
    out = jnp.tensordot(matrix, moved, axes=1, precision="highest")
    return jnp.moveaxis(out, 0, axis)


def stack(endpoints: Sequence[Mapping[str, Any]]) -> Flat:
    """The N endpoints' leaves stacked: `{path: (N, *shape)}` float32."""
    flats = [flatten(v) for v in endpoints]
    return {k: jnp.asarray(np.stack([np.asarray(f[k], np.float32) for f in flats]))
            for k in flats[0]}


def frozen_state(plan: Plan, transforms: Mapping[str, tuple], num_models: int) -> dict:
    """The fixed initialisation per space: `{"M0": {space: (d', N*d)}, "UT0": {space:
    (d', N*d)}, "E": {space: (d', d)}}` from `transforms` = `{space: (merge, unmerge)}`."""
    out: dict = {"M0": {}, "UT0": {}, "E": {}}
    for name, d, d_new, groups in plan.spaces:
        merge, unmerge = (np.asarray(t, np.float32) for t in transforms[name])
        if merge.shape != (d_new, num_models * d) or unmerge.shape != (num_models * d, d_new):
            raise ValueError(f"space {name!r}: init merge {merge.shape} / unmerge "
                             f"{unmerge.shape}, expected ({d_new}, {num_models * d}) / "
                             f"({num_models * d}, {d_new})")
        out["M0"][name] = jnp.asarray(merge)
        out["UT0"][name] = jnp.asarray(unmerge.T)
        out["E"][name] = jnp.asarray(alignment(d, d_new, groups))
    return out


def init_mu(plan: Plan, param: Parameterisation, frozen: dict, stacked: Flat, key: jax.Array,
            rank: int) -> dict:
    """The learned state at step 0: `{"M": {layer or vector: theta}, "U": {layer: theta},
    "norm": {path: merged-width leaf}}`; norms start as the init's merge of the endpoints'."""
    n = next(iter(stacked.values())).shape[0]
    mu: dict = {"M": {}, "U": {}, "norm": {}}
    keys = iter(jax.random.split(key, len(plan.m_owners) + len(plan.u_layers)))
    for name, space in plan.m_owners:
        d, d_new = plan.width(space)
        mu["M"][name] = param.init(next(keys), d_new, d, n, rank)
    for layer in plan.u_layers:
        d, d_new = plan.width(layer.in_space)
        mu["U"][layer.name] = param.init(next(keys), d_new, d, n, rank)
    for leaf in plan.norms:  # on the host: no compile for a one-off
        x, merge = np.asarray(stacked[leaf.path]), np.asarray(frozen["M0"][leaf.space])
        size = merge.shape[1] // n
        mu["norm"][leaf.path] = jnp.asarray(sum(
            np.moveaxis(np.tensordot(merge[:, i * size:(i + 1) * size],
                                     np.moveaxis(x[i], leaf.axis, 0), axes=1), 0, leaf.axis)
            for i in range(n)), jnp.float32)
    return mu


def matrices(plan: Plan, param: Parameterisation, frozen: dict, mu: dict
             ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`({layer or vector: M (d', N*d)}, {layer: U (N*d, d')})` of the current state."""
    merges, unmerges = {}, {}
    for name, space in plan.m_owners:
        n = frozen["M0"][space].shape[1] // plan.width(space)[0]
        merges[name] = frozen["M0"][space] + param.delta(mu["M"][name], frozen["E"][space], n)
    for layer in plan.u_layers:
        space = layer.in_space
        n = frozen["UT0"][space].shape[1] // plan.width(space)[0]
        ut = frozen["UT0"][space] + param.delta(mu["U"][layer.name], frozen["E"][space], n)
        unmerges[layer.name] = ut.T
    return merges, unmerges


def _blocks(matrix: jax.Array, n: int, axis: int) -> list[jax.Array]:
    size = matrix.shape[axis] // n
    return [jax.lax.slice_in_dim(matrix, i * size, (i + 1) * size, axis=axis) for i in range(n)]


def _merge_leaf(stacked_leaf: jax.Array, merge: jax.Array, axis: int) -> jax.Array:
    """sum_i M_i x_i along `axis` of each endpoint's leaf x_i (stacked on axis 0)."""
    n = stacked_leaf.shape[0]
    return sum(along(stacked_leaf[i], m, axis) for i, m in enumerate(_blocks(merge, n, 1)))


def fold_trunk(plan: Plan, merges: Mapping, unmerges: Mapping, frozen: dict, mu: dict,
               stacked: Flat) -> Flat:
    """The merged trunk's leaves `{path: leaf}` (every leaf except the per-endpoint ones)."""
    out: Flat = {}
    n = next(iter(stacked.values())).shape[0]
    for layer in plan.linears:
        m_blocks = _blocks(merges[layer.name], n, 1)
        u_blocks = _blocks(unmerges[layer.name], n, 0) if layer.in_space else None
        kernel = 0.0
        for i in range(n):
            w = along(stacked[layer.kernel][i], m_blocks[i], layer.out_axis)
            if u_blocks is not None:
                w = along(w, u_blocks[i].T, layer.in_axis)
            kernel = kernel + w
        out[layer.kernel] = kernel
        if layer.bias is not None:
            out[layer.bias] = _merge_leaf(stacked[layer.bias], merges[layer.name], 0)
    for leaf in plan.vectors:
        out[leaf.path] = _merge_leaf(stacked[leaf.path], merges[leaf.path], leaf.axis)
    for leaf in plan.stats:
        out[leaf.path] = _merge_leaf(stacked[leaf.path], frozen["M0"][leaf.space], leaf.axis)
    out.update(mu["norm"])
    return out


def fold_tails(plan: Plan, unmerges: Mapping, stacked: Flat, i: int) -> Flat:
    """Endpoint i's per-endpoint leaves: each tail kernel W_i U_i, and leaves on no space."""
    n = next(iter(stacked.values())).shape[0]
    out: Flat = {p: stacked[p][i] for p in plan.per_model}
    for tail in plan.tails:
        u_i = _blocks(unmerges[tail.name], n, 0)[i]
        out[tail.kernel] = along(stacked[tail.kernel][i], u_i.T, tail.in_axis)
    return out


def fold(plan: Plan, param: Parameterisation, frozen: dict, mu: dict, stacked: Flat
         ) -> list[dict]:
    """N variable trees of the merged model: the folded trunk with endpoint i's folded head.

    Traceable (the fit differentiates through it); `folded` is the jitted, cached form."""
    merges, unmerges = matrices(plan, param, frozen, mu)
    trunk = fold_trunk(plan, merges, unmerges, frozen, mu, stacked)
    n = next(iter(stacked.values())).shape[0]
    return [unflatten({**trunk, **fold_tails(plan, unmerges, stacked, i)}) for i in range(n)]


@functools.lru_cache(maxsize=16)
def _fold_jit(plan: Plan, param: str):
    return jax.jit(lambda frozen, mu, stacked: fold(plan, parameterisation(param), frozen, mu,
                                                    stacked))


def folded(plan: Plan, param: str, frozen: dict, mu: dict, stacked: Flat) -> list[dict]:
    """`fold` jitted (compiled once per plan and parameterisation), as numpy trees."""
    trees = _fold_jit(plan, param)(frozen, mu, stacked)
    return [jax.tree.map(np.asarray, t) for t in trees]
