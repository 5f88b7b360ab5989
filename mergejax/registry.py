"""A tiny name -> object registry, shared by models, datasets, methods and specs.

Registries by name (rather than if/else chains) let a config pick an implementation with a
string, and let an unknown name fail with the list of valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind (`kind` names it in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Adds `item` under `name`; registering a name twice is an error."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def replace(self, name: str, item: T) -> T:
        """Replaces the object registered as `name` (which must exist)."""
        self.get(name)
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """`@registry.decorator("name")` registers the decorated object."""
        return lambda item: self.register(name, item)

    def get(self, name: str) -> T:
        """Returns the object registered as `name`, or raises KeyError listing the valid names."""
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
