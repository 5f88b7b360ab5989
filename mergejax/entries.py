"""Method entries of `config.merge.methods`: `name[@space][+variant]`.

`zipit@stream1+repair` is ZipIt! merging the spaces up to `stream1` (partial zipping), with
REPAIR afterwards. Parsing checks names and variants, so a bad entry fails before any work.
"""

from __future__ import annotations

from typing import NamedTuple

from mergejax import methods

VARIANTS = ("repair", "reset")


class MethodEntry(NamedTuple):
    """One entry of `config.merge.methods`."""

    name: str
    variants: tuple[str, ...]
    stop_after: str | None  # partial zipping: merge the spaces up to this one


def parse_method(entry: str) -> MethodEntry:
    """'zipit@stream2+repair' -> MethodEntry('zipit', ('repair',), 'stream2').

    Unknown methods or variants raise with the valid names.
    """
    head, *variants = entry.split("+")
    name, _, stop_after = head.partition("@")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r} in {entry!r}; valid: {VARIANTS}")
    methods.get(name)  # raises listing valid names
    return MethodEntry(name, tuple(variants), stop_after or None)


def config_hparams(config, name: str, family: str) -> dict:
    """The hyperparameters of method `name`'s `family` function from `config.merge.<name>`.

    `config.merge.<name>` holds every hyperparameter of every family of the method (typed by
    its default, so each can be set from the command line); this picks `family`'s.
    """
    wanted = methods.get(name).defaults(family)
    return {k: v for k, v in dict(config.merge.get(name, {})).items() if k in wanted}
