"""Streamed, data-parallel feature statistics: mean, covariance and correlation of activations.

This is ZipIt!'s ``CovarianceMetric`` done stably. Rows of feature matrices are accumulated into
``(count, mean (d,), M2 (d, d))``, where M2 is the centred sum of outer products
``sum_r (x_r - mean)(x_r - mean)^T``. The raw moment ``E[x x^T] - E[x] E[x]^T`` is never formed,
because in float32 it loses everything when |mean| >> std. For example, with activations of
1000 + N(0, 1), E[x^2] ~ 1e6 and float32 has about 7 significant digits.

What counts as a row:
* Features of shape (B, ..., d): every position of the middle axes is a row, so NHWC conv
  activations (B, H, W, C) give B*H*W rows of C features. This matches ZipIt, which reshapes
  [B, C, H, W] to [C, B*H*W].
* A sequence of N models' features for the same batch, e.g.
  ``[f_a (B, ..., d_a), f_b (B, ..., d_b)]``, is one joint feature vector of d = d_a + d_b
  features (the models side by side; the arrays themselves are never concatenated). Its
  statistics are what merging needs: the cross-model block ``cov[:d_a, d_a:]``.
* Row parts (``fold_parts``): several such arrays (or sequences) of one batch whose rows form one
  set, e.g. a transformer's per-block outputs of its residual stream, as if concatenated along
  the rows.

Algorithm. For each batch, the mean is computed first. The rows are then centred on it and M2 is
the Gram matrix of the centred rows. A second, cheap correction ``c = mean(x - mean0)`` removes the
float32 error of the first mean: ``M2 = Xc^T Xc - n c c^T``, with c tiny, so there is no
cancellation. Batches are folded into the running state with Chan et al.'s parallel formula
(``merge``):
    delta = mean_b - mean_a,   mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta delta^T * n_a n_b / n.
A state keeps its mean as ``shift + rel_mean``: ``shift`` is its first batch's ``mean0`` (a float32
number, kept as it is) and ``rel_mean`` the small rest. ``delta`` is then computed as
``(shift_b - shift_a) + (rel_mean_b - rel_mean_a)``, where the difference of two nearby float32
numbers is exact, so it carries an error of eps*std, not eps*|mean|: merging many small states
(the per-device states of a mesh, a few rows each) stays as accurate as one large batch.
The Gram matrix uses the upper block-triangle only. Its column blocks are the models' features,
not concatenated (N models: the N(N+1)/2 products A_i^T A_j for i <= j, 3/4 of the FLOPs of
X^T X for two), except that models of 56-71 features are joined (``_JOINED_WIDTHS``: slow
products on XLA:CPU), and a model of d_i >= 768 features is cut further into 3 or 4 blocks
(2/3 or 5/8 of its FLOPs). Inside one update, rows are processed in chunks of ``_CHUNK`` rows
(centre, mask, Gram, add), so no centred copy of the whole batch is written; an update of at most
``_ONE_CALL_BYTES`` (4 MiB) of rows is one chunk. The matmuls run at Precision.HIGHEST, so GPUs
and TPUs do not silently use TF32/bf16.

Data parallelism. With ``mesh`` given, the state holds one partial state per device of the
``data`` axis (every leaf gets a leading axis of that size, sharded over ``data``), and
``update`` runs as ``jax.jit(jax.shard_map(...))`` with the batch's leading axis sharded the same
way: each device folds its own rows into its own partial state, with no communication at all.
The partial states are combined once, by ``combined`` / ``finalize`` (Chan et al.'s formula
below, as a balanced tree over the devices), instead of all-reducing count, mean, Gram and
min/max after every batch: on XLA:CPU one all-reduce per space and batch cost more than the
parallel forward passes saved, and on accelerators the per-batch collectives would sit on the
critical path of every step. A batch size B that is not divisible by the number of devices is
zero-padded inside the jit with a row mask; masked rows have zero weight everywhere, including
min/max and the finiteness check (a device holding only padding contributes an empty state). An
explicit ``mask`` (B,) can also be passed, e.g. the one from ``kernels.sharding.pad_batch`` on
multi-host.

XLA:CPU meshes. Only the final combination communicates; with several CPU devices in one
process, ``combined`` waits for its input and its result (``block_until_ready``). XLA:CPU runs
every device's part of a multi-device program on one client thread pool of
``max(cores, devices)`` threads (8 threads for 8 fake devices on 2 cores). The launch task for
each device first takes a slot of that device's in-flight semaphore (32 computations). If the
host runs ahead by more than 32 computations on a device while a program with a collective is
running, a launch task blocks on the semaphore while holding a pool thread, the all-reduce gets
only 7 of its 8 participant threads, and XLA aborts after 40 s ("Expected 8 threads to join the
rendezvous, but only 7 of them arrived"). Updates have no collective, so they may run ahead.
On GPU/TPU nothing waits.

Accuracy (float32 accumulation). Per batch, the error of M2 relative to the scale of the data is
about eps*sqrt(rows), and it does *not* grow with |mean|/std. Sequential merging of K batches adds
about eps*K relative error in the worst case (eps*sqrt(K) typically). ``pairwise=True`` in
:func:`feature_statistics` merges batches as a balanced tree, which gives eps*log2(K) at the cost
of log2(K) extra (d, d) buffers. On 1000 + N(0, 1) data the covariance matches float64
``np.cov(bias=True)`` to ~4e-6 relative, and the mean to within float32 rounding of 1000. The tests
assert 1e-4; a naive float32 E[xx^T] - mu mu^T is off by more than 1e-2 there. ``count`` is int32,
so at most 2^31 - 1 rows can be accumulated.

Finalisation follows ZipIt. ``cov = M2 / count`` (biased, then symmetrised exactly), and
``corr = cov / clamp(sd sd^T, 1e-7)``. Features that are exactly constant (per-feature min ==
max, tracked in the state) get a covariance row/column of exactly 0. Their correlation row and
column, diagonal included, is therefore exactly 0, with no NaN and no roundoff residue. The
correlation is clipped to [-1, 1] to remove ulp-level overshoot.

Non-finite activations (NaN or +-inf, or a float32 overflow of the batch sum) are flagged per
feature inside the jitted update at no extra cost: the flag is ``isfinite`` of the batch sum.
``finalize`` then raises a ValueError that names the feature space. There is no host sync per
update (the only wait is ``combined``'s on XLA:CPU meshes, above).

Compiled functions: one ``update`` per (input shapes, dtypes, mask given, mesh), one ``merge``,
one ``combined`` and one ``finalize`` per d (and number of partial states). ``update`` donates
the incoming state, so do not reuse a state after passing it to ``update``.
"""

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .checks import check_dtype, check_finite_array
from .sharding import DATA, constrain, cpu_collectives, data_size

