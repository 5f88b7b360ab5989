"""Layer rules as a test: which mergejax module may import which (README "Layers").

Every .py file under mergejax/, kernels/ (installed as mergejax.kernels) and converters/
(mergejax.converters) is parsed, never imported; every import is collected, lazy ones inside
functions included: `import x`, `from x import y` (relative ones resolved), and
`importlib.import_module("literal")` / `__import__("literal")`. Three checks:

- layers: a module imports only the layers its own layer may import (`ALLOWED`);
- private names: no module imports another module's `_private` name or a `_private` module;
- cycles: no circular import among module-level imports (imports inside functions and under
  `if TYPE_CHECKING:` do not run at import time and are exempt; a package's `__init__` importing
  its own submodules is fine).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> the package it is installed as (setup.py package_dir)
ROOTS = {"mergejax": "mergejax", "kernels": "mergejax.kernels", "converters": "mergejax.converters"}

# layer -> the layers it may import (besides modules outside mergejax). "run" may import all.
ALLOWED: dict[str, set[str]] = {
    "kernels": {"kernels"},
    "io": {"io"},
    "registry": set(),
    "models": {"registry", "models"},
    "specs": {"kernels", "models", "registry", "specs"},
    "methods": {"kernels", "specs", "models", "registry", "io", "fsmerge", "augment",
                "methods"},
    "data": {"registry", "data"},
    "converters": {"io", "models", "registry", "converters"},
    # below the run: merges recipes with the methods, reads and writes through io
    "recipe": {"kernels", "io", "registry", "models", "specs", "methods", "recipe"},
    # image augmentation for fits inside methods (FS-Merge, distillation)
    "augment": set(),
    # FS-Merge's SuperNet and fitting loop, below the methods that register them
    "fsmerge": {"kernels", "io", "registry", "models", "specs", "augment", "fsmerge"},
}
# package prefix -> layer, most specific first; any other mergejax module is the run layer
PREFIXES = [
    ("mergejax.kernels", "kernels"), ("mergejax.io", "io"), ("mergejax.registry", "registry"),
    ("mergejax.models", "models"), ("mergejax.specs", "specs"), ("mergejax.methods", "methods"),
    ("mergejax.data", "data"), ("mergejax.converters", "converters"),
    ("mergejax.recipe", "recipe"), ("mergejax.augment", "augment"),
    ("mergejax.fsmerge", "fsmerge"),
]


def layer_of(module: str) -> str | None:
    """The layer of a mergejax module ("run" for the rest of mergejax), None outside mergejax."""
    for prefix, layer in PREFIXES:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "run" if module == "mergejax" or module.startswith("mergejax.") else None


@dataclasses.dataclass(frozen=True)
class Import:
    target: str  # the most specific module imported (a module if `from pkg import mod`)
    name: str | None  # `y` of `from x import y` when y is not a module, else None
    line: int
    lazy: bool  # inside a function or `if TYPE_CHECKING:`: does not run at import time


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Absolute module of a (possibly relative) `from` import inside `module`."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts):
        raise ValueError(f"{module}: relative import beyond the top package")
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, source: str, known: Iterable[str], is_package: bool = False
               ) -> list[Import]:
    """Every import in `source` (the text of `module`), lazy ones included, in file order."""
    known = set(known)
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name, None, node.lineno, lazy))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append(Import(sub, None, node.lineno, lazy))
                else:
                    name = None if alias.name == "*" else alias.name
                    found.append(Import(base, name, node.lineno, lazy))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0].value
            if fname in ("import_module", "__import__") and isinstance(arg, str):
                if not arg.startswith("."):
                    found.append(Import(arg, None, node.lineno, lazy))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(ast.parse(source, filename=module), False)
    return found


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


# --------------------------------------------------------------------------------------------
# The three checks, on {module: [Import]}
# --------------------------------------------------------------------------------------------


def layer_violations(graph: Mapping[str, list[Import]]) -> list[str]:
    out = []
    for module, imports in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None or layer == "run":
            continue
        for imp in imports:
            target_layer = layer_of(imp.target)
            if target_layer is not None and target_layer not in ALLOWED[layer] | {layer}:
                how = "lazily " if imp.lazy else ""
                out.append(f"{module}:{imp.line} ({layer}) {how}imports {imp.target} "
                           f"({target_layer}); {layer} may import only "
                           f"{', '.join(sorted(ALLOWED[layer] | {layer}))}")
    return out


def private_violations(graph: Mapping[str, list[Import]]) -> list[str]:
    out = []
    for module, imports in sorted(graph.items()):
        for imp in imports:
            if layer_of(imp.target) is None or imp.target == module:
                continue
            private_module = any(_is_private(p) for p in imp.target.split("."))
            if private_module and not _is_parent(module, imp.target):
                out.append(f"{module}:{imp.line} imports the private module {imp.target}")
            elif imp.name is not None and _is_private(imp.name):
                out.append(f"{module}:{imp.line} imports the private name {imp.name} from "
                           f"{imp.target}")
    return out


def _is_parent(module: str, target: str) -> bool:
    """True if `module` is the package `__init__` directly above `target`."""
    return target.rpartition(".")[0] == module


def cycles(graph: Mapping[str, list[Import]], packages: Iterable[str] = ()) -> list[list[str]]:
    """Strongly connected components (size > 1, or a self-import) of the module-level import
    graph among the modules of `graph`; a package's edges to its own submodules are dropped."""
    packages = set(packages)
    edges = {m: sorted({i.target for i in imps if not i.lazy and i.target in graph
                        and not (m in packages and i.target.startswith(m + "."))})
             for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan, iterative over the edges of one node
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return sorted(found)


# --------------------------------------------------------------------------------------------
# The real tree
# --------------------------------------------------------------------------------------------


def _tree_modules() -> dict[str, tuple[Path, bool]]:
    """{module name: (file, is_package)} for every .py file of the three roots."""
    out = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("").parts
            is_package = rel[-1] == "__init__"
            parts = rel[:-1] if is_package else rel
            out[".".join((package, *parts))] = (path, is_package)
    return out


@pytest.fixture(scope="module")
def tree():
    """(import graph of the tree, its package names)."""
    modules = _tree_modules()
    graph = {name: imports_of(name, path.read_text(), modules, is_package)
             for name, (path, is_package) in modules.items()}
    return graph, {name for name, (_, is_package) in modules.items() if is_package}


def test_the_tree_is_found(tree):
    graph, packages = tree
    assert {"mergejax.kernels.zip_match", "mergejax.converters.files", "mergejax.io.atomic",
            "mergejax.methods.ties", "mergejax.recipe.execute"} <= set(graph)
    assert {"mergejax", "mergejax.kernels", "mergejax.converters", "mergejax.io"} <= packages
    assert all(layer_of(m) is not None for m in graph)


def test_layer_rules(tree):
    bad = layer_violations(tree[0])
    assert not bad, "layer violations (README, Layers):\n" + "\n".join(bad)


def test_no_private_imports(tree):
    bad = private_violations(tree[0])
    assert not bad, "imports of another module's private names:\n" + "\n".join(bad)


def test_no_import_cycles(tree):
    found = cycles(*tree)
    assert not found, "circular imports (module level):\n" + "\n".join(
        " <-> ".join(c) for c in found)


# --------------------------------------------------------------------------------------------
# The checker itself, on synthetic sources: it can fail
# --------------------------------------------------------------------------------------------

KNOWN = {"mergejax", "mergejax.experiment", "mergejax.io", "mergejax.io.checkpoint",
         "mergejax.kernels", "mergejax.kernels.a", "mergejax.kernels.b", "mergejax.methods",
         "mergejax.methods.ties", "mergejax.methods.tv"}


def _graph(sources: Mapping[str, str], packages=()) -> dict[str, list[Import]]:
    return {m: imports_of(m, s, KNOWN | set(sources), m in packages) for m, s in sources.items()}


def test_checker_finds_every_kind_of_import():
    source = (
        "import numpy as np\n"
        "from . import b\n"
        "from .. import experiment\n"
        "from mergejax.io import checkpoint as ck\n"
        "from mergejax.methods import get\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('mergejax.methods.ties')\n"
        "    from mergejax import statistics\n"
        "if TYPE_CHECKING:\n"
        "    from mergejax import models\n"
    )
    got = [(i.target, i.name, i.line, i.lazy) for i in
           imports_of("mergejax.kernels.a", source, KNOWN)]
    assert got == [
        ("numpy", None, 1, False), ("mergejax.kernels.b", None, 2, False),
        ("mergejax.experiment", None, 3, False), ("mergejax.io.checkpoint", None, 4, False),
        ("mergejax.methods", "get", 5, False), ("importlib", None, 7, True),
        ("mergejax.methods.ties", None, 8, True), ("mergejax", "statistics", 9, True),
        ("mergejax", "models", 11, True),
    ]
    # in a package __init__, `from . import x` is relative to the package itself
    (imp,) = imports_of("mergejax.kernels", "from . import a\n", KNOWN, is_package=True)
    assert imp.target == "mergejax.kernels.a"


def test_checker_reports_layer_violations_lazy_ones_too():
    graph = _graph({
        "mergejax.kernels.a": "from . import b\ndef f():\n    from mergejax import experiment\n",
        "mergejax.kernels.b": "import importlib\nimportlib.import_module('mergejax.io.checkpoint')",
        "mergejax.io.checkpoint": "import orbax\n",
        "mergejax.experiment": "from mergejax.kernels import a\nfrom mergejax.io import checkpoint",
    })
    bad = layer_violations(graph)
    assert len(bad) == 2
    assert bad[0].startswith("mergejax.kernels.a:3 (kernels) lazily imports mergejax.experiment "
                             "(run); kernels may import only kernels")
    assert bad[1].startswith("mergejax.kernels.b:2 (kernels) imports mergejax.io.checkpoint (io)")


def test_checker_reports_private_imports():
    graph = _graph({
        "mergejax.methods.ties": "from mergejax.methods import _tv as tv\n"
                                 "from mergejax.methods.tv import _check, check\n",
        "mergejax.methods": "from mergejax.methods import _tv\n",  # its own private submodule
        "mergejax.methods._tv": "",
        "mergejax.methods.tv": "def _check(): pass\n_x = _check()\n",
    }, packages={"mergejax.methods"})
    assert private_violations(graph) == [
        "mergejax.methods.ties:1 imports the private module mergejax.methods._tv",
        "mergejax.methods.ties:2 imports the private name _check from mergejax.methods.tv",
    ]


def test_checker_reports_cycles_but_not_package_init_or_lazy_imports():
    graph = _graph({
        "mergejax.experiment": "from mergejax import finetune\n",
        "mergejax.finetune": "import mergejax.experiment\n",
        "mergejax.methods": "from mergejax.methods import ties\n",
        "mergejax.methods.ties": "from mergejax.methods import tv\n",
        "mergejax.methods.tv": "import mergejax.methods\ndef f():\n    from . import ties\n",
    }, packages={"mergejax.methods"})
    assert cycles(graph, {"mergejax.methods"}) == [["mergejax.experiment", "mergejax.finetune"]]
