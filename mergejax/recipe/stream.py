"""Out-of-core recipe merges of PyTorch / Hugging Face checkpoints, one tensor at a time.

Weight-space merges are elementwise or per tensor, so no layout conversion is needed: for every
tensor (in the reference model's storage order) the inputs' copies are read (`hf_io.Source`),
cast to the recipe's compute dtype, merged on device by the same call as the in-memory path
(`execute.merge_group` on one-tensor trees), cast to the storage dtype and appended to the
output shard (`shards.ShardedWriter`) in the input's own names. Peak memory is about
(number of models + 2) tensors, twice over (the next tensor is read while this one merges),
plus the merge's float32 temporaries: independent of the model size.

A whole-model TIES trim (`scope: global`) first streams the task vectors to find each model's
exact threshold (`thresholds.global_thresholds`), then merges with it. DARE's mask of a tensor
comes from `fold_in(key(seed) [, document], crc32(tensor name))`: it depends on the seed and
the name only, never on the reading order or the other tensors. Tensors that are not floating
point (integer buffers) are copied from the reference model. Non-tensor files of the reference
directory (config.json, generation_config.json, tokenizer files) are copied, so
`transformers.AutoModel.from_pretrained(OUT)` loads the result. Everything is written into a
temporary sibling directory renamed into place at the end (`mergejax.io.atomic.atomic_dir`):
a killed merge leaves no partial output.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import yaml

from mergejax.io.atomic import atomic_dir, temp_tag, with_temp_tag
from mergejax.io.check import NonFiniteError
from mergejax.kernels import processes, topk
from mergejax.methods.task_vectors import all_finite, inputs_checked_by_caller
from mergejax.recipe.checkpoint_io import RECIPE_NAME
from mergejax.recipe.execute import (
    assign_tensors,
    compute_cast,
    compute_dtype,
    consensus_group,
    global_densities,
    majority_sign,
    merge_group,
    sign_total,
    storage_dtype,
    stored,
    ties_block,
    untrimmed,
)
from mergejax.recipe.hf_io import CheckpointInputError, Source
from mergejax.recipe.resolve import Group, plan
from mergejax.recipe.shards import ShardedWriter
from mergejax.recipe.validate import ModelEntry, Recipe

DEFAULT_SHARD = "5GB"


def _entries(recipes: Sequence[Recipe]) -> list[ModelEntry]:
    """Every input entry, reference first (the base of a GTA recipe, else its first member)."""
    seen, out = set(), []
    for r in recipes:
        for e in ([r.base] if r.method.kind == "gta" else []) + list(r.members):
            if e.path not in seen:
                seen.add(e.path)
                out.append(e)
    return out


def check_sources(named: Sequence[tuple[str, Source]]) -> None:
    """CheckpointInputError naming the tensor and the files where a model differs from the
    first one: a missing or extra tensor, another shape or dtype."""
    ref_name, ref = named[0]
    for who, src in named[1:]:
        for name, a in ref.infos.items():
            b = src.infos.get(name)
            if b is None:
                raise CheckpointInputError(
                    f"model {who} ({src.path}) has no tensor {name!r}, which {ref_name} has in "
                    f"{a.file}")
            if a.shape != b.shape or a.dtype != b.dtype:
                raise CheckpointInputError(
                    f"tensor {name!r} is {b.dtype.name}{list(b.shape)} in {b.file} but "
                    f"{a.dtype.name}{list(a.shape)} in {a.file} ({ref_name})")
        extra = [n for n in src.infos if n not in ref.infos]
        if extra:
            raise CheckpointInputError(
                f"model {who}: tensor {extra[0]!r} of {src.info(extra[0]).file} is not in "
                f"{ref_name} ({ref.path}){f' (+{len(extra) - 1} more)' if len(extra) > 1 else ''}")


def _is_float(dtype) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating))


def tensor_key(root, name: str):
    """DARE's key of one tensor: `fold_in(root, crc32(name))`, independent of reading order."""
    return jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, dynamic_ncols=True, leave=False)


