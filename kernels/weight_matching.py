"""Git Re-Basin weight matching: coordinate ascent over all permutations of a spec.

For each permutation p in turn, the similarity of model A's and model B's weights along p is

    S_p = sum over leaves with p on axis `ax` of  W_a[ax -> 0] . W_b'[ax -> 0]^T      (n, n)

where W_b' has every *other* permuted axis already permuted by the current permutations; p is
then set to the exact linear assignment maximising <S_p, P>. Each step can only increase the
objective sum_leaves <W_a, pi(W_b)>, so the sweep loop terminates (Git Re-Basin, Lemma 2); it
stops after a sweep that gains nothing (or `max_iter` sweeps). S_p is built by one jitted einsum
function per permutation (compiled once); the assignment runs on the host's fastest exact solver.

The spec is duck-typed so this module needs nothing from mergejax: any object with `.spaces`
(items with `.name`, `.width`) and `.leaves` (`{path: [axis objects with .axis, .space]}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .assignment import solve_assignment, solve_group_assignment
from .checks import check_count, check_dtype, check_finite_array


def _axes_by_space(spec, paths) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {s.name: [] for s in spec.spaces}
    for path in paths:
        for a in spec.leaves[path]:
            out[a.space].append((path, a.axis))
    return out


def _permuted_except(leaf, axes, perms, skip: str | None):
    for a in axes:
        if a.space != skip:
            leaf = jnp.take(leaf, perms[a.space], axis=a.axis)
    return leaf


def _similarity_fn(spec, paths: tuple[str, ...], space: str):
    involved = [(p, ax) for p in paths for ax in spec.leaves[p] if ax.space == space]

    @jax.jit
    def similarity(params_a, params_b, perms):
        n = next(s.width for s in spec.spaces if s.name == space)
        total = jnp.zeros((n, n), jnp.float32)
        for path, ax in involved:
            wb = _permuted_except(params_b[path], spec.leaves[path], perms, skip=space)
            wa = jnp.moveaxis(params_a[path], ax.axis, 0).reshape(n, -1)
            wb = jnp.moveaxis(wb, ax.axis, 0).reshape(n, -1)
            total = total + jnp.dot(wa, wb.T, precision="highest")
        return total

    return similarity


def _objective_fn(spec, paths: tuple[str, ...]):
    @jax.jit
    def objective(params_a, params_b, perms):
        return sum(jnp.vdot(params_a[p], _permuted_except(params_b[p], spec.leaves[p], perms, None))
                   for p in paths)

    return objective


def weight_matching(spec, params_a: Mapping[str, Any], params_b: Mapping[str, Any], *,
                    max_iter: int = 100, seed: int = 0, init_perm: Mapping | None = None,
                    backend: str = "auto", return_history: bool = False,
                    group_heads: bool = True):
    """Permutations of model B that align its weights to model A's.

    Args:
      spec: a merge spec (see module docstring); only leaves present in `params_a` are used.
      params_a, params_b: flat `{path: array}` dicts (same shapes), e.g. the `params/...` leaves.
      max_iter: the most sweeps over all permutations.
      seed: sweeps visit the permutations in an order drawn from this seed.
      init_perm: starting permutations (default identity).
      backend: the `solve_assignment` backend.
      return_history: also return the objective after every sweep.
      group_heads: spaces with `groups > 1` (attention heads) are permuted group by group
        (`solve_group_assignment`): a head moves as a unit, so the permuted model still
        computes attention head by head. False permutes their features freely.

    Returns:
      `{space: perm}` with `perm` (n,) int: B's feature `perm[k]` is matched to A's feature k,
      i.e. `take(W_b, perm, axis)` aligns B to A. With `return_history`, `(perms, history)`.
    """
    fn = "weight_matching"
    check_count(fn, "max_iter", max_iter, lo=0)
    paths = tuple(sorted(p for p in params_a if p in spec.leaves and spec.leaves[p]))
    for name, params in (("params_a", params_a), ("params_b", params_b)):
        for p in paths:
            if p not in params:
                raise ValueError(f"{fn}: {name} has no leaf {p!r}")
            check_dtype(fn, f"{name}[{p!r}]", params[p])
            check_finite_array(fn, f"{name}[{p!r}]", params[p])
    by_space = _axes_by_space(spec, paths)
    spaces = [s.name for s in spec.spaces if by_space[s.name]]
    pa = {p: jnp.asarray(params_a[p], jnp.float32) for p in paths}
    pb = {p: jnp.asarray(params_b[p], jnp.float32) for p in paths}
    for p in paths:
        if pa[p].shape != pb[p].shape:
            raise ValueError(f"leaf {p}: shapes differ, {pa[p].shape} vs {pb[p].shape}")
    widths = {s.name: s.width for s in spec.spaces}
    groups = {s.name: getattr(s, "groups", 1) for s in spec.spaces}
    for s, perm in (init_perm or {}).items():
        if s in widths and sorted(np.asarray(perm).tolist()) != list(range(widths[s])):
            raise ValueError(f"{fn}: init_perm[{s!r}] is not a permutation of "
                             f"range({widths[s]})")
    perms = {s: jnp.asarray(np.asarray(init_perm[s]) if init_perm and s in init_perm
                            else np.arange(widths[s]), jnp.int32) for s in widths}
    sims = {s: _similarity_fn(spec, paths, s) for s in spaces}
    objective = _objective_fn(spec, paths)
    rng = np.random.default_rng(seed)
    history = [float(objective(pa, pb, perms))]
    for _ in range(max_iter):
        progress = False
        for s in rng.permutation(spaces):
            score = np.asarray(sims[s](pa, pb, perms), np.float64)
            if group_heads and groups[s] > 1:
                _, new = solve_group_assignment(score, groups[s], backend=backend)
            else:
                new = solve_assignment(score, maximize=True, backend=backend)
            old_value = score[np.arange(len(new)), np.asarray(perms[s])].sum()
            new_value = score[np.arange(len(new)), new].sum()
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[s] = jnp.asarray(new, jnp.int32)
                progress = True
        history.append(float(objective(pa, pb, perms)))
        if not progress:
            break
    out = {s: np.asarray(p) for s, p in perms.items()}
    return (out, history) if return_history else out
