"""Shared machinery of the weight-space merges (models fine-tuned from one shared base).

Everything here works on *parameter pytrees* (nested dicts of arrays with one structure) and
processes them **leaf by leaf**: every method streams over the leaves with small jitted per-leaf
kernels, so peak memory stays at the inputs, the output (one model copy) and per-leaf
temporaries. Nothing materialises the task vectors of the whole model.

Contents
- input validation (`prepare`): identical trees and shapes, floating and finite leaves, with
  ValueErrors naming the offending leaf path; range checks (`check_range`);
- task vectors as pytrees (`task_vectors`);
- exact magnitude top-k thresholds over the whole model (`global_thresholds`, the TIES paper /
  tall_masks granularity): the radix select of `mergejax.kernels.topk` (per tensor:
  `keep_topk`), its histograms summed leaf by leaf, or block by block over tensors streamed
  from disk (`streamed_thresholds`, used by the out-of-core recipes; in one process a sampled
  bracket counted on the host gives the same bits faster); per-tensor thresholds of large
  leaves selected on the host (`tensor_thresholds`, `topk.kth_smallest_bits_np`);
- the per-leaf merge kernel shared by TA / TIES / DARE / Breadcrumbs (`merge_leaves`) with the
  TIES sign election and disjoint merge (`elect_and_merge`);
- one-bit-per-weight mask storage with `np.packbits` (`pack_masks`, `unpack_masks`), the TALL
  masks paper's compression scheme.

Top-k semantics are those of tall_masks' `topk_values_mask` (see `mergejax.kernels.topk`):
ties at the threshold are all kept; `density == 1` keeps everything.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.kernels import topk

Params = Any

# Per-leaf int32 counts (histograms, sign sums) must not overflow.
_MAX_LEAF = (1 << 31) - 1


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree: Params) -> list[str]:
    """The '/'-joined key path of every leaf of `tree`, in `jax.tree` flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(_key_name(k) for k in path) for path, _ in flat]


@dataclasses.dataclass
class Models:
    """Validated inputs, flattened: `base[i]` and `models[t][i]` are leaf i of each tree."""

    treedef: Any
    paths: list[str]
    base: list | None
    models: list[list]

    @property
    def num_models(self) -> int:
        return len(self.models)

    @property
    def num_leaves(self) -> int:
        return len(self.paths)

    def leaf(self, i: int) -> tuple[Any, tuple]:
        """(base leaf or None, tuple of the models' leaves) for leaf i."""
        return (None if self.base is None else self.base[i]), tuple(m[i] for m in self.models)

    def unflatten(self, leaves: Sequence) -> Params:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def each(self) -> list[Models]:
        """One `Models` per model (no base), to transform every task vector on its own."""
        return [Models(self.treedef, self.paths, None, [m]) for m in self.models]


_CHECK_INPUTS = contextvars.ContextVar("mergejax_check_inputs", default=True)


@contextlib.contextmanager
def inputs_checked_by_caller():
    """Within the block `prepare` skips its NaN/inf check of the inputs (one extra read of
    every leaf). For callers that check the result instead, where a non-finite input cannot
    vanish (sums and weighted sums: NaN and inf propagate, inf - inf and 0 * inf are NaN), and
    that run the check afterwards to name the input at fault (out-of-core recipes)."""
    token = _CHECK_INPUTS.set(False)
    try:
        yield
    finally:
        _CHECK_INPUTS.reset(token)


@jax.jit
def all_finite(x):
    """True (scalar bool array) iff the float array `x` (any shape, empty included) has no NaN
    or inf.

    A max-reduce of |x| (NaN propagates through max): XLA:CPU vectorises it, ~3x faster than
    `all(isfinite(x))` on a 32M-entry bf16 tensor (9 vs 26 ms), and it runs once per input leaf
    of every merge.
    """
    return jnp.max(jnp.abs(x), initial=0) < jnp.inf


def stream(fn: Callable[[int], Any], n: int, window: int = 2) -> list:
    """[fn(0), ..., fn(n-1)] with at most `window` leaf kernels in flight.

    JAX dispatches asynchronously and copies numpy inputs to device buffers at dispatch, so an
    unbounded loop over leaves can hold copies of many leaves at once (measured: +300 MB on a
    25M-parameter model). Waiting for the result `window` steps back keeps the extra memory at
    a couple of leaves while dispatch still overlaps execution.
    """
    out = []
    for i in range(n):
        out.append(fn(i))
        if i + 1 >= window:
            jax.block_until_ready(out[i + 1 - window])
    return out