class _Reader:
    """Reads each tensor from every source, one tensor ahead on a background thread (file
    reads release the GIL, so reading overlaps the merge)."""

    def __init__(self, sources: dict[Path, Source]):
        self.sources = sources
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mergejax-read")

    def _read(self, name: str) -> dict[Path, np.ndarray]:
        return {p: s.read(name) for p, s in self.sources.items()}

    def sweep(self, names: Sequence[str], desc: str, progress: bool
              ) -> Iterator[tuple[str, dict[Path, np.ndarray]]]:
        """(name, {path: array}) for every name, in order, with a progress bar."""
        if not names:
            return
        nbytes = {n: sum(s.info(n).nbytes for s in self.sources.values()) for n in names}
        with _bar(sum(nbytes.values()), desc, progress) as bar:
            nxt = self.pool.submit(self._read, names[0])
            for i, name in enumerate(names):
                arrays = nxt.result()
                if i + 1 < len(names):
                    nxt = self.pool.submit(self._read, names[i + 1])
                yield name, arrays
                bar.update(nbytes[name])
                bar.set_postfix_str(f"{i + 1}/{len(names)} tensors", refresh=False)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _thresholds(recipe: Recipe, groups: list[Group], names: list[str], reader: _Reader,
                progress: bool, desc: str, mine: set[str]) -> tuple[np.ndarray | None, bool]:
    """Whole-model thresholds of a `scope: global` document (None for per-tensor trims), and
    whether their passes proved the document's inputs finite (`checked_global_thresholds`).

    `names`: the document's tensors; this process streams those in `mine` and, with several
    processes, the histograms are summed over them (every process computes the same
    thresholds)."""
    dens = global_densities(recipe, groups)
    if dens is None:
        return None, False
    from mergejax.recipe.thresholds import checked_global_thresholds, global_thresholds

    sweep = [0]

    def tensors():
        sweep[0] += 1
        return _doc_blocks(recipe, [n for n in names if n in mine], reader,
                           f"{desc} threshold sweep {sweep[0]}", progress)

    def sample_rows():
        # the bracket's sample: every SAMPLE_ROW_STEP-th row of each tensor (one read each)
        def rows(entry, n):
            return _on_device(recipe, reader.sources[entry.path].read_rows(n, SAMPLE_ROW_STEP))

        for n in names:
            if n in mine:
                yield rows(recipe.base, n), [rows(m, n) for m in recipe.members]

    total = sum(int(np.prod(reader.sources[recipe.base.path].info(n).shape)) for n in names)
    if jax.process_count() > 1:  # histograms: summable over the processes' tensors
        return global_thresholds(tensors, dens, total, reduce=processes.process_sum), False
    # One process: the sampled bracket and host counts (`streamed_thresholds`), several times
    # faster than the radix histograms; its sample reads ~1/64 of the bytes, so the threshold
    # costs one full sweep, not two.
    return checked_global_thresholds(tensors, dens, total,
                                     sample=(sample_rows, SAMPLE_ROW_STRIDE))


def _majority(recipe: Recipe, names: list[str], reader: _Reader, progress: bool, desc: str,
              mine: set[str], thr) -> float:
    """Consensus with `merged: ties`: TIES' whole-model majority sign (zero-sign rule), from a
    sweep of this process's tensors summed over processes."""
    blocks = _doc_blocks(recipe, [n for n in names if n in mine], reader, f"{desc} signs",
                         progress)
    return majority_sign(processes.process_sum(sign_total(blocks, thr)))


def _doc_blocks(recipe: Recipe, names: list[str], reader: _Reader, desc: str, progress: bool
                ) -> Iterator[tuple]:
    """(base block, [member blocks]) on the device, in the compute dtype, for every row block
    of every tensor of `names`: one sweep of a whole-model pass (the blocks' results add up)."""
    for _, arrays in reader.sweep(names, desc, progress):
        base = arrays[recipe.base.path]
        members = [arrays[m.path] for m in recipe.members]
        for s in row_blocks(base.shape, compute_dtype(recipe, base.dtype).itemsize):
            yield _on_device(recipe, base[s]), [_on_device(recipe, m[s]) for m in members]


# The whole-model bracket's sample (one process): every SAMPLE_ROW_STEP-th row of each tensor,
# then every SAMPLE_ROW_STRIDE-th entry of those (prime), ~1/450 of the entries as in-memory
# (`topk.SAMPLE_STRIDE`), from ~1.6% of the bytes.
SAMPLE_ROW_STEP = 64
SAMPLE_ROW_STRIDE = 7

