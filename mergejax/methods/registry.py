"""The merge-method registry: `get(name)`, `names()`, `register(...)`.

A method belongs to one or more *families*, each with its own call signature, because the two
halves of the field start from different inputs:

- ``"weight_space"`` (models fine-tuned from one base)::

      fn(base: Params, finetuned: Sequence[Params], *, key: jax.Array, **hparams)
          -> Params | list[Params]

  `Params` is a nested dict of arrays (the backbone: task heads are removed by the caller).
  A single tree is the merged model used by every task; a list holds one tree per task (TALL
  masks reconstruct a model per task).

- ``"matching"`` (models from different initialisations)::

      fn(problem: MatchingProblem, **hparams) -> dict[str, tuple[merge, unmerge]]

  returning one `(merge (n_out, N*n), unmerge (N*n, n_out))` pair per feature space, which
  `mergejax.specs.apply_merge` applies to the endpoints.

`hparams` holds the defaults; `search` maps a hyperparameter to the grid searched on the
validation split (never on test); `per_task_search` says the choice is made per task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mergejax.registry import Registry

FAMILIES = ("weight_space", "matching")


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: one function per family it supports, plus its defaults."""

    name: str
    fns: Mapping[str, Callable[..., Any]]
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    search: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    per_task_search: bool = False
    doc: str = ""

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.fns)

    def fn(self, family: str) -> Callable[..., Any]:
        """The function for `family`, or a ValueError saying which families this method has."""
        if family not in self.fns:
            raise ValueError(
                f"method {self.name!r} does not support {family!r} merges; it supports "
                f"{', '.join(self.fns)}. Methods for {family!r}: {', '.join(names(family))}"
            )
        return self.fns[family]


_METHODS: Registry[MergeMethod] = Registry("merge method")


def register(
    name: str,
    family: str,
    *,
    hparams: Mapping[str, Any] | None = None,
    search: Mapping[str, tuple] | None = None,
    per_task_search: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `fn` as method `name` for `family`.

    Registering a second family under an existing name adds it to the same method (so `average`
    serves both families); hparams/search are merged.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        if name in _METHODS:
            old = _METHODS._items[name]
            if family in old.fns:
                raise ValueError(f"method {name!r} already has a {family!r} function")
            _METHODS._items[name] = dataclasses.replace(
                old,
                fns={**old.fns, family: fn},
                hparams={**old.hparams, **(hparams or {})},
                search={**old.search, **(search or {})},
            )
        else:
            _METHODS.register(
                name,
                MergeMethod(name, {family: fn}, dict(hparams or {}), dict(search or {}),
                            per_task_search, doc),
            )
        return fn

    return decorator


def get(name: str) -> MergeMethod:
    """The method registered as `name` (KeyError listing valid names otherwise)."""
    return _METHODS.get(name)


def names(family: str | None = None) -> list[str]:
    """Registered method names, optionally only those supporting `family`."""
    return [n for n in _METHODS.names() if family is None or family in _METHODS.get(n).fns]
