"""Every merge method, one module each, registered by name.

`get(name)` returns a `MergeMethod`; `names()` lists them (`names("matching")`,
`names("weight_space")` per family). Importing this package imports every module in it, so a
new method is one new file that calls `register`.
"""

import importlib
import pkgutil

from mergejax.methods.registry import FAMILIES, MergeMethod, get, names, register

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "MergeMethod", "get", "names", "register"]