# Tensors above this many bytes are merged in row blocks when the method allows it, so that
# the merge's float32 temporaries stay small whatever the tensor (embeddings, lm_head).
CHUNK_BYTES = 64 << 20
# Methods that are elementwise once the magnitude trim is applied (ties: its per-tensor top-k
# threshold is found first over the blocks, `thresholds.global_thresholds` on one tensor).
BLOCKWISE = ("linear", "task_arithmetic", "ties", "consensus")


# Weighted sums: a NaN/inf input always gives a NaN/inf result (`inputs_checked_by_caller`).
SUMS = ("linear", "task_arithmetic")


def row_blocks(shape: tuple[int, ...], itemsize: int) -> list[slice]:
    """Slices of axis 0 of at most CHUNK_BYTES each (one slice for a 0-d or small tensor)."""
    if not shape or int(np.prod(shape)) * itemsize <= CHUNK_BYTES:
        return [slice(None)]
    row = max(1, int(np.prod(shape[1:])) * itemsize)
    per = max(1, CHUNK_BYTES // row)
    return [slice(i, min(i + per, shape[0])) for i in range(0, shape[0], per)]


def _on_device(recipe: Recipe, array: np.ndarray):
    """`array` on the default device, cast there to the compute dtype. `Source.read` returns
    64-byte aligned buffers, which the CPU device aliases (no copy); the method's finiteness
    check and its merge kernel then read that one buffer."""
    return compute_cast(recipe, jax.device_put(array))


def _stored_block(recipe: Recipe, name: str, merged, ref_dtype) -> np.ndarray:
    """The merged block as stored (`execute.stored`, cast on the device), on the host;
    NonFiniteError (after the storage cast: an out_dtype that overflows is caught too).

    `np.asarray` of a CPU device array is a view of its buffer, bfloat16 included (measured:
    no copy), so the host reads the merged block only once more, to write it."""
    value = jax.numpy.asarray(stored(merged, recipe, ref_dtype))
    if not bool(all_finite(value)):
        raise NonFiniteError(f"merged tensor {name!r} has NaN/inf values; nothing was "
                             "written (check the inputs, and an out_dtype that overflows)")
    return np.asarray(value)


def _merge_one(recipe: Recipe, g: Group, thr, key, name: str,
               arrays: dict[Path, np.ndarray], ref_dtype, zero_sign: float = 1.0,
               checked: bool = False) -> list[np.ndarray]:
    """The merged tensor `name` as stored, as a list of row blocks (axis 0) that concatenate
    to it. `thr`: whole-model thresholds or None; `zero_sign`: consensus-TIES' majority;
    `checked`: the whole-model threshold passes proved the inputs finite."""
    from mergejax.recipe.thresholds import checked_global_thresholds, trim_to_base

    raw_base = arrays[recipe.base.path] if recipe.method.kind == "gta" else None
    raw = [arrays[m.path] for m in recipe.members]
    itemsize = max(compute_dtype(recipe, a.dtype).itemsize for a in raw)
    blocks = row_blocks(raw[0].shape, itemsize)
    if len(blocks) > 1 and recipe.method.name not in BLOCKWISE:
        blocks = [slice(None)]

    def block(s):
        return (None if raw_base is None else _on_device(recipe, raw_base[s]),
                [_on_device(recipe, m[s]) for m in raw])

    size = int(np.prod(raw[0].shape))
    # Blocked tensors, and large one-block ones (the bracket select costs about half of
    # `merge_group`'s host select there), find their own top-k threshold first.
    if (thr is None and recipe.method.name == "ties"
            and (len(blocks) > 1 or size >= topk.HOST_SELECT_MIN)):
        dens = [float(mp["density"]) for mp in g.model_params]
        if min(dens) < 1:  # this tensor's own top-k threshold, streamed over its blocks
            # (its count pass also checks the inputs for NaN/inf: `ties_block` need not)
            thr, checked = checked_global_thresholds(lambda: (block(s) for s in blocks), dens,
                                                     size)
    consensus = recipe.method.name == "consensus"  # its masks need the untrimmed models
    if thr is not None and not consensus:
        g = untrimmed(g)
    parts = []
    for s in blocks:
        b, ms = block(s)
        if consensus:
            merged = consensus_group({name: b}, [{name: m} for m in ms], g, thr,
                                     zero_sign)[name]
            parts.append(_stored_block(recipe, name, merged, ref_dtype))
            continue
        if thr is not None:
            merged = ties_block(recipe.method, b, ms, g, thr, checked=checked)
            if merged is not None:  # trimmed inside the merge kernel
                parts.append(_stored_block(recipe, name, merged, ref_dtype))
                continue
            ms = [trim_to_base(b, m, thr[t]) for t, m in enumerate(ms)]
        args = (recipe.method, None if b is None else {name: b}, [{name: m} for m in ms], g,
                key)
        if recipe.method.name not in SUMS:
            parts.append(_stored_block(recipe, name, merge_group(*args)[name], ref_dtype))
            continue
        with inputs_checked_by_caller():  # the result's check below catches any NaN/inf
            merged = merge_group(*args)[name]
        try:
            parts.append(_stored_block(recipe, name, merged, ref_dtype))
        except NonFiniteError:
            merge_group(*args)  # with the input check: a ValueError naming the model at fault
            raise
    return parts


def run_streaming(recipes: Sequence[Recipe], tmp: Path, *, seed: int = 0,
                  max_shard_bytes: int, progress: bool = True,
                  source: str | None = None) -> dict:
    """Merges PyTorch / HF inputs out of core into the (empty) directory `tmp`; returns stats.

    Writes the sharded safetensors + index (input names, storage dtype = `out_dtype` or the
    input's), the reference model's non-tensor files and `recipe.yml`. Raises
    CheckpointInputError (missing shard, models that differ: naming file and tensor),
    RecipeError (a plan that cannot run) or NonFiniteError (a merged tensor with NaN/inf).

    Several processes (`jax.distributed`, a folder they all see): every process plans the same
    output shards and merges and writes shard i if i % process_count == its index (whole-model
    thresholds: histograms summed over processes); process 0 writes the index and the other
    files once every process has finished, and every process raises if any failed. The bytes
    written do not depend on the number of processes.
    """
    proc, nproc = jax.process_index(), jax.process_count()
    progress = progress and proc == 0
    entries = _entries(recipes)
    sources: dict[Path, Source] = {}
    reader = None
    try:
        for e in entries:
            sources[e.path] = Source(e.path)
        ref = sources[entries[0].path]
        check_sources([(e.ref, sources[e.path]) for e in entries])
        names = ref.names
        floats = [n for n in names if _is_float(ref.info(n).dtype)]
        reader = _Reader(sources)
        root = jax.random.key(seed)
        docs = []  # (document index, recipe, its parameter groups, its tensors in order)
        for j, (recipe, block) in enumerate(zip(recipes, assign_tensors(recipes, floats))):
            if block:
                in_block = set(block)
                docs.append((j, recipe, plan(recipe, block), [n for n in names if n in in_block]))
        recipe_of = {n: recipe for _, recipe, _, order in docs for n in order}
        items = []
        for n in names:
            info = ref.info(n)
            out_dt = (storage_dtype(recipe_of[n], info.dtype) if n in recipe_of
                      else info.dtype)
            items.append((n, info.shape, out_dt))
        raws = [dict(r.raw) for r in recipes]
        raw_json = json.dumps(raws[0] if len(raws) == 1 else raws, sort_keys=True, default=str)
        writer = ShardedWriter(tmp, items, max_shard_bytes,
                               {"mergejax_recipe": raw_json, "seed": str(seed)},
                               only=lambda i: i % nproc == proc)
        mine = {it[0] for _, it in writer.order}
        # tensor -> (recipe, group, thresholds, key, zero sign, inputs proved finite)
        job: dict[str, tuple] = {}
        for j, recipe, groups, order in docs:
            key = root if len(recipes) == 1 else jax.random.fold_in(root, j)
            desc = f"doc {j}" if len(recipes) > 1 else recipe.method.name
            thr, checked = _thresholds(recipe, groups, order, reader, progress, desc, mine)
            zero_sign = 1.0
            if thr is not None and recipe.method.name == "consensus":
                zero_sign = _majority(recipe, order, reader, progress, desc, mine, thr)
            for g in groups:
                job.update({n: (recipe, g, thr, key, zero_sign, checked) for n in g.names})
        error = None
        try:
            _merge_sweep([n for n in names if n in mine], job, reader, writer, sources, ref,
                         progress)
            writer.finish(index=proc == 0)
        except Exception as e:  # noqa: BLE001 (re-raised below, after the other processes)
            error = e
        finally:
            writer.close()
        ok = processes.all_processes(error is None)  # every process waits for the others
        if error is not None:
            raise error
        if not ok.all():
            raise RuntimeError(f"process(es) {np.flatnonzero(~ok).tolist()} of the merge failed "
                               "(see their errors); nothing was written")
        if proc == 0:
            for f in ref.side_files:
                shutil.copy2(f, tmp / f.name)
            (tmp / RECIPE_NAME).write_text(source or yaml.safe_dump_all(raws, sort_keys=False))
        return {"tensors": len(names), "values": sum(int(np.prod(s)) for _, s, _ in items),
                "dtypes": sorted({np.dtype(d).name for _, _, d in items}),
                "groups": sum(len(d[2]) for d in docs), "shards": len(writer.shards)}
    finally:
        if reader is not None:
            reader.close()
        for s in sources.values():
            s.close()


def _merge_sweep(names: list[str], job: dict, reader: _Reader, writer: ShardedWriter,
                 sources: dict[Path, Source], ref: Source, progress: bool) -> None:
    """Merges (or copies, outside the recipe) every tensor of `names` in order and hands it to
    `writer` on a background thread (one write in flight)."""
    with ThreadPoolExecutor(1, thread_name_prefix="mergejax-write") as wpool:
        pending = None
        for n, arrays in reader.sweep(names, "merge", progress):
            if n in job:
                recipe, g, thr, key, zero_sign, checked = job[n]
                try:
                    # only DARE draws: a fold_in per tensor costs ~10 ms of dispatches
                    if recipe.method.sparsify == "random":
                        key = tensor_key(key, n)
                    value = _merge_one(recipe, g, thr, key, n, arrays,
                                       ref.info(n).dtype, zero_sign, checked)
                except NonFiniteError:
                    raise
                except ValueError as e:  # the methods' checks, e.g. non-finite inputs
                    files = ", ".join(str(s.info(n).file) for s in sources.values())
                    raise CheckpointInputError(f"tensor {n!r} ({files}): {e}") from e
            else:
                value = arrays[ref.path]
            if pending is not None:
                pending.result()
            pending = wpool.submit(writer.write, n, value)
        if pending is not None:
            pending.result()


def merge_hf(recipes: Sequence[Recipe], out: Path, *, seed: int = 0,
             max_shard_bytes: int, progress: bool = True, source: str | None = None) -> str:
    """`run_streaming` into a temporary sibling of `out`, renamed into place when complete;
    returns a one-line summary. With several processes, process 0 creates the temporary folder
    and tells the others its name, and renames it once all have written their shards; every
    process returns after the rename."""
    if jax.process_count() == 1:
        with atomic_dir(out) as tmp:
            stats = run_streaming(recipes, tmp, seed=seed, max_shard_bytes=max_shard_bytes,
                                  progress=progress, source=source)
    elif jax.process_index() == 0:
        renamed = False
        try:
            with atomic_dir(out) as tmp:
                processes.from_process_0(temp_tag(tmp))
                stats = run_streaming(recipes, tmp, seed=seed, max_shard_bytes=max_shard_bytes,
                                      progress=progress, source=source)
            renamed = True
        finally:
            processes.all_processes(renamed)  # the others return once `out` is in place
    else:
        tmp = with_temp_tag(out, processes.from_process_0(0))
        error = None
        try:
            stats = run_streaming(recipes, tmp, seed=seed, max_shard_bytes=max_shard_bytes,
                                  progress=progress, source=source)
        except Exception as e:  # noqa: BLE001 (re-raised after process 0's last word)
            error = e
        renamed = processes.all_processes(True)[0]  # process 0 calls it in every case
        if error is not None:
            raise error
        if not renamed:
            raise RuntimeError(f"process 0 could not move the merge into {out}")
    methods = "+".join(r.method.name for r in recipes)
    k = len(recipes[0].members)
    return (f"{methods}: merged {k} model{'s' * (k != 1)} into {out} ({stats['tensors']} "
            f"tensors, {stats['values']:,} values, {','.join(stats['dtypes'])}, "
            f"{stats['shards']} shard(s), {stats['groups']} parameter group(s))")
