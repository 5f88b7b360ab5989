"""Sharded .safetensors output written tensor by tensor, with `model.safetensors.index.json`.

Every output tensor's name, shape and dtype is known before the merge starts (they are the
inputs'), so the shards are planned up front (`plan_shards`: tensors packed in processing order
up to `max_shard_bytes`) and each shard's header is written before its data; a merged tensor is
then appended as soon as it is computed and dropped. No shard is ever held in memory.

Files: `model-0000i-of-0000N.safetensors` (metadata format "pt", what `transformers` expects)
and `model.safetensors.index.json` = {"metadata": {"total_size": bytes, ...}, "weight_map":
{name: shard file}}, the layout `save_pretrained` writes and `from_pretrained` reads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from mergejax.io.safetensors_io import st_code
from mergejax.recipe.hf_io import SAFETENSORS_INDEX

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
Item = tuple[str, tuple[int, ...], np.dtype]  # (name, shape, dtype)


def parse_size(text: str | int) -> int:
    """Bytes of a size such as 5GB, 500MB, 20KB, 2GiB or 1000000 (transformers' units:
    KB/MB/GB powers of 10, KiB/MiB/GiB powers of 2). ValueError if unreadable or <= 0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"size {text!r}: expected a positive number with an optional unit "
                         f"({', '.join(u for u in _UNITS if u)})")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def plan_shards(items: Sequence[Item], max_shard_bytes: int) -> list[list[Item]]:
    """Consecutive runs of `items` of at most `max_shard_bytes` each (a larger tensor gets a
    shard of its own), in order. At least one shard."""
    shards: list[list[Item]] = [[]]
    size = 0
    for it in items:
        n = _nbytes(it[1], it[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += n
    return shards


def shard_name(i: int, n: int) -> str:
    """`model-0000i-of-0000N.safetensors` (1-based i), transformers' shard names."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header(items: Sequence[Item], metadata: Mapping[str, str]) -> bytes:
    head: dict = {"__metadata__": dict(metadata)}
    off = 0
    for name, shape, dtype in items:
        n = _nbytes(shape, dtype)
        head[name] = {"dtype": st_code(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Writes the planned tensors, in plan order, into shards under `folder`.

    `write(name, array)` must be called once per tensor in the order of `items`, with the
    planned shape and dtype (ValueError otherwise); `finish()` writes the index and returns
    the files written. Metadata is stored in every shard (strings) and in the index.

    `only`: which shard indices this writer writes (a predicate; default all), for several
    processes sharing one output folder: the shard plan depends on `items` and the size limit
    alone, so every process plans the same shards and writes its own; `finish(index=False)`
    on all but one of them.
    """

    def __init__(self, folder: str | os.PathLike, items: Sequence[Item], max_shard_bytes: int,
                 metadata: Mapping[str, str] | None = None,
                 only: Callable[[int], bool] | None = None):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self.shards = plan_shards(items, max_shard_bytes)
        n = len(self.shards)
        mine = {i for i in range(n) if only is None or only(i)}
        self.order = [(i, it) for i, shard in enumerate(self.shards) if i in mine for it in shard]
        self.weight_map = {it[0]: shard_name(i, n) for i, shard in enumerate(self.shards)
                           for it in shard}
        self.written = sorted(mine)
        self._next = 0
        self._file = None
        self._shard = -1

    def write(self, name: str, array: np.ndarray | Sequence[np.ndarray]) -> None:
        """Appends the next tensor (its bytes, C order), given whole or as a list of row blocks
        (consecutive slices of axis 0, e.g. merged block by block) that concatenate to it."""
        if self._next >= len(self.order):
            raise ValueError(f"tensor {name!r} written after the last planned tensor")
        i, (want, shape, dtype) = self.order[self._next]
        parts = [array] if isinstance(array, np.ndarray) else list(array)
        rows = sum(p.shape[0] if p.ndim else 1 for p in parts)
        got_shape = tuple(parts[0].shape) if len(parts) == 1 else (rows, *parts[0].shape[1:])
        if (name != want or got_shape != tuple(shape) or any(p.dtype != dtype for p in parts)
                or any(p.shape[1:] != parts[0].shape[1:] for p in parts)):
            raise ValueError(f"expected tensor {want!r} {np.dtype(dtype).name}{list(shape)} "
                             f"next, got {name!r} {parts[0].dtype}{list(got_shape)}")
        if i != self._shard:
            self._open(i)
        for p in parts:
            self._file.write(np.ascontiguousarray(p).reshape(-1).view(np.uint8))
        self._next += 1

    def _open(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = i
        self._file = open(self.folder / shard_name(i, len(self.shards)), "wb")  # noqa: SIM115
        self._file.write(_header(self.shards[i], self.metadata))

    def finish(self, index: bool = True) -> list[Path]:
        """Closes the last shard and (if `index`) writes the index; returns the files written
        (this writer's shards, then the index)."""
        if self._next != len(self.order):
            raise ValueError(f"{len(self.order) - self._next} planned tensor(s) not written "
                             f"(next: {self.order[self._next][1][0]!r})")
        if self._file is not None:
            self._file.close()
            self._file = None
        n = len(self.shards)
        files = [self.folder / shard_name(i, n) for i in self.written]
        if index:
            total = sum(_nbytes(s, d) for shard in self.shards for _, s, d in shard)
            out = {"metadata": {"total_size": total, **self.metadata},
                   "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(out, indent=2) + "\n")
            files.append(self.folder / SAFETENSORS_INDEX)
        return files

    def close(self) -> None:
        """Closes an open shard (after a failure)."""
        if self._file is not None:
            self._file.close()
            self._file = None
