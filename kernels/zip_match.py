"""ZipIt! greedy feature matching (`match_tensors_zipit`) as a static-shape JAX kernel.

The published loop (gstoica27/ZipIt, `matching_functions.py`) takes a flat argmax over the whole
remaining similarity matrix, merges the pair, and deletes one row and one column with
`torch.cat` on every step: O(O^2) work per step, O(O^3) in all. Here the matrix keeps its full
shape for the whole run (a removed feature is only flagged dead and masked out of every read), and
each row caches an upper bound of its maximum plus, when known to be exact, the first column
reaching it. A step reads and writes the merged row and column and compares the new column with
the cached bounds: O(O) work. A row whose cached best was invalidated is rescanned only if it
reaches the top (lazy greedy). Exactly O - n_out steps run in one `lax.fori_loop`.

Exact parity with the reference, including tie-breaking: the reference picks the first maximum
in row-major order of its *shrinking* matrix. Deleting a row or column never reorders the others,
so a live entry's (row rank, column rank) orders the same way as its (row, column) original
indices; row-major order over the live entries of the masked matrix is the reference's order.
The first maximum is therefore found in two stages: the first row whose maximum is the global
maximum, then that row's first column reaching it. (A flat 2D `jnp.argmax` would give the same
index but is ~30x slower than `max` on XLA:CPU; see perf_anchors.md.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .checks import (
    check_count,
    check_dtype,
    check_finite_array,
    check_number,
    check_square,
    is_traced,
)
from .transforms import merge_from_unmerge

__all__ = ["zip_match"]

_NEG_INF = float("-inf")


def _first_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Max along the last axis and the first index reaching it.

    x: (..., m) float32 -> ((...,) float32, (...,) int32). An all -inf row gives (-inf, 0).
    Written as max + min-of-index instead of `argmax`: XLA:CPU vectorises max/min reductions
    but not the variadic (value, index) argmax reduction.
    """
    m = jnp.max(x, axis=-1)
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    idx = jnp.min(jnp.where(x == m[..., None], iota, x.shape[-1]), axis=-1)
    return m, idx.astype(jnp.int32)


def _first_true(mask: jax.Array) -> jax.Array:
    """Index of the first True of a 1D bool mask (its length if none): () int32."""
    iota = jnp.arange(mask.shape[0], dtype=jnp.int32)
    return jnp.min(jnp.where(mask, iota, mask.shape[0]))