def _flatten(tree: Params, what: str) -> tuple[list[str], list, Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        raise ValueError(f"{what} has no array leaves")
    paths = ["/".join(_key_name(k) for k in path) for path, _ in flat]
    return paths, [leaf for _, leaf in flat], treedef


def _compare_structure(ref_paths, ref_def, paths, treedef, ref_name, name) -> None:
    for a, b in zip(ref_paths, paths):
        if a != b:
            raise ValueError(f"{name} differs from {ref_name} at leaf {a!r}: {name} has {b!r} "
                             "there")
    if len(ref_paths) != len(paths):
        extra = (ref_paths if len(ref_paths) > len(paths) else paths)[min(len(ref_paths),
                                                                          len(paths))]
        owner = ref_name if len(ref_paths) > len(paths) else name
        raise ValueError(f"{name} differs from {ref_name} at leaf {extra!r}: only {owner} has it")
    if ref_def != treedef:
        raise ValueError(f"{name} differs from {ref_name} in container types "
                         f"({treedef} vs {ref_def})")


def prepare(base: Params | None, finetuned: Sequence[Params], *, method: str,
            num_models: int | None = None, check_finite: bool = True,
            floating_models: bool = True) -> Models:
    """Validates `base` and `finetuned` and flattens them into a `Models`.

    Args:
      base: the shared pre-trained tree, or None when `finetuned` already holds task vectors.
      finetuned: a non-empty sequence (list/tuple) of trees with the structure of `base`.
      method: name used in error messages.
      num_models: if given, the exact number of trees required.
      check_finite: reject NaN/inf entries (one extra read of every leaf).
      floating_models: also require floating dtypes in `finetuned` (off for boolean masks).

    Raises:
      ValueError naming the first differing leaf path (structure or shape), a non-floating or
      non-finite leaf, or a wrong number of models.
    """
    if not isinstance(finetuned, list | tuple):
        raise ValueError(f"{method}: `finetuned` must be a list or tuple of parameter trees, got "
                         f"{type(finetuned).__name__}")
    if len(finetuned) == 0:
        raise ValueError(f"{method}: needs at least one fine-tuned model")
    if num_models is not None and len(finetuned) != num_models:
        raise ValueError(f"{method}: needs exactly {num_models} models, got {len(finetuned)}")
    ref_name = "the base" if base is not None else "model 0"
    ref_paths, ref_leaves, ref_def = _flatten(base if base is not None else finetuned[0],
                                              ref_name)
    models = []
    for t, tree in enumerate(finetuned):
        paths, leaves, treedef = _flatten(tree, f"model {t}")
        _compare_structure(ref_paths, ref_def, paths, treedef, ref_name, f"model {t}")
        for p, a, b in zip(ref_paths, ref_leaves, leaves):
            if tuple(np.shape(a)) != tuple(np.shape(b)):
                raise ValueError(f"{method}: leaf {p!r} has shape {tuple(np.shape(b))} in model "
                                 f"{t} but {tuple(np.shape(a))} in {ref_name}")
            if floating_models and not jnp.issubdtype(jnp.result_type(b), jnp.floating):
                raise ValueError(f"{method}: leaf {p!r} of model {t} has non-floating dtype "
                                 f"{jnp.result_type(b)}; weight-space merges need float leaves")
        models.append(leaves)
    named = ([("the base", ref_leaves)] if base is not None else []) + [
        (f"model {t}", m) for t, m in enumerate(models)]
    for p, leaf in zip(ref_paths, ref_leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"{method}: leaf {p!r} has non-floating dtype "
                             f"{jnp.result_type(leaf)}; weight-space merges need float leaves")
        if np.size(leaf) > _MAX_LEAF:
            raise ValueError(f"{method}: leaf {p!r} has {np.size(leaf)} entries; at most "
                             f"{_MAX_LEAF} per leaf are supported (split it)")
    if check_finite and _CHECK_INPUTS.get():
        flags = jax.device_get([stream(lambda i, ls=leaves: all_finite(ls[i]), len(leaves))
                                for _, leaves in named])
        for (who, _), row in zip(named, flags):
            for p, ok in zip(ref_paths, row):
                if not ok:
                    raise ValueError(f"{method}: leaf {p!r} of {who} has non-finite values "
                                     "(NaN or inf)")
    return Models(ref_def, ref_paths, None if base is None else ref_leaves, models)


def check_range(name: str, value, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """Returns float(value) or raises ValueError stating the valid range of `name`."""
    lo_s = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    hi_s = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {lo_s}, {hi_s}, got {value!r}") from None
    bad = (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
           or (hi is not None and (v >= hi if hi_open else v > hi)))
    if bad:
        raise ValueError(f"{name} must be in {lo_s}, {hi_s}, got {value!r}")
    return v


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """Returns `value` if it is one of `choices`, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def per_task(name: str, value, num_models: int, lo=None, hi=None, **kw) -> np.ndarray:
    """A scalar or a length-`num_models` sequence as a float32 (T,) array, range-checked."""
    vals = np.atleast_1d(np.asarray(value, dtype=object))
    if vals.ndim != 1 or len(vals) not in (1, num_models):
        raise ValueError(f"{name} must be a scalar or one value per model ({num_models}), "
                         f"got {value!r}")
    out = [check_range(name, v, lo, hi, **kw) for v in vals]
    return np.asarray(out * num_models if len(out) == 1 else out, np.float32)


# --------------------------------------------------------------------------------------------
# Task vectors
# --------------------------------------------------------------------------------------------


def compute_dtype(dtype) -> jnp.dtype:
    """float32 unless the input is wider: task vectors of bf16/fp16 models are formed in f32."""
    return jnp.promote_types(dtype, jnp.float32)


def tau(base_leaf, model_leaf):
    """The task-vector leaf `model - base` in the compute dtype (or `model` if base is None)."""
    dt = compute_dtype(model_leaf.dtype)
    m = model_leaf.astype(dt)
    return m if base_leaf is None else m - base_leaf.astype(dt)


@jax.jit
def _sub(a, b):
    return tau(b, a)


def task_vectors(base: Params, finetuned: Sequence[Params]) -> list[Params]:
    """tau_t = theta_t - theta_0 for every model, as pytrees (float32 or wider).

    This materialises T model copies; the merge methods never call it (they form task-vector
    leaves on the fly), it is for analysis and for the task-vector-level helpers.
    """
    m = prepare(base, finetuned, method="task_vectors")
    return [m.unflatten([_sub(x, b) for x, b in zip(leaves, m.base)]) for leaves in m.models]


# --------------------------------------------------------------------------------------------
# Exact top-k thresholds on the float bit pattern
# --------------------------------------------------------------------------------------------


def density_from_k(K: float) -> float:
    """tall_masks' reading of its `K` argument as a keep fraction.

    K >= 1 is a percentage (20 -> 0.2, so K=1 means 1%), K < 1 a fraction; K = 100 keeps all.
    """
    K = float(K)
    return K / 100 if K >= 1 else K


# A "prep" turns the T task-vector leaves (list), aux and the leaf index i into the leaves a
# merge actually uses (DARE drops entries, Breadcrumbs masks outliers). Preps are frozen
# dataclasses, so they are hashable static arguments: equal configurations reuse one kernel.
Prep = Callable[..., Any] | None


def _prepped(base, models, aux, i, prep):
    xs = [tau(base, m) for m in models]
    return xs if prep is None else prep(xs, aux, i)


@partial(jax.jit, static_argnames=("prep",))
def _hist_hi(base, models, aux, i, *, prep):
    return jnp.stack([topk.high_histogram(topk.abs_bits(x))
                      for x in _prepped(base, models, aux, i, prep)])


@partial(jax.jit, static_argnames=("prep",))
def _hist_lo(base, models, aux, i, h, *, prep):
    return jnp.stack([topk.low_histogram(topk.abs_bits(x), h[t])
                      for t, x in enumerate(_prepped(base, models, aux, i, prep))])


@partial(jax.jit, static_argnames=("prep", "t"))
def _abs_bits_of(base, models, aux, i, *, prep, t):
    return topk.abs_bits(_prepped(base, models, aux, i, prep)[t])


def tensor_thresholds(base, members: Sequence, kth: int, *, prep: Prep = None, aux=None,
                      i: int = 0) -> np.ndarray:
    """(T,) int32 per-tensor trim thresholds of one leaf, selected on the host.

    Model t keeps `abs_bits(tau_t) >= thr[t]`, thr[t] = `topk.kth_smallest_bits(
    abs_bits(tau_t), kth)` bit for bit (`topk.kth_smallest_bits_np`: several times faster than
    XLA:CPU's histograms from ~1M entries on). XLA forms each model's |tau| bits (after `prep`,
    leaf index `i`, as `merge_leaves`) while numpy selects the previous model's; with the
    partition's scratch buffer (shared by the models) at most three int32 copies of the leaf
    exist at once. `kth` in [1, leaf size]; concrete inputs only.
    """
    def bits(t):  # without prep, tau_t needs only model t (no transfer of the others)
        if prep is None:
            return _abs_bits_of(base, (members[t],), aux, i, prep=None, t=0)
        return _abs_bits_of(base, tuple(members), aux, i, prep=prep, t=t)

    out = np.empty(len(members), np.int32)
    scratch = np.empty(np.shape(members[0]), np.int32)  # pages touched only if partitioned
    nxt = bits(0)
    for t in range(len(members)):
        cur, nxt = nxt, (bits(t + 1) if t + 1 < len(members) else None)
        out[t] = topk.kth_smallest_bits_np(np.asarray(cur), kth, scratch=scratch)
        del cur  # frees the device buffer before the next model's is formed
    return out


@partial(jax.jit, static_argnames=("stride",))
def _sampled_bits(base, models, *, stride):
    """(T, ceil(size / stride)) int32: abs_bits of every `stride`-th task-vector entry."""
    b = None if base is None else base.ravel()[::stride]
    return jnp.stack([topk.abs_bits(tau(b, m.ravel()[::stride])) for m in models])


def _one_ahead(items: Iterable):
    """Yields `items`, taking each next one (dispatching its kernels) before yielding the
    current one: XLA computes the next block while the host works on this one."""
    it, end = iter(items), object()
    cur = next(it, end)
    while cur is not end:
        nxt = next(it, end)
        yield cur
        cur = nxt


@jax.jit
def _bracket_classes(base, member, lo, hi):
    """int8 `topk.bracket_class` of one model's |tau| bits of a block against (lo, hi)."""
    return topk.bracket_class(topk.abs_bits(tau(base, member)), lo, hi)


def _bits_at(base, member, index: np.ndarray) -> np.ndarray:
    """int32 |tau| bits of the entries at flat `index` of a block, computed by XLA (so exactly
    as the merge kernel's trim sees them: XLA:CPU flushes subnormals, numpy does not) on the
    gathered entries, padded to a power of two so that few sizes are compiled."""
    size = max(1024, 1 << int(index.size - 1).bit_length())
    pad = np.zeros(size, np.int64)
    pad[:index.size] = index

    def gather(a):
        return None if a is None else np.asarray(a).reshape(-1)[pad]

    bits = _abs_bits_of(gather(base), (gather(member),), None, 0, prep=None, t=0)
    return np.asarray(bits)[:index.size]


def _bracketed_thresholds(blocks: Blocks, rank: np.ndarray,
                          sample: tuple[Blocks, int, int] | None = None
                          ) -> tuple[np.ndarray, bool] | None:
    """`streamed_thresholds` without histograms (no prep): the same bits and whether every
    |tau| entry of every model was seen finite (see `checked_thresholds`), or None if the
    sample misled a bracket (the caller then runs the histogram passes).

    Pass 1 takes every `topk.SAMPLE_STRIDE`-th |tau| entry of each block (XLA reads ~0.2% of
    the entries; or every stride-th of `sample`'s blocks, see `streamed_thresholds`); each
    model's sorted sample gives a bracket (`topk.bracket`). Pass 2: XLA
    classifies one model's |tau| entries of a block against its bracket (`topk.bracket_class`:
    one byte per entry) while numpy counts the previous block's classes
    (`topk.class_counts`, cache-blocked); the few entries strictly inside the bracket get their
    exact bits (`_bits_at`). The rank-th smallest is then read from the summed counts
    (`topk.bracket_pick`). Peak extra memory: two blocks' int8 classes. Against XLA's bits
    (4 bytes per entry) counted on the host, 46 against 116 ms per 32M bf16 entries (`/tmp`
    micro-benchmark); XLA:CPU's two scatter-add histogram passes cost ~10 ns per entry.
    """
    active = [t for t in range(len(rank)) if rank[t] > 0]
    source, stride, n = sample if sample is not None else (blocks, topk.SAMPLE_STRIDE, None)
    parts, seen = [], 0
    for b, ms in source():
        seen += int(np.size(ms[0]))
        parts.append(_sampled_bits(b, tuple(ms), stride=stride))
    n = seen if n is None else n
    if not parts or n == 0:
        return None
    sample = np.sort(np.concatenate(jax.device_get(parts), axis=1), axis=1)
    del parts
    brackets = {t: topk.bracket(sample[t], int(rank[t]), n) for t in active}
    counts = {t: np.zeros(3, np.int64) for t in active}
    inside: dict[int, list] = {t: [] for t in active}
    # Class 5 marks non-finite entries only above a finite hi; a model without a bracket (rank
    # 0) is not classified at all: then nothing is proven.
    finite = len(active) == len(rank) and all(brackets[t][1] < topk.INF_BITS for t in active)
    classified = ((t, b, ms[t], _bracket_classes(b, ms[t], *map(jnp.int32, brackets[t])))
                  for b, ms in blocks() for t in active)
    for t, b, m, classes in _one_ahead(classified):
        c, index, nonfinite = topk.class_counts(np.asarray(classes), *brackets[t])
        del classes
        counts[t] += c
        finite = finite and not nonfinite
        if index.size:
            inside[t].append(_bits_at(b, m, index))
    out = np.zeros(len(rank), np.int32)
    for t in active:
        ins = np.concatenate(inside[t]) if inside[t] else np.zeros(0, np.int32)
        v = topk.bracket_pick(counts[t], ins, int(rank[t]), *brackets[t])
        if v is None:
            return None
        out[t] = v
    return out, finite


def _host_sum(arrays, chunk: int = 2) -> np.ndarray:
    """int64 sum of int32 device arrays, fetched `chunk` at a time: dispatch stays
    asynchronous within a chunk while at most `chunk` histograms wait in memory."""
    total, pending = None, []
    for a in arrays:
        pending.append(a)
        if len(pending) == chunk:
            part = sum(np.asarray(x, np.int64) for x in jax.device_get(pending))
            total, pending = part if total is None else total + part, []
    if pending:
        part = sum(np.asarray(x, np.int64) for x in jax.device_get(pending))
        total = part if total is None else total + part
    return total


# A factory of (base block or None, [T model blocks]) pairs, one per leaf or per piece of one;
# called once per pass, so it may stream the blocks from disk.
Blocks = Callable[[], Iterable[tuple[Any, Sequence[Any]]]]


def streamed_thresholds(blocks: Blocks, ranks: Sequence[int], *, prep: Prep = None,
                        aux=None, reduce: Callable[[np.ndarray], np.ndarray] | None = None,
                        sample: tuple[Blocks, int, int] | None = None) -> np.ndarray:
    """(T,) int32 bit patterns: model t keeps `abs_bits(tau_t) >= thr[t]` over all blocks.

    The exact radix select of `mergejax.kernels.topk` over everything `blocks()` yields: one
    pass sums the histograms of the high magnitude bits, a second those of the low bits inside
    the bin holding the rank-th smallest |tau|. Histograms are summed on the host in int64, so
    models beyond 2^31 entries are exact; the result never depends on how the entries are split
    into blocks. Without `prep` and `reduce`, a sampled bracket and host counts give the same
    bits about twice as fast (`_bracketed_thresholds`; the histograms only if a bracket misses).

    Args:
      blocks: called once per pass (twice; four times if a sampled bracket misses); block i
        is (base, members) with tau_t =
        `tau(base, members[t])`, then `prep(taus, aux, i)` if `prep` is given (leaf index i).
      ranks: (T,) 1-based rank (ascending |tau|, `topk.topk_kth`) of each model's threshold
        among all its entries; 0 keeps everything (threshold 0).
      prep, aux: as `merge_leaves` (the task-vector leaves a merge actually uses).
      reduce: applied to each pass's (T, bins) int64 histogram before it is read, e.g. a sum
        over processes that each stream a part of the model (`kernels.processes.process_sum`;
        ranks are then global). `blocks()` may then yield nothing on some process.
      sample: for the bracket, (factory of blocks holding a typical subset of the entries,
        e.g. every 64th row of each tensor, a stride within them, the number of entries
        `blocks()` yields): the sample pass then reads only that subset (out of core: a
        fraction of the bytes) instead of calling `blocks()`. It only guides the bracket;
        the result is exact whatever it holds.
    """
    if reduce is None and prep is None:  # one process, plain task vectors: no histograms
        return checked_thresholds(blocks, ranks, sample=sample)[0]
    rank = np.asarray(ranks, np.int64)
    if not rank.any():
        return np.zeros(len(rank), np.int32)
    return _histogram_thresholds(blocks, rank, prep, aux, reduce)


def _histogram_thresholds(blocks: Blocks, rank: np.ndarray, prep: Prep, aux,
                          reduce: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """`streamed_thresholds` by the radix histograms: two passes over `blocks()`."""

    def summed(parts, bins: int) -> np.ndarray:
        hist = _host_sum(parts)
        hist = np.zeros((len(rank), bins), np.int64) if hist is None else hist
        return hist if reduce is None else reduce(hist)

    hist = summed((_hist_hi(b, tuple(ms), aux, i, prep=prep)
                   for i, (b, ms) in enumerate(blocks())), topk.HI_BINS)
    h, inside = topk.first_reaching(hist, np.maximum(rank, 1))
    hj = jnp.asarray(h, jnp.int32)
    hist = summed((_hist_lo(b, tuple(ms), aux, i, hj, prep=prep)
                   for i, (b, ms) in enumerate(blocks())), topk.LO_BINS)
    lo, _ = topk.first_reaching(hist, inside)
    return np.where(rank > 0, topk.join_bits(h, lo), 0).astype(np.int32)


def checked_thresholds(blocks: Blocks, ranks: Sequence[int], *,
                       sample: tuple[Blocks, int, int] | None = None) -> tuple[np.ndarray, bool]:
    """`streamed_thresholds` in one process on plain task vectors, and whether the passes
    proved every input finite.

    The second value is True only when the bracketed select classified every entry of every
    model (all ranks > 0, finite brackets) and none was NaN or inf: then tau_t = member_t -
    base is finite everywhere, so base and members are (a NaN or inf in either gives a
    non-finite tau), and a merge of the same blocks may skip its own input check. False proves
    nothing (e.g. a float32 tau can overflow from finite inputs): check the inputs then.
    """
    rank = np.asarray(ranks, np.int64)
    if not rank.any():
        return np.zeros(len(rank), np.int32), False
    # (a model of rank 0 is not classified: `_bracketed_thresholds` then proves nothing)
    found = _bracketed_thresholds(blocks, rank, sample)
    if found is not None:
        return found
    return _histogram_thresholds(blocks, rank, None, None, None), False


def global_thresholds(models: Models, density: float, *, prep: Prep = None,
                      aux=None) -> np.ndarray:
    """Per-model magnitude threshold over the **whole model** (all leaves), as int32 bit patterns.

    Model t keeps entries with `abs_bits(tau) >= thr[t]` (tall_masks `topk_values_mask` applied
    to the flattened model, as the TIES paper and tall_masks do): `streamed_thresholds` over
    the leaves.
    """
    d = sum(int(np.size(x)) for x in models.models[0])
    rank = np.full(models.num_models, topk.topk_kth(d, density), np.int64)
    return streamed_thresholds(lambda: (models.leaf(i) for i in range(models.num_leaves)), rank,
                               prep=prep, aux=aux)


# --------------------------------------------------------------------------------------------
# Sign election and disjoint merge (TIES)
# --------------------------------------------------------------------------------------------

DISJOINT = ("mean", "sum", "max")
ZERO_SIGN = ("majority", "positive")


def elect_and_merge(taus: Sequence, disjoint: str, zero_sign, *, signs: bool = True):
    """TIES steps 2-3 on one leaf: elect a sign per entry by mass, merge the agreeing entries.

    Elected sign = sign(sum_t tau_t); where that sum is exactly 0 it becomes `zero_sign` (a
    traced scalar: the global majority sign for tall_masks / the official code, +1 for
    mergekit). Selection follows tall_masks `disjoint_merge`: where the sign is > 0 keep
    tau > 0, otherwise keep tau < 0 (so zeros never count). "mean" divides by the number of
    agreeing non-zero entries (at least 1), "sum" does not divide, "max" takes the largest
    agreeing |tau| times the sign.

    Returns (merged, sum of sign(sum_t tau_t) as int32, whether some entry had a zero sum but a
    non-zero tau, i.e. depends on `zero_sign`). With `signs=False` the last two are constants
    (0, False) and are not computed: XLA:CPU does not fuse these whole-leaf reductions with the
    merge, so each would recompute the trim and election in a pass of its own (measured: 72
    against 31 ms on 3 x 16.7M bf16 entries).
    """
    total = taus[0]
    for x in taus[1:]:
        total = total + x
    raw = jnp.sign(total)
    sign_sum, ambiguous = jnp.int32(0), jnp.bool_(False)
    if signs:
        sign_sum = jnp.sum(raw.astype(jnp.int32))
        nonzero = taus[0] != 0
        for x in taus[1:]:
            nonzero = nonzero | (x != 0)
        ambiguous = jnp.any((raw == 0) & nonzero)
    s = jnp.where(raw == 0, jnp.asarray(zero_sign, raw.dtype), raw)
    sel = [jnp.where(s > 0, x > 0, x < 0) for x in taus]
    zero = jnp.zeros_like(total)
    if disjoint == "max":
        m = zero
        for x, k in zip(taus, sel):
            m = jnp.maximum(m, jnp.where(k, jnp.abs(x), zero))
        return m * s, sign_sum, ambiguous
    num = zero
    for x, k in zip(taus, sel):
        num = num + jnp.where(k, x, zero)
    if disjoint == "sum":
        return num, sign_sum, ambiguous
    cnt = sel[0].astype(total.dtype)
    for k in sel[1:]:
        cnt = cnt + k.astype(total.dtype)
    return num / jnp.maximum(cnt, 1), sign_sum, ambiguous


# --------------------------------------------------------------------------------------------
# The per-leaf merge kernel and its streaming driver
# --------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("prep", "trim", "combine", "add_base", "signs"))
def _merge_leaf(base, models, aux, i, thr, weights, lam, zero_sign, *, prep, trim, combine,
                add_base, signs=True):
    taus = []
    for t, x in enumerate(_prepped(base, models, aux, i, prep)):
        if trim == "global":
            x = jnp.where(topk.abs_bits(x) >= thr[t], x, jnp.zeros_like(x))
        elif trim == "tensor":  # thr[t] = this leaf's traced kth (>= 1): as topk.keep_topk
            b = topk.abs_bits(x)
            x = jnp.where(b >= topk.kth_smallest_bits(b, thr[t]), x, jnp.zeros_like(x))
        taus.append(x)
    if combine == "ta":
        merged = taus[0] * weights[0].astype(taus[0].dtype)
        for t in range(1, len(taus)):
            merged = merged + taus[t] * weights[t].astype(taus[t].dtype)
        sign_sum, ambiguous = jnp.int32(0), jnp.bool_(False)
    else:
        merged, sign_sum, ambiguous = elect_and_merge(taus, combine, zero_sign, signs=signs)
    out = lam.astype(merged.dtype) * merged
    ref = models[0] if base is None else base
    if add_base:
        out = base.astype(out.dtype) + out
    return out.astype(ref.dtype), sign_sum, ambiguous


def merge_block(base, members: Sequence, *, thresholds=None, combine: str = "sum",
                zero_sign: float = 1.0, lam: float = 1.0, weights=None,
                add_base: bool = True, signs: bool = True):
    """One leaf (or row block) of `merge_leaves` with the whole-model quantities given, for
    callers that stream a model block by block (out-of-core recipes): the same jitted kernel,
    so the result equals the in-memory merge bit for bit.

    Args:
      base: the leaf of theta_0 (or None); members: the T models' leaves.
      thresholds: (T,) int32 whole-model trim thresholds (`streamed_thresholds`), or None.
      combine: "sum" or "ties-<disjoint>", as `merge_leaves`.
      zero_sign: the elected sign where the sign sum is 0 (the whole-model majority for
        "majority": the sign of the summed `sign_sum` of every block, computed first).
      lam, weights: as `merge_leaves`; add_base: add `base` to the result.
      signs: compute the last two results (else 0 and False, and the kernel is ~2x faster:
        `elect_and_merge`).
    Returns (merged leaf in the members' dtype, sum of the raw elected signs (int32 scalar),
    whether the block has entries whose sign depends on `zero_sign`).
    """
    T = len(members)
    trim = None if thresholds is None else "global"
    thr = jnp.zeros(T, jnp.int32) if thresholds is None else jnp.asarray(thresholds, jnp.int32)
    return _merge_leaf(base, tuple(members), None, 0, thr, jnp.asarray(_weights(weights, T)),
                       jnp.float32(lam), jnp.float32(zero_sign), prep=None, trim=trim,
                       combine=_kernel_combine(combine), add_base=add_base and base is not None,
                       signs=signs)


def _weights(weights, num_models: int) -> np.ndarray:
    """(T,) float32 per-model weights of a merge: 1 each unless given."""
    if weights is None:
        return np.ones(num_models, np.float32)
    return per_task("weights", weights, num_models)


def _kernel_combine(combine: str) -> str:
    """`_merge_leaf`'s name of a `combine` ("sum" -> "ta", "ties-<disjoint>" -> disjoint)."""
    if combine.startswith("ties-"):
        return combine[len("ties-"):]
    if combine != "sum":
        raise ValueError(f"combine must be 'sum' or 'ties-<disjoint>', got {combine!r}")
    return "ta"


def merge_leaves(models: Models, *, combine: str = "sum", trim: str | None = None,
                 density: float = 1.0, zero_sign: str = "majority", lam: float = 1.0,
                 weights: Sequence[float] | None = None, prep: Prep = None, aux=None,
                 add_base: bool | None = None) -> Params:
    """Streams the merge over the leaves; returns the merged tree.

    Per leaf and model: tau = model - base (or the model itself if base is None), then
    `prep` (DARE drop, Breadcrumbs mask), then the magnitude trim (`trim`: None, "global" =
    top-`density` over the whole model, "tensor" = per leaf), then `combine`: "sum" (task
    arithmetic, sum_t weights_t tau_t) or a TIES disjoint merge ("mean" / "sum" / "max", with
    `combine` prefixed "ties-"). Output = base + lam * merged (or lam * merged without a base).

    TIES' "majority" zero-sign rule needs the sign of the sum of all elected signs over the whole
    model. It is collected during the same pass (it does not depend on the rule); the rare leaves
    with a zero-sum, non-zero entry are recomputed afterwards if the majority is not +1.
    """
    T = models.num_models
    w = _weights(weights, T)
    combine_key = _kernel_combine(combine)
    if trim == "global":
        thr = jnp.asarray(global_thresholds(models, density, prep=prep, aux=aux))
        trim_key = "global" if density < 1 else None
    elif trim == "tensor":
        # the per-leaf rank is passed traced (`leaf_thr`): one compiled kernel per leaf shape
        # serves every density (a recipe search tries a new one on every trial)
        thr, trim_key = jnp.zeros(T, jnp.int32), ("tensor" if density < 1 else None)
    else:
        thr, trim_key = jnp.zeros(T, jnp.int32), None
    add = models.base is not None if add_base is None else add_base
    lam_j, w_j = jnp.float32(lam), jnp.asarray(w)

    def leaf_thr(i):
        if trim_key != "tensor":
            return thr
        size = int(np.size(models.leaf(i)[1][0]))
        return jnp.full(T, topk.topk_kth(size, density), jnp.int32)

    host_thr: dict[int, Any] = {}  # leaf -> (T,) thresholds, kept for the zero-sign re-run

    needs_signs = combine_key != "ta" and zero_sign == "majority"

    def run(i, zs, signs=needs_signs):
        base, members = models.leaf(i)
        thr_i, key = leaf_thr(i), trim_key
        if trim_key == "tensor" and topk.use_host_select(members[0]):
            # large concrete leaf: exact thresholds on the host (same bits as the in-kernel
            # select, several times faster), then the kernel applies them as given
            if i not in host_thr:
                base, members = jax.device_put((base, tuple(members)))  # one copy for both
                kth = topk.topk_kth(int(np.size(members[0])), density)
                host_thr[i] = jnp.asarray(tensor_thresholds(base, members, kth, prep=prep,
                                                            aux=aux, i=i))
            thr_i, key = host_thr[i], "global"
        # the sign statistics only for the "majority" rule (they cost a pass of their own)
        return _merge_leaf(base, members, aux, i, thr_i, w_j, lam_j, jnp.float32(zs),
                           prep=prep, trim=key, combine=combine_key, add_base=add, signs=signs)

    results = stream(lambda i: run(i, 1.0), models.num_leaves)
    leaves = [r[0] for r in results]
    if needs_signs:
        stats = jax.device_get([(r[1], r[2]) for r in results])
        majority = int(np.sign(sum(int(s) for s, _ in stats)))
        if majority != 1:
            for i, (_, amb) in enumerate(stats):
                if amb:
                    leaves[i] = run(i, float(majority), signs=False)[0]
    return models.unflatten(leaves)


# --------------------------------------------------------------------------------------------
# PRNG keys per model
# --------------------------------------------------------------------------------------------


def _fingerprint(leaves) -> int:
    crc = 0
    for x in leaves:
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(x)).view(np.uint8).ravel(), crc)
    return crc & 0x7FFFFFFF


def model_keys(key, models: Models, key_from: str = "index"):
    """One PRNG key per model, stacked: `fold_in(key, t)` ("index") or `fold_in(key, crc32 of
    the model's bytes)` ("content", so the keys - hence the merge - do not depend on the order
    in which the models are given). A sequence of T keys is used as given."""
    if key is None:
        raise ValueError("this merge is random: pass an explicit PRNG key (jax.random.key(0))")
    if isinstance(key, list | tuple):
        if len(key) != models.num_models:
            raise ValueError(f"got {len(key)} keys for {models.num_models} models")
        return jnp.stack([jnp.asarray(k) for k in key])
    check_choice("key_from", key_from, ("index", "content"))
    if key_from == "index":
        ids = list(range(models.num_models))
    else:
        ids = [_fingerprint(m) for m in models.models]
    return jnp.stack([jax.random.fold_in(key, j) for j in ids])


# --------------------------------------------------------------------------------------------
# One-bit mask storage
# --------------------------------------------------------------------------------------------


def pack_masks(masks: Sequence[Params]) -> np.ndarray:
    """Packs T boolean mask trees into a (T, ceil(D/8)) uint8 array, one bit per weight.

    The paper's storage scheme (tall_masks saves `np.packbits` of the flattened masks): the
    leaves of each tree are concatenated in `jax.tree` flatten order, then packed.
    """
    rows = []
    for m in masks:
        flat = np.concatenate([np.asarray(x, dtype=bool).ravel() for x in jax.tree.leaves(m)])
        rows.append(np.packbits(flat))
    return np.stack(rows)


def unpack_masks(packed: np.ndarray, like: Params) -> list[Params]:
    """Inverse of `pack_masks`: boolean trees shaped like `like` (a tree of arrays/shapes)."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.size(x)) for x in leaves]
    d = sum(sizes)
    packed = np.asarray(packed, np.uint8)
    if packed.ndim != 2 or packed.shape[1] != (d + 7) // 8:
        raise ValueError(f"packed masks must have shape (T, {(d + 7) // 8}) for {d} weights, "
                         f"got {packed.shape}")
    out = []
    for row in packed:
        flat = np.unpackbits(row, count=d).astype(bool)
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        out.append(jax.tree.unflatten(treedef, [p.reshape(np.shape(x))
                                                for p, x in zip(parts, leaves)]))
    return out
