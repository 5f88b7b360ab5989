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

      fn(spec: MergeSpec, endpoints: Sequence[Variables], statistics: {space: Moments}, *,
         key: jax.Array, spaces: Sequence[str], **hparams) -> {space: (merge, unmerge)}

  returning one `(merge (n_out, N*n), unmerge (N*n, n_out))` pair per space in `spaces`, which
  `mergejax.specs.apply_merge` applies to the endpoints. A matching method is pure: it never
  runs a model. `statistics` holds, for every space in `spaces` with a tap, the moments of the
  N models' concatenated features there (`mergejax.statistics.collect`), collected by the
  caller when the method `needs` activations (an empty dict otherwise).

- ``"learned"`` (merges fitted on a few images per task: FS-Merge, RegMean, distillation)::

      fn(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
         task_images: Sequence[np.ndarray], *, key: jax.Array, **hparams) -> LearnedMerge

  `task_images[i]` (n_i, H, W, C) are task i's training images (the caller applies the image
  budget); the method runs the endpoints itself and returns the merged `model` with one tree
  per endpoint (shared trunk, endpoint i's head) and the fit's `history`
  (`mergejax.methods.learned`). `needs` does not apply: it is for matching methods.

Hyperparameter defaults live in one place, the function's signature: every keyword-only
argument with a default other than `key` and `spaces` is a hyperparameter (`MergeMethod.hparams`).
`search` maps a hyperparameter to the grid a finetune run searches on the validation split (it
is not a hyperparameter itself); `per_task_search` says the choice is made per task.
`checks` maps a hyperparameter to its valid values, checked before any run starts
(`MergeMethod.problems`): a tuple of choices, or an interval string such as `"(0, 1]"`,
`"[0, inf)"`, `"finite"`, with an `"int "` prefix for integers (`"int [1, inf)"`); an interval
applies to every element of a list / tuple value (per-task values). Every float, anywhere in
the hyperparameters, must be finite.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

from mergejax.registry import Registry

FAMILIES = ("weight_space", "matching", "learned")
# What a matching method reads: feature statistics at the taps, the endpoints' weights, both,
# or nothing but the spec (identity averaging).
NEEDS = ("activations", "weights", "both", "none")
# Arguments every function of a family receives from the caller: not hyperparameters.
_CALLER_ARGS = ("key", "spaces")
_INTERVAL = re.compile(r"^(int )?(?:(finite)|([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)"
                       r"\s*([\])]))$")


@dataclasses.dataclass(frozen=True)
class Check:
    """The valid values of one hyperparameter: `choices`, or a (typed) interval."""

    spec: str | tuple
    choices: tuple | None = None
    integer: bool = False
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = True
    hi_open: bool = True

    @classmethod
    def parse(cls, spec: str | tuple | list) -> Check:
        """A Check from a tuple of choices or an interval string (see the module docstring)."""
        if isinstance(spec, tuple | list):
            return cls(tuple(spec), choices=tuple(spec))
        m = _INTERVAL.match(str(spec).strip())
        if not m:
            raise ValueError(f"bad check {spec!r}: expected a tuple of choices or an interval "
                             "like '(0, 1]', '[0, inf)', 'finite', 'int [1, inf)'")
        integer, finite, left, lo, hi, right = m.groups()
        if finite:
            return cls(spec, integer=bool(integer))
        return cls(spec, integer=bool(integer), lo=float(lo), hi=float(hi), lo_open=left == "(",
                   hi_open=right == ")")

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        kind = "an integer" if self.integer else "a finite number"
        if math.isinf(self.lo) and math.isinf(self.hi):
            return kind if self.integer else "finite"
        if math.isinf(self.hi):
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        if math.isinf(self.lo):
            return f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        return (f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")

    def problem(self, value: Any) -> str | None:
        """None if `value` is valid, else what it must be (`"must be in (0, 1]"`)."""
        if self.choices is not None:
            try:
                ok = value in self.choices
            except TypeError:
                ok = False
            return None if ok else f"must be {self.describe()}"
        values = list(value) if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                return f"must be {self.describe()}"
            v = float(v)
            bad = (not math.isfinite(v) or (self.integer and not v.is_integer())
                   or (v <= self.lo if self.lo_open else v < self.lo)
                   or (v >= self.hi if self.hi_open else v > self.hi))
            if bad:
                return f"must be {self.describe()}"
        return None


def nonfinite_fields(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(field, value) of every NaN or infinite float anywhere in `tree` (dicts, lists,
    tuples), fields spelled `a.b[2]`."""
    out = []
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out += nonfinite_fields(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            out += nonfinite_fields(v, f"{prefix}[{i}]")
    elif (isinstance(tree, numbers.Real) and not isinstance(tree, bool | numbers.Integral)
          and not math.isfinite(float(tree))):
        out.append((prefix, tree))
    return out


def nonfinite(value: Any) -> bool:
    """True if `value` is, or contains (lists, tuples, dicts), a NaN or infinite number."""
    return bool(nonfinite_fields(value))


def signature_hparams(fn: Callable[..., Any]) -> dict[str, Any]:
    """The keyword-only arguments of `fn` with defaults (except `key`, `spaces`): its hparams."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
            and p.name not in _CALLER_ARGS}


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: one function per family it supports.

    Attributes:
      name: registry name.
      fns: `{family: fn}`.
      search: `{hparam: grid}` searched on the validation split by finetune runs.
      per_task_search: the search picks a candidate per task (methods returning one tree a task).
      needs: for the matching family, what the method reads (`NEEDS`), or a function of the
        hyperparameters returning it (MuDSC at fix_rate 1 reads no activations).
      doc: first line of the docstring.
      checks: `{hparam: Check}`, the valid values checked by `problems`.
    """

    name: str
    fns: Mapping[str, Callable[..., Any]]
    search: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    per_task_search: bool = False
    needs: str | Callable[[Mapping[str, Any]], str] = "activations"
    doc: str = ""
    checks: Mapping[str, Check] = dataclasses.field(default_factory=dict)

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.fns)

    @property
    def hparams(self) -> dict[str, Any]:
        """Default hyperparameters, from the signatures of every family's function."""
        out: dict[str, Any] = {}
        for fn in self.fns.values():
            out.update(signature_hparams(fn))
        return out

    def defaults(self, family: str) -> dict[str, Any]:
        """Default hyperparameters of `family`'s function."""
        return signature_hparams(self.fn(family))

    def fn(self, family: str) -> Callable[..., Any]:
        """The function for `family`, or a ValueError saying which families this method has."""
        if family not in self.fns:
            raise ValueError(
                f"method {self.name!r} does not support {family!r} merges; it supports "
                f"{', '.join(self.fns)}. Methods for {family!r}: {', '.join(names(family))}"
            )
        return self.fns[family]

    def check_hparams(self, family: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults of `family` updated with `hparams`; unknown names raise with the valid ones."""
        defaults = self.defaults(family)
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            hints = {"a": "alpha", "b": "beta"}  # ZipIt!'s own argument names
            hint = "".join(f"; {u!r} is ZipIt!'s name for {hints[u]!r}" for u in unknown
                           if u in hints and hints[u] in defaults)
            raise TypeError(f"method {self.name!r} ({family}) has no hyperparameter "
                            f"{', '.join(map(repr, unknown))}; valid: "
                            f"{', '.join(defaults) or 'none'}{hint}")
        return {**defaults, **hparams}

    def problems(self, hparams: Mapping[str, Any]) -> dict[str, str]:
        """`{hparam: what it must be}` for every invalid value in `hparams` (empty if valid):
        non-finite numbers anywhere, then each hyperparameter's registered check."""
        out, defaults = {}, self.hparams
        for name, value in hparams.items():
            if value is None and name in defaults and defaults[name] is None:
                continue  # None is the default (e.g. equal weights)
            if nonfinite(value):
                out[name] = "must be finite"
            elif name in self.checks:
                problem = self.checks[name].problem(value)
                if problem:
                    out[name] = problem
        return out

    def reads(self, hparams: Mapping[str, Any]) -> str:
        """What the matching function reads for these hyperparameters (one of `NEEDS`)."""
        needs = self.needs(hparams) if callable(self.needs) else self.needs
        if needs not in NEEDS:
            raise ValueError(f"method {self.name!r} declares needs={needs!r}; valid: {NEEDS}")
        return needs

    def needs_activations(self, hparams: Mapping[str, Any]) -> bool:
        """True when the caller must collect feature statistics before calling the method."""
        return self.reads(hparams) in ("activations", "both")


_METHODS: Registry[MergeMethod] = Registry("merge method")


def register(
    name: str,
    family: str,
    *,
    search: Mapping[str, tuple] | None = None,
    per_task_search: bool = False,
    needs: str | Callable[[Mapping[str, Any]], str] | None = None,
    checks: Mapping[str, str | tuple] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `fn` as method `name` for `family`.

    Registering a second family under an existing name adds it to the same method (so `average`
    serves both families); search grids and checks are merged. `needs` is given for the
    matching family. `checks` maps hyperparameters to their valid values (module docstring).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")
    if needs is not None and not callable(needs) and needs not in NEEDS:
        raise ValueError(f"unknown needs {needs!r}; valid: {NEEDS}")

    parsed = {k: Check.parse(v) for k, v in (checks or {}).items()}

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        unknown = sorted(set(parsed) - set(signature_hparams(fn)))
        if unknown:
            raise ValueError(f"method {name!r}: checks for {unknown}, which are not "
                             f"hyperparameters of {fn.__name__}")
        if name in _METHODS:
            old = _METHODS.get(name)
            if family in old.fns:
                raise ValueError(f"method {name!r} already has a {family!r} function")
            _METHODS.replace(name, dataclasses.replace(
                old, fns={**old.fns, family: fn}, search={**old.search, **(search or {})},
                needs=needs if needs is not None else old.needs,
                checks={**old.checks, **parsed}))
        else:
            _METHODS.register(name, MergeMethod(
                name, {family: fn}, dict(search or {}), per_task_search,
                needs if needs is not None else "activations", doc, parsed))
        return fn

    return decorator


def get(name: str) -> MergeMethod:
    """The method registered as `name` (KeyError listing valid names otherwise)."""
    return _METHODS.get(name)


def names(family: str | None = None) -> list[str]:
    """Registered method names, optionally only those supporting `family`."""
    return [n for n in _METHODS.names() if family is None or family in _METHODS.get(n).fns]
