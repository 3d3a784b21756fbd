"""The package's import rules (docs/design.md §1, "Import order"), checked statically.

Imports go one way:

    cli -> demo -> {manager | persist} -> {seeds | isolation | urza | control} -> kd -> ops
        -> utils -> {stages, errors, leyline}

A package may import itself and anything to its right; packages of one rank never import each other
(the four middle packages; manager and persist); ``stages``, ``errors`` and ``leyline`` import
nothing of kasmina (leyline only its own generated modules); ``kasmina.kernels`` is imported only
by ``kasmina.ops``, lazily, and imports nothing of kasmina. ``kasmina/__init__.py`` and
``kasmina/__main__.py`` are the top: exempt from the order, but ``kasmina/__init__.py`` imports
only the standard library eagerly. No ``_private`` name or module crosses a package boundary, there
are no import cycles, and every name has one import path: its defining module (re-exports only
in a package's ``__init__.py``), and for a name of the lazy table ``_PUBLIC`` of
``kasmina/__init__.py`` one user path, ``kasmina.X``, which no subpackage ``__init__`` re-exports.
Tests and benchmarks (``tests/``, ``perf/``) take names by the same rule: from the defining
module, or from a package that binds it (``kasmina``, ``kasmina.ops``, ``kasmina.leyline``).

Every ``import`` counts wherever it is written: at module level, inside a function, under
``if TYPE_CHECKING:``; so do ``importlib.import_module("kasmina...")`` calls with a literal name
and the lazy table of ``kasmina/__init__.py``. The checker is a function over
``{module name: source text}``, so the synthetic cases of ``tests/test_layering.py`` prove that
it catches each kind of violation before the real tree is held to it.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kasmina"
KERNELS = "kernels"  # installed as kasmina.kernels (pyproject.toml package-dir)

# Rank of each top-level unit of kasmina: a unit imports only itself and units of lower rank.
LAYERS: dict[str, int] = {
    "cli": 8,
    "demo": 7,
    "manager": 6,
    "persist": 6,
    "seeds": 5,
    "isolation": 5,
    "urza": 5,
    "control": 5,
    "kd": 4,
    "ops": 3,
    "utils": 2,
    "stages": 1,
    "errors": 1,
    "leyline": 1,
}
VOCABULARY = frozenset({"stages", "errors", "leyline"})
TOP = frozenset({PACKAGE, f"{PACKAGE}.__main__"})
ORDER = (
    "cli -> demo -> {manager|persist} -> {seeds|isolation|urza|control} -> kd -> ops -> utils "
    "-> vocab"
)

# Rule identifiers (the first word of each violation's rule text).
LAYERING = "layering"
KERNELS_ONLY_OPS = "kernels"
LAZY_KERNELS = "lazy-kernels"
LAZY_TRITON = "lazy-triton"
KERNELS_NAME = "kernels-name"
IMPORT_LIGHT = "import-light"
PRIVATE_NAME = "private-name"
PRIVATE_MODULE = "private-module"
CYCLE = "cycle"
OWN_INIT = "own-init"
REEXPORT = "re-export"
TWO_PATHS = "two-paths"
PUBLIC_PATH = "public-path"
UNKNOWN_MODULE = "unknown-module"
UNKNOWN_NAME = "unknown-name"
RELATIVE = "relative"
SYNTAX = "syntax"


@dataclass(frozen=True, order=True)
class Violation:
    module: str
    target: str
    rule: str
    detail: str = ""

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.module}: imports {self.target} ({self.rule}{detail})"


@dataclass(frozen=True)
class Import:
    """One imported thing: a module (``name is None``) or a name taken from ``target``."""

    module: str  # the importing module
    target: str  # absolute dotted name of the imported module
    name: str | None  # attribute imported from ``target`` (``from target import name``)
    asname: str | None
    line: int
    eager: bool  # runs when the importer is imported: not in a function, not TYPE_CHECKING

    @property
    def internal(self) -> bool:
        return _is_internal(self.target)

    @property
    def shown(self) -> str:
        return self.target if self.name is None else f"{self.target}.{self.name}"


@dataclass
class Bindings:
    """Module-level names of one module: defined there, or imported (name -> origin)."""

    defined: set[str] = field(default_factory=set)
    imported: dict[str, str] = field(default_factory=dict)
    dynamic: bool = False  # module-level __getattr__ or a star import: names not knowable

    def binds(self, name: str) -> bool:
        return self.dynamic or name in self.defined or name in self.imported


def _is_internal(dotted: str) -> bool:
    return dotted == PACKAGE or dotted.startswith(PACKAGE + ".")


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def unit_of(module: str) -> str | None:
    """The top-level unit of a kasmina module (``kasmina.seeds.seed`` -> ``seeds``); None: top."""
    if module in TOP:
        return None
    return module.split(".")[1]


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _RawImports(ast.NodeVisitor):
    """Every import statement of a module, with where it sits (function, TYPE_CHECKING)."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.AST, bool]] = []  # (node, eager)
        self._function = 0
        self._type_checking = 0

    @property
    def _eager(self) -> bool:
        return self._function == 0 and self._type_checking == 0

    def _scoped(self, node: ast.AST) -> None:
        self._function += 1
        self.generic_visit(node)
        self._function -= 1

    visit_FunctionDef = _scoped
    visit_AsyncFunctionDef = _scoped
    visit_Lambda = _scoped

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._type_checking += 1
        for stmt in node.body:
            self.visit(stmt)
        self._type_checking -= 1
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self._eager))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self._eager))

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("kasmina.x") / __import__("kasmina.x") with a literal name.
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (
            called in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and _is_internal(node.args[0].value)
        ):
            self.found.append((node, self._eager))
        self.generic_visit(node)