_CLAMP = 1e-7  # ZipIt's compute_correlation: clamp(sd sd^T, min=1e-7)
# Rows per Gram call inside one update. Measured: 1024-2048 is 1.2-1.4x faster than one call
# over 16384 rows for d = 512-1024 (cache-sized slices), and neutral at d = 256.
_CHUNK = 2048
# An update whose rows take at most this many bytes (rows * d * 4) is one Gram call instead: the
# chunk loop costs more than it saves there (measured on a 2-core Zen 5: 9408 x 64 and 3136 x 128
# updates 5-20% faster as one call, a ViT's `collect` 4-13%; above ~4 MiB 2048-row chunks win).
_ONE_CALL_BYTES = 4 << 20


class Moments(NamedTuple):
    """Finalised statistics of d features (unpacks as ``mean, cov, corr``).

    Attributes:
      mean: (d,) float32 per-feature mean.
      cov: (d, d) float32 biased covariance (divided by the row count, as in ZipIt).
      corr: (d, d) float32 correlation ``cov / clamp(sd sd^T, 1e-7)``. Constant features have an
        all-zero row and column.
    """

    mean: jax.Array
    cov: jax.Array
    corr: jax.Array


class FeatureStats(NamedTuple):
    """Streaming accumulator state (a pytree) for d features.

    A state made for a mesh (``init(d, mesh)``) holds one partial state per device of its
    ``data`` axis: every leaf below gets a leading axis of that size K, sharded over ``data``
    (count (K,), shift (K, d), m2 (K, d, d), ...); ``combined`` reduces it to one state.

    Attributes:
      count: () int32, the number of rows seen.
      shift: (d,) float32 reference point: the first batch's (rounded) mean, 0 before any row.
      rel_mean: (d,) float32 running mean minus ``shift`` (small: see the module docstring).
      m2: (d, d) float32 centred sum of outer products, sum_r (x_r - mean)(x_r - mean)^T.
      fmin: (d,) float32 per-feature minimum (+inf before any row).
      fmax: (d,) float32 per-feature maximum (-inf before any row). fmin == fmax marks constant
        features.
      finite: (d,) bool, False once a feature has seen NaN, inf or an overflowing batch sum.
    """

    count: jax.Array
    shift: jax.Array
    rel_mean: jax.Array
    m2: jax.Array
    fmin: jax.Array
    fmax: jax.Array
    finite: jax.Array

    @classmethod
    def init(cls, dim: int, mesh: Mesh | None = None) -> "FeatureStats":
        """Empty state for ``dim`` features; with ``mesh``, one empty partial state per device of
        its ``data`` axis, already sharded, so that the first ``update`` can donate it in place."""
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"FeatureStats.init: dim must be an integer >= 1, got {dim!r}")
        return _empty_fn(int(dim), mesh)()

    @property
    def dim(self) -> int:
        """Number of features d."""
        return int(self.shift.shape[-1])

    @property
    def partial(self) -> bool:
        """True for a state of per-device partial states (made with a mesh)."""
        return self.count.ndim == 1

    def combined(self) -> "FeatureStats":
        """One state of all rows: the per-device partial states of a mesh state merged (Chan et
        al., a balanced tree over the devices), replicated over the mesh; ``self`` unchanged if
        it is already one state."""
        if not self.partial:
            return self
        mesh = _mesh_of(self.count)
        if not cpu_collectives(mesh):
            return _combine_jit(self, mesh)
        # The only collective of a stream: let no launch hold a pool thread while it runs.
        return jax.block_until_ready(_combine_jit(jax.block_until_ready(self), mesh))

    def update(self, features, mesh: Mesh | None = None, mask=None) -> "FeatureStats":
        """Fold a batch into the state. The state is donated, so do not reuse ``self`` afterwards.

        Args:
          features: an array (B, ..., d), or a sequence of N arrays (B, ..., d_i) with equal
            leading shapes (one per model), concatenated along the last axis
            (sum_i d_i == self.dim). Any float dtype; accumulated in float32. Host numpy arrays
            or jax arrays; on multi-host, pass global arrays from ``sharding.shard_batch``.
          mesh: a mesh with a ``data`` axis to shard B over (the state must have been made for
            it), or None for the default device (a one-state state).
          mask: optional (B,) bool; False examples (all their rows) are ignored.

        Returns:
          The new state (per-device partial states over ``mesh`` if given).
        """
        xs = _as_features(features)
        width = sum(x.shape[-1] for x in xs)
        if width != self.dim:
            raise ValueError(f"features have {width} channels in total, state has {self.dim}")
        if mask is not None and tuple(np.shape(mask)) != (xs[0].shape[0],):
            raise ValueError(f"mask must have shape ({xs[0].shape[0]},), got {np.shape(mask)}")
        want = None if mesh is None else data_size(mesh)
        have = int(self.count.shape[0]) if self.partial else None
        if want != have:
            made = f"for a mesh of {have} devices" if have else "without a mesh"
            raise ValueError(f"FeatureStats.update: the state was made {made}, but mesh="
                             f"{'None' if mesh is None else f'a mesh of {want} devices'}; "
                             "pass the mesh given to FeatureStats.init")
        return _update(self, xs, mask, mesh=mesh)

    def fold(self, features, mask=None) -> "FeatureStats":
        """Traceable update, for use inside a caller's `jax.jit` / `jax.shard_map`: the state
        merged with the moments of `features`, with no communication. Inside a `shard_map` over
        `data`, `self` is this device's partial state (leading axis 1) and `features` this
        device's rows: a mesh program whose forward and update both run per device.

        Args:
          features: as for `update` (arrays or a sequence of per-model arrays (b, ..., d_i)).
          mask: optional (b,) bool; False examples are ignored.
        """
        return self.fold_parts([features], mask)

    def fold_parts(self, parts, mask=None) -> "FeatureStats":
        """`fold` of several row parts of one batch as one row set: the statistics of their
        concatenation along rows, which is never written (e.g. a transformer stream tap's
        per-block outputs, sown separately).

        Args:
          parts: a non-empty sequence of parts, each as `fold`'s `features` (the same models
            and widths in every part; the middle axes may differ between parts).
          mask: optional (b,) bool for the batch's b examples, applied to every part.
        """
        if not parts:
            raise ValueError("FeatureStats.fold_parts: no parts given")
        xs = [_as_features(p) for p in parts]
        widths = {tuple(x.shape[-1] for x in p) for p in xs}
        batch = {p[0].shape[0] for p in xs}
        if len(widths) != 1 or len(batch) != 1:
            raise ValueError("FeatureStats.fold_parts: every part needs the same models, widths "
                             f"and batch size, got {[[tuple(x.shape) for x in p] for p in xs]}")
        if self.partial:
            local = jax.tree.map(lambda a: a[0], self)
            return jax.tree.map(lambda a: a[None], _merge(local, _moments(tuple(xs), mask)))
        return _merge(self, _moments(tuple(xs), mask))

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Combine two states of disjoint row sets (Chan et al.). ``self`` is donated.

        Args:
          other: a state with the same d (and, for partial states, the same mesh).

        Returns:
          The state of the union of both row sets.
        """
        if self.partial != other.partial:
            self, other = self.combined(), other.combined()
        return _merge_jit(self, other)

    def finalize(self, name: str | None = None,
                 widths: Sequence[int] | None = None) -> Moments:
        """Mean, biased covariance and ZipIt correlation of the accumulated rows.

        Args:
          name: the feature space / tap, used in error messages.
          widths: optional per-model widths (d_1, ..., d_N) of a concatenated state, used only to
            report non-finite features as (model, channel).

        Returns:
          :class:`Moments` with mean (d,), cov (d, d) and corr (d, d), all float32.

        Raises:
          ValueError: if no rows were accumulated, or if any feature saw a non-finite value.
        """
        where = f"feature space {name!r}" if name is not None else "feature space"
        self = self.combined()
        if int(_host(self.count)) == 0:
            raise ValueError(f"{where}: no rows were accumulated")
        finite = _host(self.finite)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            if widths is not None:
                starts = np.cumsum([0, *widths])
                model = np.searchsorted(starts, bad, side="right") - 1
                shown = [f"(model {m}, ch {b - starts[m]})" for m, b in zip(model[:8], bad[:8])]
            else:
                shown = [str(b) for b in bad[:8]]
            raise ValueError(
                f"{where}: non-finite activations (NaN/inf, or a float32 overflow) in "
                f"{bad.size} of {finite.size} features, e.g. {', '.join(shown)}")
        return _finalize(self)


def covariance_to_correlation(cov: jax.Array, dead: jax.Array | None = None) -> jax.Array:
    """ZipIt's ``compute_correlation``: ``cov / clamp(sd sd^T, 1e-7)``, sd = sqrt(diag(cov)).

    Args:
      cov: (d, d) covariance.
      dead: optional (d,) bool of features to zero out (row and column, diagonal included).

    Returns:
      (d, d) correlation in [-1, 1], never NaN for finite ``cov``.
    """
    shape = tuple(np.shape(cov))
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"covariance_to_correlation: cov must be square (d, d), got {shape}")
    check_dtype("covariance_to_correlation", "cov", cov)
    check_finite_array("covariance_to_correlation", "cov", cov)
    if dead is not None:
        cov = jnp.where(dead[:, None] | dead[None, :], 0.0, cov)
    sd = jnp.sqrt(jnp.maximum(jnp.diagonal(cov), 0.0))
    corr = cov / jnp.maximum(sd[:, None] * sd[None, :], _CLAMP)
    return jnp.clip(corr, -1.0, 1.0)


def feature_statistics(batches: Iterable, mesh: Mesh | None = None, *, name: str | None = None,
                       pairwise: bool = False) -> Moments:
    """Statistics of all rows of a stream of feature batches.

    Args:
      batches: an iterable of arrays (B_k, ..., d), or of sequences of N arrays (B_k, ..., d_i)
        (one per model, concatenated along the features). B_k and the middle axes may change
        between batches; each new shape compiles once.
      mesh: optional mesh with a ``data`` axis; each batch is sharded over it.
      name: the feature space / tap, used in error messages.
      pairwise: merge batches as a balanced binary tree (error ~ log2(K) instead of K for K
        batches, at the cost of up to log2(K) extra (d, d) states alive).

    Returns:
      :class:`Moments` (mean (d,), cov (d, d), corr (d, d)).
    """
    state, stack, widths = None, [], None
    for batch in batches:
        xs = _as_features(batch)
        if widths is None:
            widths = [x.shape[-1] for x in xs]
            state = FeatureStats.init(sum(widths), mesh)
        if not pairwise:
            state = state.update(xs, mesh)
            continue
        # Binary counter: merge equal-sized subtrees so partial sums stay balanced.
        node, level = FeatureStats.init(state.dim, mesh).update(xs, mesh), 0
        while stack and stack[-1][0] == level:
            node, level = stack.pop()[1].merge(node), level + 1
        stack.append((level, node))
    if widths is None:
        raise ValueError(f"feature space {name!r}: no batches")
    if pairwise:
        state = stack.pop()[1]
        while stack:
            state = stack.pop()[1].merge(state)
    return state.finalize(name=name, widths=widths if len(widths) > 1 else None)


# ----------------------------------------------------------------------------------------------
# Jitted internals.


def _as_features(features) -> tuple:
    """Normalise an array or a sequence of arrays to a tuple with equal leading shapes."""
    xs = tuple(features) if isinstance(features, (list, tuple)) else (features,)
    if not xs:
        raise ValueError("no feature arrays given")
    lead = {tuple(x.shape[:-1]) for x in xs}
    if len(lead) != 1 or xs[0].ndim < 2:
        raise ValueError(
            "features must be (B, ..., d_i) arrays with equal leading shapes, got "
            f"{[tuple(x.shape) for x in xs]}")
    for i, x in enumerate(xs):
        # values are checked for free inside the update (the `finite` flag, see finalize)
        check_dtype("FeatureStats.update", "features" if len(xs) == 1 else f"features[{i}]", x)
    return xs


def _mesh_of(x: jax.Array) -> Mesh:
    """The mesh a partial state's leaf is sharded over."""
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding):
        raise ValueError("FeatureStats: a partial (per-device) state must stay sharded over its "
                         f"mesh, got a leaf with sharding {sharding}")
    return sharding.mesh


