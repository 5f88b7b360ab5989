"""FS-Merge's merge (M) and unmerge (U) matrices: initial values and parameterisations.

For a space of width d per endpoint and merged width d', with N endpoints:
M is (d', N*d) (block i, `M[:, i*d:(i+1)*d]`, maps endpoint i's features into the merged space)
and U is (N*d, d') (block i maps merged features to endpoint i's). Both are written as

    M = M0 + delta(theta_M),    U^T = U0^T + delta(theta_U)

with M0, U0 the frozen initialisation of the space (`init_transform`: "first", "average", or
ZipIt!'s match) and `delta` a parameterisation whose initial value is exactly 0, so the
SuperNet at step 0 folds exactly to the initialisation. U is parameterised through its
transpose, so one `delta` serves both. Weight decay therefore pulls M and U towards their
initialisation rather than towards 0 (the published code decays the diagonal itself).

Parameterisations (`PARAMETERISATIONS`):
- "diagonal": one scale per (endpoint, channel) on the alignment pattern E (d', d) (E = I at
  equal widths; per head group at other widths): delta_i = E diag(s_i).
- "low_rank": A (d', r) @ B (r, N*d), A = 0 at init, B ~ 0.1 N(0, 1/r) (the published code's
  0.1 factor).
- "diagonal_and_low_rank": both (the paper's default, rank 12).
- "full": a dense (d', N*d) matrix, 0 at init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.registry import Registry

INITS = ("first", "average", "zipit")
PARAMETERISATIONS = ("diagonal", "low_rank", "diagonal_and_low_rank", "full")
LOW_RANK_SCALE = 0.1  # the published code's LOW_RANK_FACTOR


def alignment(d: int, d_new: int, groups: int = 1) -> np.ndarray:
    """E (d', d): merged channel g*d'/G + k <- endpoint channel g*d/G + k for k < min of the
    group widths (G = `groups`: attention heads keep their channels inside their head)."""
    gd, gn = d // groups, d_new // groups
    e = np.zeros((d_new, d), np.float32)
    k = np.arange(min(gd, gn))
    for g in range(groups):
        e[g * gn + k, g * gd + k] = 1.0
    return e


def init_transform(kind: str, d: int, d_new: int, num_models: int, groups: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(merge (d', N*d), unmerge (N*d, d')) of the "first" or "average" initialisation.

    Merged channel k (inside each head group) is endpoint channel k: "first" takes endpoint 0's,
    "average" the mean over endpoints; every endpoint reads merged channel k as its channel k
    (U_i = E^T). Narrower (d' < d): endpoint channels past d' are dropped. Wider (d' > d): the
    extra merged channels carry the other endpoints' channels in turn (endpoint 1's channel 0,
    1, ..., then endpoint 2's, ... cycling), which no endpoint reads at init (U_i is 0 there),
    so the init still computes endpoint 0 ("first") or the weight average ("average") exactly,
    while the extra channels hold live features the fit can start using (an all-zero channel
    would get no gradient through M and U alike).
    """
    if kind not in ("first", "average"):
        raise ValueError(f"init_transform: kind must be 'first' or 'average', got {kind!r}")
    if d % groups or d_new % groups:
        raise ValueError(f"widths {d} -> {d_new} must be multiples of the {groups} groups")
    e = alignment(d, d_new, groups)
    merge = np.zeros((d_new, num_models * d), np.float32)
    if kind == "first":
        merge[:, :d] = e
    else:
        merge[:] = np.tile(e, (1, num_models)) / num_models
    gd, gn = d // groups, d_new // groups
    for g in range(groups):
        for k in range(gd, gn):  # wider: extra channels from the other endpoints, in turn
            j = k - gd
            model = (1 + j // gd) % num_models
            merge[g * gn + k, model * d + g * gd + j % gd] = 1.0
    unmerge = np.tile(e.T, (num_models, 1))
    return merge, unmerge


class Parameterisation:
    """`init(key, d_new, d, N) -> theta` (delta(theta) == 0) and `delta(theta, E, N) ->
    (d', N*d)`. `rank` is used by the low-rank kinds."""

    def __init__(self, diagonal: bool, low_rank: bool, full: bool):
        self.diagonal, self.low_rank, self.full = diagonal, low_rank, full

    def init(self, key: jax.Array, d_new: int, d: int, num_models: int, rank: int) -> dict:
        """theta for a (d', N*d) matrix: `{"diag": (N, d), "a": (d', r), "b": (r, N*d),
        "full": (d', N*d)}` (the kinds this parameterisation has), with delta(theta) = 0."""
        theta = {}
        if self.diagonal:
            theta["diag"] = jnp.zeros((num_models, d), jnp.float32)
        if self.low_rank:
            theta["a"] = jnp.zeros((d_new, rank), jnp.float32)
            theta["b"] = (LOW_RANK_SCALE / np.sqrt(rank)) * jax.random.normal(
                key, (rank, num_models * d), jnp.float32)
        if self.full:
            theta["full"] = jnp.zeros((d_new, num_models * d), jnp.float32)
        return theta

    def delta(self, theta: dict, e: jax.Array, num_models: int) -> jax.Array:
        """The (d', N*d) change theta encodes, for alignment pattern `e` (d', d)."""
        d_new, d = e.shape
        out = jnp.zeros((d_new, num_models * d), jnp.float32)
        if "diag" in theta:
            out = out + (e[:, None, :] * theta["diag"][None]).reshape(d_new, num_models * d)
        if "a" in theta:
            out = out + jnp.dot(theta["a"], theta["b"], precision="highest")
        if "full" in theta:
            out = out + theta["full"]
        return out


_PARAMS: Registry[Parameterisation] = Registry("FS-Merge parameterisation")
_PARAMS.register("diagonal", Parameterisation(True, False, False))
_PARAMS.register("low_rank", Parameterisation(False, True, False))
_PARAMS.register("diagonal_and_low_rank", Parameterisation(True, True, False))
_PARAMS.register("full", Parameterisation(False, False, True))


def parameterisation(name: str) -> Parameterisation:
    """The parameterisation called `name` (KeyError listing them otherwise)."""
    return _PARAMS.get(name)