def _module_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Module-level statements, descending into if/try/with/for blocks but not defs/classes."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for attr in ("body", "orelse", "finalbody"):
            yield from _module_statements(getattr(stmt, attr, []) or [])
        for handler in getattr(stmt, "handlers", []) or []:
            yield from _module_statements(handler.body)
        for case in getattr(stmt, "cases", []) or []:
            yield from _module_statements(case.body)


def _target_names(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for elt in target.elts:
            yield from _target_names(elt)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def _table_entries(tree: ast.Module) -> Iterator[tuple[str, str, int]]:
    """(name, module, line) of each entry of the lazy table ``_PUBLIC`` of ``kasmina``."""
    for stmt in tree.body:
        if not isinstance(stmt, ast.Assign | ast.AnnAssign):
            continue
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        if not any(isinstance(t, ast.Name) and t.id == "_PUBLIC" for t in targets):
            continue
        if not isinstance(stmt.value, ast.Dict):
            continue
        for key, value in zip(stmt.value.keys, stmt.value.values, strict=True):
            if (
                isinstance(key, ast.Constant)
                and isinstance(value, ast.Constant)
                and isinstance(value.value, str)
            ):
                yield str(key.value), value.value, stmt.lineno


def _literal_strings(node: ast.expr | None) -> list[str] | None:
    if isinstance(node, ast.List | ast.Tuple) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]  # type: ignore[attr-defined]
    return None


