"""The registry of run kinds: `config.kind` -> `fn(config, workdir) -> rows`.

Each kind lives in its own module (`mergejax.multitask`, `mergejax.finetune`) and registers
itself here; `mergejax.experiment.run` imports them and dispatches. Keeping the registry in a
module of its own means no run module imports another.
"""

from __future__ import annotations

from collections.abc import Callable

from mergejax.registry import Registry

KINDS: Registry[Callable] = Registry("experiment kind")