@lru_cache(maxsize=64)
def _empty_fn(dim: int, mesh: Mesh | None):
    """jit () -> an empty `FeatureStats` for `dim` features (per device of `mesh`'s `data` axis
    if given, sharded over it), cached: one dispatch per state instead of one per leaf (a stream
    of a few batches over several spaces spent ~5 ms making its states eagerly)."""

    def empty():
        state = FeatureStats(
            count=jnp.zeros((), jnp.int32),
            shift=jnp.zeros((dim,), jnp.float32),
            rel_mean=jnp.zeros((dim,), jnp.float32),
            m2=jnp.zeros((dim, dim), jnp.float32),
            fmin=jnp.full((dim,), jnp.inf, jnp.float32),
            fmax=jnp.full((dim,), -jnp.inf, jnp.float32),
            finite=jnp.ones((dim,), bool),
        )
        if mesh is None:
            return state
        k = data_size(mesh)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), state)

    return jax.jit(empty, out_shardings=None if mesh is None else NamedSharding(mesh, P(DATA)))


def _host(x) -> np.ndarray:
    """A replicated (possibly multi-host) array as numpy, read from this process's first shard."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def _tdot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T b for a (n, p) and b (n, q), contracting rows without materialising a transpose."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _num_blocks(d: int) -> int:
    # Blocks of one model's features are column slices (copies). Measured on the 2-core CPU box:
    # below ~768 features the copies and extra calls cost more than the saved FLOPs. 3 blocks
    # (2/3 of the FLOPs) are best up to ~3k, and 4 blocks (5/8) above.
    return 1 if d < 768 else 3 if d < 3072 else 4


# Models of this many features are not a Gram block of their own: Eigen's products with a
# 56-71 wide output run at 1/2-2/3 of the rate of wider ones (measured on the 2-core Zen 5:
# 6272 x 64 at 55-72 GFLOP/s, 6272 x 72 at 118-125), so two such models are faster as one
# concatenated block (full FLOPs) than as three products of 3/4 the FLOPs (1.2-1.3x slower).
_JOINED_WIDTHS = range(56, 72)


def _column_blocks(widths: Sequence[int]) -> list[tuple[tuple[int, int, int], ...]]:
    """Column blocks of the Gram of N models' features, each a tuple of (model, start, stop)
    segments: every model's features on their own, a model of >= 768 features cut further into
    `_num_blocks` equal blocks, and neighbouring models with a width in `_JOINED_WIDTHS`
    joined into one block."""
    blocks = []
    for m, d in enumerate(widths):
        if d in _JOINED_WIDTHS and m and widths[m - 1] in _JOINED_WIDTHS:
            blocks[-1] += ((m, 0, d),)
            continue
        nb = _num_blocks(d)
        edges = [math.ceil(i * d / nb) for i in range(nb + 1)]
        blocks += [((m, edges[i], edges[i + 1]),) for i in range(nb)]
    return blocks


def _upper_grams(cols: Sequence[jax.Array]) -> tuple:
    """The upper block-triangle of X^T X for X = [cols[0], cols[1], ...] (each (n, d_i)): the
    products cols[i]^T cols[j] for i <= j, row by row."""
    return tuple(_tdot(cols[i], cols[j]) for i in range(len(cols)) for j in range(i, len(cols)))


def _assemble(upper: Sequence[jax.Array], nb: int) -> jax.Array:
    """The (d, d) matrix of `nb` x `nb` blocks whose upper triangle (i <= j, row by row) is
    `upper`, the lower one its mirror."""
    it = iter(upper)
    block = {(i, j): next(it) for i in range(nb) for j in range(i, nb)}
    rows = [jnp.concatenate([block[j, i].T if j < i else block[i, j] for j in range(nb)], axis=1)
            for i in range(nb)]
    return jnp.concatenate(rows, axis=0)


def _moments(parts: tuple, mask: jax.Array | None) -> FeatureStats:
    """State of one batch (or of one device's rows of it), given as row parts: each part a tuple
    of per-model arrays (b, ..., d_i), e.g. a transformer's per-block outputs of one stream. The
    rows of all parts form one row set, centred on one mean; mask (b,) bool applies to every
    part, or None (every row counts: no masking work at all)."""
    flat = [[a.reshape(-1, a.shape[-1]) for a in xs] for xs in parts]  # free reshapes
    rows = [fs[0].shape[0] for fs in flat]
    if mask is None:
        valid = [None] * len(parts)
        n = jnp.int32(sum(rows))
    else:
        # Every position of the middle axes is a row and inherits its example's mask.
        valid = [jnp.broadcast_to(mask.reshape((-1,) + (1,) * (xs[0].ndim - 2)),
                                  xs[0].shape[:-1]).reshape(-1, 1) for xs in parts]
        n = sum(jnp.sum(v, dtype=jnp.int32) for v in valid)

    def where(v, a, fill):
        return a if v is None else jnp.where(v, a, fill)

    nf = jnp.maximum(n, 1).astype(jnp.float32)
    # Pass 1 (a cheap reduction): each model's mean over all parts, to centre on.
    totals = [sum(jnp.sum(where(v, fs[m].astype(jnp.float32), 0.0), axis=0)
                  for fs, v in zip(flat, valid)) for m in range(len(flat[0]))]
    means = [t / nf for t in totals]
    blocks = _column_blocks([f.shape[1] for f in flat[0]])

    def chunk(fs, v, start, size):
        # Centring and masking a cache-sized slice right before its Gram avoids writing and
        # re-reading a centred copy of the whole batch. The models are never concatenated:
        # their column blocks go to the Gram as they are (the cross-model blocks once).
        vb = None if v is None else lax.dynamic_slice_in_dim(v, start, size)
        xb = [lax.dynamic_slice_in_dim(f, start, size).astype(jnp.float32) for f in fs]
        xc = [where(vb, x - m, 0.0) for x, m in zip(xb, means)]
        part = [[xc[m][:, a:b] if b - a < xc[m].shape[1] else xc[m] for m, a, b in blk]
                for blk in blocks]
        cols = [p[0] if len(p) == 1 else jnp.concatenate(p, axis=1) for p in part]
        return (tuple(jnp.sum(x, axis=0) for x in xc), _upper_grams(cols),
                tuple(jnp.min(where(vb, x, jnp.inf), axis=0) for x in xb),
                tuple(jnp.max(where(vb, x, -jnp.inf), axis=0) for x in xb))

    def add(p, q):
        return tuple(jax.tree.map(op, a, b) for op, a, b in
                     zip((jnp.add, jnp.add, jnp.minimum, jnp.maximum), p, q))

    # Pass 2, chunked over rows: sum of centred rows, their Gram, per-feature min/max.
    d = sum(m.shape[0] for m in means)
    if len(parts) > 1 and sum(rows) * d * 4 <= _ONE_CALL_BYTES:
        # Small parts are one chunk: fewer, longer products (the concatenation along rows is
        # fused into the centring, which writes its result anyway).
        flat = [[jnp.concatenate(same, axis=0) for same in zip(*flat)]]
        valid = [None if mask is None else jnp.concatenate(valid, axis=0)]
        rows = [sum(rows)]
    acc = None
    for fs, v, r in zip(flat, valid, rows):
        size = r if r * d * 4 <= _ONE_CALL_BYTES else _CHUNK
        k, tail = divmod(r, size)
        part_acc = chunk(fs, v, 0, min(r, size))
        if k > 1:
            part_acc = lax.fori_loop(
                1, k, lambda i, a, fs=fs, v=v, z=size: add(a, chunk(fs, v, i * z, z)), part_acc)
        if k and tail:
            part_acc = add(part_acc, chunk(fs, v, k * size, tail))
        acc = part_acc if acc is None else add(acc, part_acc)
    sum_c, upper, fmin, fmax = acc
    sum_c, fmin, fmax = jnp.concatenate(sum_c), jnp.concatenate(fmin), jnp.concatenate(fmax)
    gram = _assemble(upper, len(blocks))
    # mean0 carries the float32 error of a sum of large numbers; c (small) corrects it exactly
    # in the algebra: sum (x - m0 - c)(x - m0 - c)^T = Xc^T Xc - n c c^T.
    c = sum_c / nf
    m2 = gram - nf * (c[:, None] * c[None, :])
    # NaN/inf anywhere in a feature's rows makes its sum non-finite.
    return FeatureStats(n, jnp.concatenate(means), c, m2, fmin, fmax,
                        jnp.isfinite(jnp.concatenate(totals)))


def _merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Chan et al.'s parallel combination of two disjoint row sets."""
    n = a.count + b.count
    wb = b.count.astype(jnp.float32) / jnp.maximum(n, 1).astype(jnp.float32)
    # The shifts are float32 numbers close to each other: their difference is (nearly) exact.
    delta = (b.shift - a.shift) + (b.rel_mean - a.rel_mean)
    # n_a n_b / n written as n_a * (n_b / n) so nothing overflows or loses range.
    m2 = a.m2 + b.m2 + (a.count.astype(jnp.float32) * wb) * (delta[:, None] * delta[None, :])
    # An empty `a` takes b's shift and mean as they are (a's zero shift would cost precision).
    empty = a.count == 0
    return FeatureStats(n, jnp.where(empty, b.shift, a.shift),
                        jnp.where(empty, b.rel_mean, a.rel_mean + delta * wb), m2,
                        jnp.minimum(a.fmin, b.fmin), jnp.maximum(a.fmax, b.fmax),
                        a.finite & b.finite)


def _merge_any(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """`_merge` of two states, or device by device of two partial states."""
    return jax.vmap(_merge)(a, b) if a.count.ndim else _merge(a, b)


_merge_jit = jax.jit(_merge_any, donate_argnums=0)


def _merge_halves(state: FeatureStats) -> FeatureStats:
    """K partial states -> ceil(K / 2): state i merged with state i + K // 2 (an odd last one
    kept as it is)."""
    k = state.count.shape[0]
    half = k // 2
    first = jax.tree.map(lambda a: a[:half], state)
    second = jax.tree.map(lambda a: a[half:2 * half], state)
    rest = jax.tree.map(lambda a: a[2 * half:], state)
    return jax.tree.map(lambda m, r: jnp.concatenate([m, r]), jax.vmap(_merge)(first, second),
                        rest)


@partial(jax.jit, static_argnames=("mesh",))
def _combine_jit(state: FeatureStats, mesh: Mesh) -> FeatureStats:
    """The K partial states (leading axis) merged as a balanced tree, replicated on ``mesh``."""
    state = constrain(state, mesh, P())  # one all-gather of the K partial states
    while state.count.shape[0] > 1:
        state = _merge_halves(state)
    return jax.tree.map(lambda a: a[0], state)


@partial(jax.jit, static_argnames=("mesh",), donate_argnums=0)
def _update(state: FeatureStats, xs: tuple, mask, mesh: Mesh | None) -> FeatureStats:
    """One streamed update: state merged with the moments of xs (B, ..., d_i) under mask (B,)."""
    b = xs[0].shape[0]
    mask = None if mask is None else jnp.asarray(mask, bool)
    if mesh is None:
        return state.fold(xs, mask)
    k = data_size(mesh)  # `update` checked that the state has k partial states
    bp = -(-b // k) * k
    if bp != b:
        # Arrays are evenly sharded: pad B to a multiple of the data axis with masked-out zeros.
        xs = tuple(jnp.pad(x, [(0, bp - b)] + [(0, 0)] * (x.ndim - 1)) for x in xs)
        mask = jnp.pad(jnp.ones((b,), bool) if mask is None else mask, (0, bp - b))
    xs, mask = constrain((xs, mask), mesh)
    state = constrain(state, mesh)

    def step(state, xs, mask=None):
        # this device's partial state (leading axis 1 here) and rows: no communication
        return state.fold(xs, mask)

    args = (state, xs) if mask is None else (state, xs, mask)
    return jax.shard_map(step, mesh=mesh, in_specs=(P(DATA),) * len(args),
                         out_specs=P(DATA))(*args)


@jax.jit
def _finalize(state: FeatureStats) -> Moments:
    cov = state.m2 / jnp.maximum(state.count, 1).astype(jnp.float32)
    # The diagonal Gram blocks come from a general gemm, which is symmetric only up to summation
    # order; make the result exactly symmetric (downstream matchers assume it).
    cov = 0.5 * (cov + cov.T)
    # Exactly constant features have zero variance; zero their rows so roundoff cannot leak in.
    constant = state.fmin == state.fmax
    cov = jnp.where(constant[:, None] | constant[None, :], 0.0, cov)
    return Moments(state.shift + state.rel_mean, cov, covariance_to_correlation(cov))