class Checker:
    """The import rules over ``{module name: source}`` (plus modules known without source).

    Modules outside kasmina (``tests.*``, ``perf.*``) are its clients: held to the rules on how
    a name is taken (two-paths, unknown module or name), not to the order or the privacy rules.
    """

    def __init__(
        self,
        sources: Mapping[str, str],
        *,
        packages: Iterable[str] | None = None,
        extra_modules: Iterable[str] = (),
    ) -> None:
        self.sources = {m: s for m, s in sources.items() if _is_internal(m)}
        self.clients = {m: s for m, s in sources.items() if not _is_internal(m)}
        self.modules = set(self.sources) | set(extra_modules)
        if packages is None:  # a module is a package when another module lives under it
            packages = {m for m in self.modules if any(o.startswith(m + ".") for o in self.modules)}
        self.packages = set(packages)
        self.modules |= self.packages
        self.violations: list[Violation] = []
        self.trees: dict[str, ast.Module] = {}
        for module, source in sorted(self.sources.items()):
            try:
                self.trees[module] = ast.parse(source, filename=module)
            except SyntaxError as exc:
                self.violations.append(Violation(module, module, SYNTAX, str(exc)))
        self.bindings = {m: self._bindings(m, t) for m, t in self.trees.items()}
        self.imports: list[Import] = []
        for module, tree in self.trees.items():
            self.imports.extend(self._imports(module, tree))
        self.public = dict(self._public_table())  # kasmina's lazy table: {name: module}
        self.client_imports: list[Import] = []
        for module, source in sorted(self.clients.items()):
            try:
                tree = ast.parse(source, filename=module)
            except SyntaxError as exc:
                self.violations.append(Violation(module, module, SYNTAX, str(exc)))
                continue
            self.client_imports.extend(self._imports(module, tree))

    # -- reading modules -----------------------------------------------------------------

    def _package_of(self, module: str) -> str:
        return module if module in self.packages else module.rpartition(".")[0]

    def _absolute(self, module: str, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module or ""
        base = self._package_of(module)
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        if not base:
            return None
        return f"{base}.{node.module}" if node.module else base

    def _bindings(self, module: str, tree: ast.Module) -> Bindings:
        b = Bindings()
        for stmt in _module_statements(tree.body):
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                b.defined.add(stmt.name)
                if stmt.name == "__getattr__":
                    b.dynamic = True
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    b.defined.update(_target_names(target))
            elif isinstance(stmt, ast.AnnAssign | ast.AugAssign):
                b.defined.update(_target_names(stmt.target))
            elif isinstance(stmt, ast.For | ast.AsyncFor):
                b.defined.update(_target_names(stmt.target))
            elif isinstance(stmt, ast.With | ast.AsyncWith):
                for item in stmt.items:
                    if item.optional_vars is not None:
                        b.defined.update(_target_names(item.optional_vars))
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    bound = alias.asname or alias.name.partition(".")[0]
                    b.imported.setdefault(bound, alias.asname and alias.name or bound)
            elif isinstance(stmt, ast.ImportFrom):
                origin = self._absolute(module, stmt) or "?"
                for alias in stmt.names:
                    if alias.name == "*":
                        b.dynamic = True
                        continue
                    b.imported.setdefault(alias.asname or alias.name, f"{origin}.{alias.name}")
        return b

    def _resolve_from(self, package: str, name: str) -> tuple[str, str | None]:
        """``from package import name``: (module, None) for a submodule, else (package, name).

        A name that ``package/__init__.py`` binds itself (other than by importing that very
        submodule) shadows the submodule, as it does at run time.
        """
        submodule = f"{package}.{name}"
        bindings = self.bindings.get(package)
        if bindings is not None and package in self.packages:
            origin = bindings.imported.get(name)
            if name in bindings.defined or (origin is not None and origin != submodule):
                return package, name
        if submodule in self.modules:
            return submodule, None
        return package, name

    def _imports(self, module: str, tree: ast.Module) -> Iterator[Import]:
        raw = _RawImports()
        raw.visit(tree)
        for node, eager in raw.found:
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(module, alias.name, None, alias.asname, line, eager)
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(module, node)
                if base is None:
                    self.violations.append(
                        Violation(module, "." * node.level, RELATIVE, "beyond the top package")
                    )
                    continue
                for alias in node.names:
                    if alias.name == "*":
                        yield Import(module, base, "*", None, line, eager)
                        continue
                    target, name = self._resolve_from(base, alias.name)
                    yield Import(module, target, name, alias.asname, line, eager)
            else:  # import_module("kasmina...") with a literal
                yield Import(module, node.args[0].value, None, None, line, eager)  # type: ignore[attr-defined]
        if module == PACKAGE:  # the lazy table: {public name: "kasmina.module"}
            for name, target, line in _table_entries(tree):
                yield Import(module, target, name, None, line, False)

    def _public_table(self) -> Iterator[tuple[str, str]]:
        tree = self.trees.get(PACKAGE)
        if tree is not None:
            for name, target, _ in _table_entries(tree):
                yield name, target

    # -- the rules -----------------------------------------------------------------------

    def check(self) -> list[Violation]:
        found = list(self.violations)
        for imp in self.imports:
            found.extend(self._check_import(imp))
        for imp in self.client_imports:
            found.extend(self._check_client_import(imp))
        found.extend(self._check_reexports())
        found.extend(self._check_public_paths())
        found.extend(self._check_cycles())
        return sorted(set(found))

    def _check_taken_name(self, imp: Import) -> Iterator[Violation]:
        """The module exists, binds the name, and defines it (a package may re-export)."""
        shown = imp.shown
        if imp.target not in self.modules:
            yield Violation(imp.module, shown, UNKNOWN_MODULE, "no such module")
            return
        bindings = self.bindings.get(imp.target)
        if imp.name in (None, "*") or bindings is None:
            return
        if not bindings.binds(imp.name):
            yield Violation(imp.module, shown, UNKNOWN_NAME, f"not defined in {imp.target}")
        elif (
            imp.name in bindings.imported
            and imp.name not in bindings.defined
            and imp.target not in self.packages
        ):
            origin = bindings.imported[imp.name]
            yield Violation(
                imp.module, shown, TWO_PATHS, f"{imp.target} imported it: import {origin}"
            )

    def _check_client_import(self, imp: Import) -> Iterator[Violation]:
        if imp.internal:
            yield from self._check_taken_name(imp)

    def _check_public_paths(self) -> Iterator[Violation]:
        """A name of kasmina's lazy table has one user path, ``kasmina.X``: no subpackage
        ``__init__`` binds it too."""
        for package in sorted(self.packages & self.bindings.keys() - {PACKAGE}):
            imported = self.bindings[package].imported
            for name in sorted(imported.keys() & self.public.keys()):
                yield Violation(
                    package, imported[name], PUBLIC_PATH, f"kasmina.{name} is its one public path"
                )

    def _check_import(self, imp: Import) -> Iterator[Violation]:
        module, shown = imp.module, imp.shown
        if not imp.internal:
            top = imp.target.partition(".")[0]
            if module == PACKAGE and imp.eager and top not in sys.stdlib_module_names:
                yield Violation(module, shown, IMPORT_LIGHT, "only the stdlib at module level")
            if top == KERNELS:
                yield Violation(module, shown, KERNELS_NAME, "installed as kasmina.kernels")
            if top == "triton" and imp.eager and unit_of(module) != KERNELS:
                yield Violation(module, shown, LAZY_TRITON, "only kasmina.kernels, or lazily")
            return
        if module == PACKAGE and imp.eager:
            yield Violation(module, shown, IMPORT_LIGHT, "only the stdlib at module level")
        yield from self._check_taken_name(imp)
        if imp.target != module and imp.target in self.packages:
            if module.startswith(imp.target + "."):
                yield Violation(module, shown, OWN_INIT, "import from the defining module")
        src, dst = unit_of(module), unit_of(imp.target)
        if src != dst:
            parts = imp.target.split(".")[1:]
            if any(_is_private(p) for p in parts):
                yield Violation(module, shown, PRIVATE_MODULE, "private module across packages")
            if imp.name is not None and _is_private(imp.name):
                yield Violation(module, shown, PRIVATE_NAME, "private name across packages")
        rule = self._layering(src, dst)
        if rule is not None:
            yield Violation(module, shown, *rule)
        if src == "ops" and dst == KERNELS and imp.eager:
            yield Violation(module, shown, LAZY_KERNELS, "import kasmina.kernels in a function")

    @staticmethod
    def _layering(src: str | None, dst: str | None) -> tuple[str, str] | None:
        if src is None or src == dst:
            return None  # the top is exempt; a package imports itself
        if dst is None:
            return LAYERING, "nothing imports the top-level kasmina namespace"
        for unit in (src, dst):
            if unit not in LAYERS and unit != KERNELS:
                return LAYERING, f"{unit} is not in the import order"
        if src == KERNELS:
            return KERNELS_ONLY_OPS, "kasmina.kernels imports nothing of kasmina"
        if dst == KERNELS:
            if src == "ops":
                return None
            return KERNELS_ONLY_OPS, "only kasmina.ops imports it"
        if src in VOCABULARY:
            return LAYERING, f"{src} imports nothing of kasmina"
        if LAYERS[src] == LAYERS[dst]:
            return LAYERING, f"{src} and {dst} never import each other"
        if LAYERS[dst] > LAYERS[src]:
            return LAYERING, f"{src} is below {dst}: {ORDER}"
        return None

    def _check_reexports(self) -> Iterator[Violation]:
        for module, tree in self.trees.items():
            if module in self.packages:
                continue  # a package __init__ may re-export
            bindings = self.bindings[module]
            exported: list[tuple[str, int]] = []
            for stmt in _module_statements(tree.body):
                names = None
                if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets
                ):
                    names = _literal_strings(stmt.value)
                elif (
                    isinstance(stmt, ast.AugAssign | ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and stmt.target.id == "__all__"
                ):
                    names = _literal_strings(stmt.value)
                exported.extend((n, stmt.lineno) for n in names or [])
            for name, _ in exported:
                if name in bindings.defined:
                    continue
                origin = bindings.imported.get(name)
                if origin is not None:
                    yield Violation(module, origin, REEXPORT, f"__all__ lists imported {name!r}")
                else:
                    yield Violation(
                        module, f"{module}.{name}", REEXPORT, f"__all__ lists undefined {name!r}"
                    )
            for stmt in _module_statements(tree.body):
                if isinstance(stmt, ast.ImportFrom):
                    for alias in stmt.names:
                        if alias.asname is not None and alias.asname == alias.name:
                            origin = f"{self._absolute(module, stmt)}.{alias.name}"
                            yield Violation(module, origin, REEXPORT, "explicit 'import x as x'")

    def _check_cycles(self) -> Iterator[Violation]:
        graph: dict[str, set[str]] = {m: set() for m in self.trees}
        for imp in self.imports:
            if imp.internal and imp.target in self.modules and imp.target != imp.module:
                graph[imp.module].add(imp.target)
                graph.setdefault(imp.target, set())
        for component in _strongly_connected(graph):
            if len(component) < 2:
                continue
            for src in sorted(component):
                for dst in sorted(graph[src] & component):
                    path = _shortest_path(graph, dst, src, component)
                    yield Violation(src, dst, CYCLE, " -> ".join([src, *path]))


def _strongly_connected(graph: Mapping[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                result.append(component)
    return result


def _shortest_path(
    graph: Mapping[str, set[str]], start: str, goal: str, within: set[str]
) -> list[str]:
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for nxt in sorted(graph[node] & within):
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    path: list[str] = []
    node: str | None = goal
    while node is not None:
        path.append(node)
        node = previous.get(node)
    return list(reversed(path))


def check_imports(
    sources: Mapping[str, str],
    *,
    packages: Iterable[str] | None = None,
    extra_modules: Iterable[str] = (),
) -> list[Violation]:
    """All violations of the import rules in ``{module name: source text}``."""
    return Checker(sources, packages=packages, extra_modules=extra_modules).check()
