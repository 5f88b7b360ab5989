"""Method entries of `config.merge.methods`: `name[hparam=value,...][@space][+variant]`.

`zipit@stream1+repair` is ZipIt! merging the spaces up to `stream1` (partial zipping), with
REPAIR afterwards. `mudsc[group_heads=False]+repair` is MuDSC without group matching: the
bracket holds hyperparameters of this entry only (values are Python literals), which override
`config.merge.<name>`, so one run can hold the same method with different settings (the
results row is named by the whole entry). Parsing checks names, variants and hyperparameter
values (with the checks `config.merge.<name>` gets), so a bad entry fails before any work.
"""

from __future__ import annotations

import ast
import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from mergejax import methods

VARIANTS = ("repair", "reset")
SYNTAX = "name[hparam=value,...][@space][+variant]"


class MethodEntry(NamedTuple):
    """One entry of `config.merge.methods`."""

    name: str
    variants: tuple[str, ...]
    stop_after: str | None  # partial merging: merge the spaces up to this one
    hparams: Mapping[str, Any] = MappingProxyType({})  # overrides of config.merge.<name>


def split_entry(entry: str) -> MethodEntry:
    """The parts of `entry` by syntax alone (no registry look-up).

    'mudsc[group_heads=False,alpha=0.5]@stream2+repair' ->
    MethodEntry('mudsc', ('repair',), 'stream2', {'group_heads': False, 'alpha': 0.5}).
    Raises ValueError saying what is wrong (not naming the entry: callers do).
    """
    if not isinstance(entry, str):
        raise ValueError(f"must be a string {SYNTAX}")
    hparams: dict[str, Any] = {}
    if "[" in entry:
        # the last ']' closes the bracket: spaces and variants never contain one
        open_, close = entry.index("["), entry.rfind("]")
        if close < open_:
            raise ValueError(f"unclosed '['; expected {SYNTAX}")
        hparams = _literal_kwargs(entry[open_ + 1:close])
        rest = entry[:open_] + entry[close + 1:]
        if entry[close + 1:] and entry[close + 1] not in "@+":
            raise ValueError(f"the [...] must follow the method name; expected {SYNTAX}")
    else:
        if "]" in entry:
            raise ValueError(f"']' without '['; expected {SYNTAX}")
        rest = entry
    head, *variants = rest.split("+")
    name, at, stop_after = head.partition("@")
    if not name or (at and not stop_after) or any(not v for v in variants):
        raise ValueError(f"expected {SYNTAX}, e.g. 'zipit@stream1+repair' or "
                         "'mudsc[group_heads=False]+repair'")
    return MethodEntry(name, tuple(variants), stop_after or None, hparams)


def _literal_kwargs(text: str) -> dict[str, Any]:
    """'a=1, b=(0.2, 0.3), c="x"' -> {'a': 1, 'b': (0.2, 0.3), 'c': 'x'} (Python literals)."""
    if not text.strip():
        raise ValueError("empty [...]; give hparam=value pairs or drop the brackets")
    try:
        call = ast.parse(f"_({text})", mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot parse [{text}]: expected hparam=value pairs separated by "
                         "commas, values Python literals") from None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise ValueError(f"cannot parse [{text}]: expected hparam=value pairs only")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(f"{kw.arg}={ast.unparse(kw.value)} is not a Python literal "
                             "(numbers, strings, True/False/None, tuples, lists)") from None
    return out


def hparam_problems(name: str, values: Mapping[str, Any],
                    family: str | None = None) -> dict[str, str]:
    """`{hparam: why}` for every invalid hyperparameter of method `name` in `values`.

    Unknown names (of `family`'s function when given, else of any family), values whose type
    differs from the default's (a bool for a bool, an integer for an int, a number for a
    float, a string for a str), and values failing the method's registered checks.
    """
    method = methods.get(name)
    defaults = method.defaults(family) if family else method.hparams
    out, known = {}, {}
    for k, v in values.items():
        if k not in defaults:
            out[k] = (f"unknown hyperparameter of {name!r}"
                      f"{f' ({family})' if family else ''}; valid: "
                      f"{', '.join(defaults) or 'none'}")
            continue
        want = _type_problem(defaults[k], v)
        if want:
            out[k] = want
        else:
            known[k] = v
    out.update(method.problems(known))
    return out


def _type_problem(default: Any, value: Any) -> str | None:
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "a bool"
    elif isinstance(default, int):
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        want = "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:  # None or a tuple default: the method's checks decide
        return None
    return None if ok else f"must be {want} (the default is {default!r})"


def parse_method(entry: str, family: str | None = None) -> MethodEntry:
    """'zipit@stream2+repair' -> MethodEntry('zipit', ('repair',), 'stream2', {}).

    Unknown methods, variants or hyperparameters, and invalid hyperparameter values, raise a
    ValueError naming the entry (and the valid names).
    """
    try:
        parsed = split_entry(entry)
    except ValueError as e:
        raise ValueError(f"method entry {entry!r}: {e}") from None
    for v in parsed.variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r} in {entry!r}; valid: {VARIANTS}")
    methods.get(parsed.name)  # raises listing valid names
    problems = hparam_problems(parsed.name, parsed.hparams, family)
    if problems:
        raise ValueError(f"method entry {entry!r}: " + "; ".join(
            f"{k}={parsed.hparams[k]!r}: {why}" for k, why in problems.items()))
    return parsed


def config_hparams(config, name: str, family: str) -> dict:
    """The hyperparameters of method `name`'s `family` function from `config.merge.<name>`.

    `config.merge.<name>` holds every hyperparameter of every family of the method (typed by
    its default, so each can be set from the command line); this picks `family`'s.
    """
    wanted = methods.get(name).defaults(family)
    return {k: v for k, v in dict(config.merge.get(name, {})).items() if k in wanted}


def entry_hparams(config, entry: MethodEntry, family: str) -> dict:
    """`config_hparams` of the entry's method with the entry's own `[...]` values on top."""
    return {**config_hparams(config, entry.name, family), **entry.hparams}
