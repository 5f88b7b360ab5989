"""Normalising what a checkpoint holds into a flat `{torch key: numpy array}` state_dict.

Checkpoints often wrap the weights (`{"state_dict": ..., "epoch": ...}`), carry DataParallel's
`module.` prefix, or hold bf16 tensors that numpy cannot represent; this module undoes all three
so the converter sees one canonical form. It never imports torch: tensors are recognised by
their methods.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

WRAPPER_KEYS = ("state_dict", "model", "net")  # where training scripts usually nest weights
PREFIX = "module."  # added by nn.DataParallel / DistributedDataParallel


def is_tensor(value) -> bool:
    """True for numpy arrays, jax arrays and torch tensors."""
    if isinstance(value, np.ndarray):
        return True
    return hasattr(value, "__array__") and hasattr(value, "shape")


def to_numpy(value) -> np.ndarray:
    """The tensor as a numpy array (no copy where possible); bf16 is upcast to float32 exactly."""
    if hasattr(value, "detach"):  # torch.Tensor: numpy has no bf16, so upcast on the torch side
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    value = np.asarray(value)
    if value.dtype.name == "bfloat16":
        value = value.astype(np.float32)
    return value


def _unwrap(obj):
    """The mapping of tensors inside `obj`: follows WRAPPER_KEYS while `obj` holds non-tensors."""
    while isinstance(obj, Mapping) and not all(is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def normalize(obj, source: str = "state_dict") -> dict[str, np.ndarray]:
    """`{key: array}` from a state_dict or a checkpoint dict wrapping one.

    Unwraps `state_dict` / `model` / `net`, strips leading `module.` prefixes, converts tensors to
    numpy (bf16 -> float32). Raises ValueError, naming `source`, if non-tensors remain.
    """
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    bad = sorted(str(k) for k, v in obj.items() if not is_tensor(v))
    if bad:
        raise ValueError(f"{source}: entries that are not tensors (and no {'/'.join(WRAPPER_KEYS)} "
                         f"key holding the weights): {bad}")
    out = {}
    for key, value in obj.items():
        key = str(key)
        while key.startswith(PREFIX):
            key = key[len(PREFIX):]
        if key in out:
            raise ValueError(f"{source}: key {key!r} appears with and without a {PREFIX!r} prefix")
        out[key] = to_numpy(value)
    return out
