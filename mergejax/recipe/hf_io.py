"""PyTorch / Hugging Face checkpoints read one tensor at a time, in their own naming.

An input of this kind is a `.safetensors` file, a `.bin` / `.pt` / `.pth` state dict (torch,
`weights_only=True`, imported lazily), or a directory holding either a sharded checkpoint with
an index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`), a single
`model.safetensors` / `pytorch_model.bin`, or some `*.safetensors` files. Tensors keep their
names (`model.layers.0.mlp.up_proj.weight`) and dtypes (bf16 as `ml_dtypes.bfloat16`).

Safetensors files are read with their header and `readinto` at the tensor's offset, never
memory-mapped (`mergejax.io.safetensors_io.tensor_infos` / `read_tensor`): a tensor costs its
own bytes and nothing stays resident after it is dropped (mapped pages would count in the RSS
of the merge). `input_kind` tells these inputs from mergejax's own (orbax directories, recipe
outputs, flat-layout `.safetensors`: format `flax` or '/'-joined names), which the in-memory
recipe path reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mergejax.io import checkpoint
from mergejax.io.safetensors_io import (
    SafetensorsFormatError,
    TensorInfo,
    np_dtype,
    read_header,
    read_tensor,
    read_tensor_rows,
    tensor_infos,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


class CheckpointInputError(ValueError):
    """An input checkpoint that cannot be read as asked: missing shard, corrupt header, keys or
    shapes that differ between models. The message names the file and the tensor."""


def _is_flax_layout(path: Path) -> bool:
    """A .safetensors file of mergejax's flat layout: format "flax", or '/'-joined key paths
    ('params/dense_0/kernel'; torch names are '.'-joined). An unreadable file counts as one
    (the in-memory reader then reports it)."""
    try:
        header = read_header(path)[0]
    except SafetensorsFormatError:
        return True
    keys = [k for k in header if k != "__metadata__"]
    meta = header.get("__metadata__") or {}
    return meta.get("format") == "flax" or any("/" in k for k in keys)


def input_kind(path: str | os.PathLike) -> str | None:
    """"mergejax" (orbax checkpoint, recipe output, flat Flax .safetensors), "hf" (PyTorch /
    Hugging Face naming, see the module docstring) or None (not a readable input)."""
    path = Path(path)
    if path.is_dir():
        flat = path / "model.safetensors"  # a recipe output holds flat Flax variables
        if checkpoint.exists(path) or (flat.is_file() and _is_flax_layout(flat)):
            return "mergejax"
        if (path / SAFETENSORS_INDEX).is_file() or (path / BIN_INDEX).is_file():
            return "hf"
        if any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
            return "hf"
        return None
    if path.suffix == ".safetensors" and path.is_file():
        return "mergejax" if _is_flax_layout(path) else "hf"
    if path.suffix in TORCH_SUFFIXES and path.is_file():
        return "hf"
    return None


def _torch_load(path: Path) -> dict:
    import torch  # only for .bin/.pt inputs

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of a foreign or damaged file
        raise CheckpointInputError(f"{path}: cannot load as a torch state dict "
                                   f"({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and set(sd) == {"state_dict"}:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointInputError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointInputError(f"{path}: entry {k!r} is a {type(v).__name__}, not a "
                                       "tensor (a full training checkpoint? pass its state_dict)")
    return sd


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a numpy array of the same dtype (bf16 through its bits)."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.numpy()


def _torch_dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


class Source:
    """One input checkpoint: tensor names in storage order, `info(name)`, `read(name)`.

    Keeps at most one torch file loaded (the current one) and one open handle per
    .safetensors file. `side_files` are the directory's non-weight files (config.json,
    tokenizer files, ...), copied to the output from the reference model.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos: dict[str, TensorInfo] = {}
        self.side_files: list[Path] = []
        self._handles: dict[Path, object] = {}
        self._torch: tuple[Path, dict] | None = None
        self._index_map: dict[str, str] | None = None
        for f in self._weight_files():
            for name, info in self._file_infos(f).items():
                if name in self.infos:
                    raise CheckpointInputError(f"{self.path}: tensor {name!r} is in both "
                                               f"{self.infos[name].file.name} and {f.name}")
                self.infos[name] = info
        if not self.infos:
            raise CheckpointInputError(f"{self.path}: holds no tensors")

    def _weight_files(self) -> list[Path]:
        p = self.path
        if not p.is_dir():
            if not p.is_file():
                raise CheckpointInputError(f"{p} does not exist")
            return [p]
        for index in (SAFETENSORS_INDEX, BIN_INDEX):
            if (p / index).is_file():
                return self._indexed(p / index)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (p / single).is_file():
                files = [p / single]
                break
        else:
            files = sorted(f for f in p.iterdir() if f.suffix == ".safetensors") or sorted(
                f for f in p.iterdir() if f.suffix in TORCH_SUFFIXES)
        self.side_files = self._sides(files)
        return files

    def _indexed(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointInputError(f"{index}: not a checkpoint index with a weight_map "
                                       f"({type(e).__name__}: {e})") from e
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        for fname, names in files.items():
            if not (index.parent / fname).is_file():
                raise CheckpointInputError(
                    f"{index}: shard {fname} is missing (it holds {names[0]!r}"
                    f"{f' and {len(names) - 1} other tensor(s)' if len(names) > 1 else ''})")
        self._index_map = weight_map
        out = [index.parent / f for f in files]
        self.side_files = self._sides(out + [index])
        return out

    def _sides(self, weights: list[Path]) -> list[Path]:
        skip = {f.name for f in weights} | {SAFETENSORS_INDEX, BIN_INDEX}
        return sorted(f for f in self.path.iterdir()
                      if f.is_file() and not f.name.startswith(".") and f.name not in skip
                      and f.suffix not in WEIGHT_SUFFIXES)

    def _file_infos(self, f: Path) -> dict[str, TensorInfo]:
        if f.suffix == ".safetensors":
            try:
                infos = tensor_infos(f)
            except SafetensorsFormatError as e:
                raise CheckpointInputError(str(e)) from e
        else:
            sd = _torch_load(f)
            infos = {k: TensorInfo(f, np_dtype(_torch_dtype_name(v)), tuple(v.shape))
                     for k, v in sd.items()}
            self._torch = (f, sd)
        index = self._index_map
        if index is not None:
            for name in infos:
                if index.get(name, f.name) != f.name:
                    raise CheckpointInputError(f"{f}: holds {name!r}, which the index puts in "
                                               f"{index[name]}")
            expected = [n for n, fname in index.items() if fname == f.name]
            missing = [n for n in expected if n not in infos]
            if missing:
                raise CheckpointInputError(f"{f}: has no tensor {missing[0]!r}, which the index "
                                           "puts in it (shard truncated or replaced?)")
        return infos

    @property
    def names(self) -> list[str]:
        """Tensor names in storage order (file, then offset)."""
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        """Where `name` lives (KeyError naming the checkpoint if absent)."""
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointInputError(f"{self.path} has no tensor {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a fresh numpy array of its stored dtype and shape."""
        info = self.info(name)
        if info.offset < 0:
            if self._torch is None or self._torch[0] != info.file:
                self._torch = None  # drop the previous file before loading the next
                self._torch = (info.file, _torch_load(info.file))
            return np.array(torch_to_numpy(self._torch[1][name]), copy=True)
        try:
            return read_tensor(self._handle(info), info, name)
        except SafetensorsFormatError as e:
            raise CheckpointInputError(str(e)) from e

    def read_rows(self, name: str, step: int) -> np.ndarray:
        """Rows 0, step, 2 step, ... of tensor `name` (axis 0; 0-d and 1-d tensors whole),
        reading ~1/step of its bytes from a safetensors file (a torch file is loaded whole)."""
        info = self.info(name)
        if info.offset < 0:
            full = self.read(name)
            return full if full.ndim < 2 else np.ascontiguousarray(full[::step])
        try:
            return read_tensor_rows(self._handle(info), info, name, step)
        except SafetensorsFormatError as e:
            raise CheckpointInputError(str(e)) from e

    def _handle(self, info: TensorInfo):
        """The open binary file of `info.file` (opened once, kept until `close`)."""
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb")  # noqa: SIM115 (kept open)
        return f

    def close(self) -> None:
        """Closes the open files and drops a loaded torch state dict."""
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._torch = None
