"""PyTorch <-> Flax checkpoint converters. Installed as `mergejax.converters`.

    sd = load_state_dict("resnet20.pt")                      # or .safetensors (no torch needed)
    variables = from_torch(sd, "resnet20", width=4, num_classes=10)
    save_state_dict(to_torch(variables, "resnet20", width=4, num_classes=10), "out.safetensors")

`from_torch` / `to_torch` go through a per-architecture layout (`layout.py`, registered in
`architectures.py`); `architectures()` lists them. The CLI is `python -m mergejax.converters`.
"""

from mergejax.converters.convert import ConversionError, from_torch, to_torch
from mergejax.converters.files import load_state_dict, save_state_dict
from mergejax.converters.layout import names as architectures

__all__ = ["ConversionError", "architectures", "from_torch", "load_state_dict",
           "save_state_dict", "to_torch"]