def zip_match(
    corr: jax.Array,
    *,
    alpha: float = 0.3,
    beta: float = 0.125,
    reduction: float | None = None,
    num_models: int = 2,
    rule: str = "reference",
) -> tuple[jax.Array, jax.Array]:
    """ZipIt!'s greedy matching of N models' features into one merged feature space.

    Args:
      corr: (O, O) float32 correlation matrix of the concatenated features of N = `num_models`
        models, O = N * n; model m's features are rows/columns m*n:(m+1)*n. It need not be
        symmetric (it is used as given, like the reference). The diagonal is ignored. A floating
        dtype; -inf marks a pair that may never merge; NaN and +inf are refused (ValueError
        naming the count and the first position). May be a tracer (the function can be called
        inside `jax.jit`): its values are then unknown when this function runs, so instead of
        raising, a NaN/+inf corr (or a non-finite traced alpha) makes the compiled kernel skip
        the matching and return all-NaN matrices (it never hangs).
      alpha: ZipIt!'s `a` (a finite Python float, or a traced scalar). > 0: a merged feature
        keeps similarity min(S[:, i], S[:, j]) * alpha (scaled once). <= 0: instead the merged
        feature is blocked from further merges with the features of both models involved (how
        "both models" is read depends on `rule`).
      beta: ZipIt!'s `b` (a finite Python float >= 0). Each model may take part in
        budget = int((to_remove // N) * beta + 1e-4) same-model merges, to_remove = O - n_out.
        As in the reference the budget is only checked *after* a same-model merge, so every
        model gets max(1, budget) of them (beta = 0 still allows one); once it is exhausted all
        similarities within that model are set to -inf.
      reduction: r; merged width n_out = int(O * (1 - r) + 1e-4). Default 1 - 1/N (n_out = n).
        Note: the reference infers N from r as int(1/(1 - r) + 0.5); here N is `num_models`,
        which agrees whenever r = 1 - 1/N (the only way ZipIt's ModelMerge calls it).
      num_models: N, an int >= 1 (and O = N * n with n >= 1).
      rule: "reference" (default) reproduces gstoica27/ZipIt's `match_tensors_zipit` bit for bit,
        including two quirks of its row/column deletion:
          * alpha <= 0 blocks the merged feature by *position* in the shrinking matrix: the rows
            whose rank among live features (the absorbed one still counted) falls in
            [o*n, (o+1)*n) and the columns whose rank (not counting it) does, for the origins o
            of the pair, rather than the features of those models;
          * when every remaining similarity is -inf (possible with alpha <= 0 and small beta,
            N >= 3), the first remaining feature is "merged with itself" and vanishes: its
            features get an all-zero unmerge row (dropped).
        "paper": blocks by model of origin (what the paper describes) and never drops a
        feature: if every similarity is -inf, the first two remaining features are merged.
        With N = 2 both rules give the same result on all golden cases.

    Returns:
      merge: (n_out, O) float32, (U / (colsum(U) + 1e-5)).T.
      unmerge: (O, n_out) float32 0/1 matrix U; U[k, c] = 1 iff feature k is in merged feature c.
        Columns are ordered like the reference's: merged feature c is the c-th surviving
        feature (a pair keeps the position of its lower index). Every row has exactly one 1,
        except features dropped under rule="reference" (all-zero rows).

    Compilation: one compile per (O, n_out, num_models, rule); alpha and beta enter the compiled
    loop as runtime scalars, so sweeping them does not recompile.
    """
    fn = "zip_match"
    if rule not in ("reference", "paper"):
        raise ValueError(f"{fn}: rule must be 'reference' or 'paper', got {rule!r}")
    num_models = check_count(fn, "num_models", num_models)
    check_dtype(fn, "corr", corr)
    big_o, _ = check_square(fn, "corr", corr, num_models)
    check_number(fn, "alpha", alpha)
    if is_traced(beta):
        raise ValueError(f"{fn}: beta must be a Python number (it sets the static merge "
                         "budget), got a traced value")
    check_number(fn, "beta", beta, lo=0.0)
    if reduction is not None:
        check_number(fn, "reduction", reduction, lo=0.0, hi=1.0)
    # -inf is a similarity (a pair that may never merge, as the reference's own blocking);
    # NaN and +inf are not: a NaN would keep the greedy loop from ever ending.
    check_finite_array(fn, "corr", corr, allow_neg_inf=True)
    corr = jnp.asarray(corr, jnp.float32)
    if reduction is None:
        reduction = 1.0 - 1.0 / num_models
    n_out = int(big_o * (1 - reduction) + 1e-4)
    if not 1 <= n_out <= big_o:
        raise ValueError(f"{fn}: reduction={reduction} gives merged width {n_out} for O={big_o}")
    # Python float arithmetic, exactly as the reference computes it.
    budget = int(((big_o - n_out) // num_models) * beta + 1e-4)
    # At most O - n_out same-model merges happen, so a larger budget is never exhausted: the
    # cap changes nothing but keeps a huge beta from overflowing int32.
    budget = min(budget, big_o)
    return _zip_match(
        corr,
        jnp.float32(alpha),
        jnp.int32(budget),
        n_out=n_out,
        num_models=num_models,
        rule=rule,
        tile=_default_tile(big_o),
        # concrete corr and alpha were checked above; traced ones are guarded in the kernel
        guard=is_traced(corr) or is_traced(alpha),
    )


def _default_tile(big_o: int) -> int:
    """Column-tile width B of the (O/B, O, B) storage (see `_zip_match`)."""
    return 64 if big_o >= 512 else 8


@functools.partial(jax.jit, static_argnames=("n_out", "num_models", "rule", "tile", "guard"))
def _zip_match(
    corr: jax.Array,
    alpha: jax.Array,
    budget0: jax.Array,
    *,
    n_out: int,
    num_models: int,
    rule: str,
    tile: int,
    guard: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Jitted core of `zip_match`: corr (O, O) f32, alpha () f32, budget0 () int32.

    `guard`: check corr for NaN/+inf and alpha for non-finite values inside the kernel (for
    traced input, whose values `zip_match` cannot check); the matching is then skipped and the
    result is all NaN, never an endless loop. Off for input already checked on the host.

    Storage: the similarity matrix S (padded to P = a multiple of `tile` with dead features) is
    kept as T of shape (P/B, P, B) with T[c // B, r, c % B] = S[r, c]: blocks of B columns, each
    stored row-major. A step reads and writes rows *and columns*; in plain row-major storage a
    column is P accesses P*4 bytes apart (a TLB miss and a cache miss each): the whole run was
    ~2x slower at O = 2048 and 8192. In T a column is P accesses 4*B bytes apart within one
    P*4*B-byte span (prefetch-friendly), and a row is P/B runs of B contiguous floats.

    Dead features are not overwritten with -inf: every read masks them with the live mask
    instead, which saves a row and a column write per step.

    State carried by the loop (all (P,) unless noted): tiles (P/B, P, B); best_val (upper bound
    of each row's maximum over live columns); best_col and exact (exact: best_val is the row's
    maximum and best_col its first column); live; rank (number of live features before each
    one); rep (surviving feature each one was merged into, -1 if dropped); budget (N,).
    """
    big_o = corr.shape[0]
    n = big_o // num_models
    to_remove = big_o - n_out
    # Guard for traced input (concrete input was checked by `zip_match`): a NaN would make the
    # lazy-greedy `pick` loop forever. Replace the input by a harmless one and poison the result.
    if guard:
        bad = jnp.any(jnp.isnan(corr) | (corr == jnp.inf)) | ~jnp.isfinite(alpha)
        corr = jnp.where(bad, jnp.float32(0), corr)
        alpha = jnp.where(bad, jnp.float32(1), alpha)
    b = tile
    p = -(-big_o // b) * b  # padded size; padding = features that are dead from the start
    nb = p // b
    block = alpha <= 0  # blocking instead of alpha scaling (runtime flag, both are O(O))
    positional = rule == "reference"
    drop_on_empty = rule == "reference"

    idx = jnp.arange(p, dtype=jnp.int32)
    # A merged feature keeps the origin of its lower index, so origins are static. Padded
    # features get origins >= N, which no real feature has.
    origin = idx // n
    live0 = idx < big_o

    if p > big_o:
        corr = jnp.pad(corr, ((0, p - big_o), (0, p - big_o)), constant_values=_NEG_INF)
    tiles = corr.reshape(p, nb, b).transpose(1, 0, 2)  # (P/B, P, B)
    row_t = lax.broadcasted_iota(jnp.int32, tiles.shape, 1)
    col_t = lax.broadcasted_iota(jnp.int32, tiles.shape, 0) * b + lax.broadcasted_iota(
        jnp.int32, tiles.shape, 2
    )
    tiles = jnp.where(row_t == col_t, _NEG_INF, tiles)  # diagonal: never a candidate
    # initial row maxima: the only full O^2 reduction of the run
    best_val = jnp.max(tiles, axis=(0, 2))
    best_col = jnp.min(jnp.where(tiles == best_val[None, :, None], col_t, p), axis=(0, 2))

    def col_start(c):
        """Start of column c >= 0 in the tiled storage. lax.div/rem: C semantics, without the
        sign fix-ups of `//` and `%`, which XLA would otherwise repeat in per-element loops."""
        return lax.div(c, b), 0, lax.rem(c, b)

    def read_row(tiles, r):
        """Row r () int32 of S -> (P,)."""
        return lax.dynamic_slice(tiles, (0, r, 0), (nb, 1, b)).reshape(p)

    def read_col(tiles, c):
        """Column c () int32 of S -> (P,)."""
        return lax.dynamic_slice(tiles, col_start(c), (1, p, 1)).reshape(p)

    def rescan(tiles, r, live):
        """(best value, first best column) of row r () int32 over the live columns."""
        return _first_max(jnp.where(live, read_row(tiles, r), _NEG_INF))

    def pick(tiles, best_val, best_col, exact, live):
        """First maximum in row-major order, rescanning only rows that reach the top.

        `best_val` is an upper bound of each row's maximum; rows with `exact` set also have
        the exact maximum and first column reaching it. The first row whose bound equals the
        largest bound is the answer if it is exact: every earlier row's true maximum is below
        the top, every later row's is at most the top. If it is not exact it is rescanned and
        the search repeats. Usually no rescan is needed (classic lazy greedy).
        """

        def top_row(best_val):
            top = jnp.max(best_val)
            return top, _first_true(best_val == top)

        def body(carry):
            best_val, best_col, exact, _, r = carry
            val, col = rescan(tiles, r, live)
            best_val, best_col = best_val.at[r].set(val), best_col.at[r].set(col)
            return (best_val, best_col, exact.at[r].set(True), *top_row(best_val))

        top, r = top_row(best_val)
        return lax.while_loop(
            lambda c: ~c[2][c[4]], body, (best_val, best_col, exact, top, r)
        )

    def kill_origin(tiles, best_val, best_col, exact, kill, o, live):
        """Budget exhausted for model o: -inf between all its features, rescan its rows.

        A `while_loop` run 0 or 1 times rather than `lax.cond`: XLA:CPU copies the whole
        matrix through the pass-through branch of a conditional on every step, while a while
        loop updates its carry in place.
        """
        col_of_o = (origin == o).reshape(nb, 1, b)

        def body(carry):
            tiles, best_val, best_col, exact, _ = carry
            start = o * n
            rows = lax.dynamic_slice(tiles, (0, start, 0), (nb, n, b))
            tiles = lax.dynamic_update_slice(
                tiles, jnp.where(col_of_o, _NEG_INF, rows), (0, start, 0)
            )
            # rescan from the updated matrix, not from `rows`: reading the old one after the
            # write would make XLA copy the whole matrix
            rows = lax.dynamic_slice(tiles, (0, start, 0), (nb, n, b))
            flat = rows.transpose(1, 0, 2).reshape(n, p)
            val, col = _first_max(jnp.where(live, flat, _NEG_INF))
            # dead rows hold stale finite data: their best must stay -inf
            val = jnp.where(lax.dynamic_slice(live, (start,), (n,)), val, _NEG_INF)
            best_val = lax.dynamic_update_slice(best_val, val, (start,))
            best_col = lax.dynamic_update_slice(best_col, col, (start,))
            exact = lax.dynamic_update_slice(exact, jnp.ones(n, bool), (start,))
            return tiles, best_val, best_col, exact, jnp.bool_(False)

        tiles, best_val, best_col, exact, _ = lax.while_loop(
            lambda c: c[4], body, (tiles, best_val, best_col, exact, kill)
        )
        return tiles, best_val, best_col, exact

    def step(_, state):
        tiles, best_val, best_col, exact, live, rank, rep, budget = state

        # --- choose the pair: first maximum in row-major order (see module docstring) ---
        best_val, best_col, exact, top, r = pick(tiles, best_val, best_col, exact, live)
        c = best_col[r]
        empty = top == _NEG_INF  # every remaining similarity is -inf
        first_live = _first_true(live)
        if drop_on_empty:
            # the reference's argmax then returns 0: the first live feature "merges with
            # itself" (i == j) and is deleted
            second = first_live
        else:
            second = _first_true(live & (idx != first_live))
        i = jnp.where(empty, first_live, jnp.minimum(r, c))
        j = jnp.where(empty, second, jnp.maximum(r, c))
        oi, oj = origin[i], origin[j]
        still = live.at[j].set(False)  # live after this step
        keep = still & (idx != i)  # entries of the merged row/column that are not -inf

        # --- merged column and row ---
        # In-place updates: XLA only updates `tiles` in place (instead of copying all O^2
        # entries every step) if it can prove every read of the old matrix happens before the
        # first write. The writes below depend on all four reads (see the diagonal entry).
        new_row = jnp.minimum(read_row(tiles, i), read_row(tiles, j))
        new_col = jnp.minimum(read_col(tiles, i), read_col(tiles, j))
        if positional:
            # reference: rows by rank among the live rows with j still present; columns by
            # rank among the live columns after j's column was deleted
            pos_rows, pos_cols = rank, rank - (idx > j).astype(jnp.int32)
        else:
            pos_rows = pos_cols = idx
        # position in [o*n, (o+1)*n) for o in (oi, oj); comparisons, not integer division
        # (this runs over O elements every step)
        lo_i, lo_j = oi * n, oj * n

        def in_blocks(pos):
            return ((pos >= lo_i) & (pos < lo_i + n)) | ((pos >= lo_j) & (pos < lo_j + n))

        blocked_rows = block & in_blocks(pos_rows)
        blocked_cols = block & in_blocks(pos_cols)
        # alpha > 0: scale once; alpha <= 0: the reference skips the scaling and blocks instead
        scale = jnp.where(block, jnp.float32(1), alpha)
        new_col = jnp.where(keep & ~blocked_rows, new_col * scale, _NEG_INF)
        new_row = jnp.where(keep & ~blocked_cols, new_row * scale, _NEG_INF)
        # the diagonal entry is -inf; computing it as min(-inf, new_row[0]) makes the column
        # write depend on the row reads (the row write depends on the column write)
        new_col = new_col.at[i].set(jnp.minimum(_NEG_INF, new_row[0]))
        tiles = lax.dynamic_update_slice(tiles, new_col.reshape(1, p, 1), col_start(i))
        tiles = lax.dynamic_update_slice(tiles, new_row.reshape(nb, 1, b), (0, i, 0))

        # --- cached row maxima (upper bounds; exact where flagged) ---
        # Column j is gone and column i changed to new_col. An exact row stays exact unless
        # its best was column j, or column i whose value dropped: then its cached value is
        # still an upper bound and it is flagged inexact (rescanned only if it reaches the
        # top, see `pick`). Column i's new value can also *rise* (alpha scaling of a negative
        # similarity), so every row compares it with its cached bound: a strictly larger value
        # is the row's exact maximum (it beats an upper bound of all other entries); an equal
        # one takes over an exact row only from a later column (first maximum wins).
        # (a row whose bound is -inf is all -inf, exactly, and stays so: min with -inf)
        lost = (best_val > _NEG_INF) & (
            (best_col == j) | ((best_col == i) & (new_col < best_val))
        )
        exact = exact & ~lost
        above = new_col > best_val
        take = above | (exact & (new_col == best_val) & (i < best_col))
        exact = exact | above
        best_val = jnp.where(take, new_col, best_val)
        best_col = jnp.where(take, i, best_col)
        val_i, col_i = _first_max(new_row)
        best_val = best_val.at[i].set(val_i).at[j].set(_NEG_INF)
        best_col = best_col.at[i].set(col_i).at[j].set(0)
        exact = exact.at[i].set(True).at[j].set(True)

        # --- bookkeeping: clusters, live set, same-model budget ---
        # (an empty step under rule="reference" has i == j: that cluster is dropped, -1)
        rep = jnp.where(rep == j, jnp.where(empty & drop_on_empty, -1, i), rep)
        # rank[k] = number of live features before k, maintained incrementally (a cumsum per
        # step is an O(O log O) scan made of many small ops on XLA:CPU)
        rank = rank - (idx > j).astype(jnp.int32)
        # Budget and kill are skipped on empty steps: everything is -inf already and stays so.
        same = (oi == oj) & ~empty
        budget = budget.at[oi].add(-same.astype(jnp.int32))
        kill = same & (budget[oi] <= 0)
        tiles, best_val, best_col, exact = kill_origin(
            tiles, best_val, best_col, exact, kill, oi, still
        )
        return tiles, best_val, best_col, exact, still, rank, rep, budget

    state = (
        tiles,
        best_val,
        best_col,
        jnp.ones(p, bool),  # exact: best_val/best_col are the row's exact (max, first argmax)
        live0,
        idx,  # rank among live features
        idx,  # rep[k]: original index of the surviving feature that k was merged into
        jnp.full((num_models,), budget0, jnp.int32),  # same-model merges left per model
    )
    _, _, _, _, live, _, rep, _ = lax.fori_loop(0, to_remove, step, state)

    cols = jnp.nonzero(live, size=n_out)[0].astype(jnp.int32)  # survivors, ascending
    rep = rep[:big_o]
    # dropped features (rep = -1) get an all-zero row
    unmerge = (rep[:, None] == cols[None, :]).astype(jnp.float32)
    if guard:
        unmerge = jnp.where(bad, jnp.float32(jnp.nan), unmerge)
    return merge_from_unmerge(unmerge), unmerge
