"""The package's import structure: every module of `come` imports on its own, first, in a
fresh interpreter; the intra-package import graph is a DAG of at most MAX_LEVELS levels; and
every import goes down the layers (LAYERS: the folders, from the ground up).

Both read src/come from the file system (no `come` import is needed to find the modules),
so a new module or subpackage (come.methods.*) is covered the day it is added.

Fresh imports: one interpreter preloads the third-party packages `come`'s modules import at
module level (torch, transformers, ...: seconds, paid once) and no `come` module, then forks
one child per module, in parallel; each child imports its module first. The order of
imports inside `come` is exactly as in a fresh `python -c "import come.X"`; only the
third-party packages are warm. One process importing every module in turn would not do:
a module that works only once another `come` module is loaded would pass there.

The graph: edges are `import` / `from ... import` statements with `ast`, anywhere in a module
(inside functions too: a lazy import that closes a cycle is a cycle hidden from the
import-time check, not a cycle removed); only those under `if TYPE_CHECKING:` are left out,
since they never run.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "come"


# ---- discovery and parsing -----------------------------------------------------------------------


def discover(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """{module name: (file, is_package)} for `package` and everything under it, found with
    pkgutil on the file system (walk_packages would import every subpackage to find it)."""
    root = src / package
    found = {package: (root / "__init__.py", True)}

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = f"{prefix}.{info.name}"
            if info.ispkg:
                found[name] = (path / info.name / "__init__.py", True)
                walk(path / info.name, name)
            else:
                found[name] = (path / f"{info.name}.py", False)

    walk(root, package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@dataclass(frozen=True)
class Import:
    module: str  # absolute name of the module (or package) named by the statement
    names: tuple[str, ...]  # the `from` names; () for `import x`
    line: int
    module_level: bool  # runs when the module is imported (not inside a function)


def imports(path: Path, module: str, is_pkg: bool) -> list[Import]:
    """Every import statement of one module, relative ones resolved, `if TYPE_CHECKING:` left out."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if is_pkg else module.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, module_level)
            return
        if isinstance(node, ast.Import):
            out.extend(Import(a.name, (), node.lineno, module_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append(Import(target, tuple(a.name for a in node.names), node.lineno, module_level))
        inside = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, True)
    return out


# ---- the import graph ----------------------------------------------------------------------------


def import_graph(modules: dict[str, tuple[Path, bool]], package: str) -> dict[str, dict[str, str]]:
    """{importer: {imported: 'file:line' of the first statement}} within `package`.

    `from P import n` depends on P.n when that is a module, else on P (n is defined in P's
    __init__); it also depends on P, and `import a.b` on a.b and on a, when that package is
    not one of the importer's own packages (which are always loaded before the importer)."""
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    src = modules[package][0].parent.parent
    for importer, (path, is_pkg) in modules.items():
        parts = importer.split(".")
        own = {".".join(parts[:k]) for k in range(1, len(parts) + (1 if is_pkg else 0))}
        for imp in imports(path, importer, is_pkg):
            if imp.module != package and not imp.module.startswith(package + "."):
                continue
            targets = {f"{imp.module}.{n}" if f"{imp.module}.{n}" in modules else imp.module for n in imp.names}
            mod_parts = imp.module.split(".")
            targets |= {".".join(mod_parts[:k]) for k in range(1, len(mod_parts) + 1)} - own
            where = f"{path.relative_to(src).as_posix()}:{imp.line}" + ("" if imp.module_level else " (in a function)")
            for t in sorted(targets):
                while t not in modules and "." in t:  # `import come.x.Name`-like: the nearest module
                    t = t.rpartition(".")[0]
                if t in modules and t != importer:
                    graph[importer].setdefault(t, where)
    return graph


def _components(graph: dict[str, dict[str, str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(v: str) -> None:  # the graphs are small: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set(stack[stack.index(v):])
            del stack[stack.index(v):]
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def _shortest_cycle(graph: dict[str, dict[str, str]], start: str, members: set[str]) -> list[str]:
    """[start, ..., start]: breadth first inside `members`, which holds a cycle through start."""
    parent: dict[str, str | None] = {start: None}
    frontier = [start]
    while True:
        last = next((v for v in frontier if start in graph[v]), None)
        if last is not None:
            path = [last]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return [*reversed(path), start]
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """For every module on a cycle, the shortest cycle through it, each cycle once:
    [a, b, ..., a], starting at its first module in alphabetical order."""
    cycles: dict[frozenset, list[str]] = {}
    for comp in _components(graph):
        for start in sorted(comp):
            cycle = _shortest_cycle(graph, start, comp)
            cycles.setdefault(frozenset(zip(cycle, cycle[1:])), cycle)
    return sorted(cycles.values())


def describe(cycles: list[list[str]], graph: dict[str, dict[str, str]]) -> str:
    """The cycles, then the statements making their edges, those on the most cycles first
    (breaking one of these breaks every cycle that passes through it)."""
    edges: dict[tuple[str, str], int] = {}
    for cycle in cycles:
        for edge in zip(cycle, cycle[1:]):
            edges[edge] = edges.get(edge, 0) + 1
    ranked = sorted(edges, key=lambda e: (-edges[e], e))
    return "\n".join([f"import cycles inside the package ({len(cycles)}):", *("  " + " -> ".join(c) for c in cycles),
                      "their edges (on how many of the cycles), most first:",
                      *(f"  {a} -> {b}  at {graph[a][b]}  [{edges[a, b]}/{len(cycles)}]" for a, b in ranked)])


# ---- fresh imports -------------------------------------------------------------------------------

_FRESH = textwrap.dedent('''
    import importlib, json, os, sys, tempfile, traceback
    modules, preload, package, jobs = json.loads(sys.argv[1])
    for name, attrs in preload:  # third-party, warm once; failures surface in the children
        try:
            mod = importlib.import_module(name)
            for attr in attrs:
                getattr(mod, attr, None)  # transformers' lazy attributes load on access
        except Exception:
            pass
    loaded = [m for m in sys.modules if m == package or m.startswith(package + ".")]
    assert not loaded, f"preloading imported {loaded}"
    out_dir, results, running = tempfile.mkdtemp(), {}, {}

    def reap():
        pid, status = os.wait()
        name, path = running.pop(pid)
        ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        results[name] = None if ok else (open(path).read() if os.path.getsize(path) else f"status {status}")

    for i, name in enumerate(modules):
        while len(running) >= jobs:
            reap()
        path = os.path.join(out_dir, str(i))
        open(path, "w").close()
        pid = os.fork()
        if pid == 0:  # the child: its first `come` import is this module
            code = 0
            try:
                importlib.import_module(name)
            except BaseException:
                with open(path, "w") as f:
                    f.write(traceback.format_exc())
                code = 1
            os._exit(code)
        running[pid] = (name, path)
    while running:
        reap()
    print(json.dumps(results))
''')


def preloads(modules: dict[str, tuple[Path, bool]], package: str) -> list[tuple[str, list[str]]]:
    """The third-party imports `package`'s modules make when imported (module level only)."""
    seen: dict[str, list[str]] = {}
    for name, (path, is_pkg) in modules.items():
        for imp in imports(path, name, is_pkg):
            if imp.module_level and imp.module.split(".")[0] != package and imp.module != "__future__":
                seen.setdefault(imp.module, [])
                seen[imp.module] += [n for n in imp.names if n not in seen[imp.module] and n != "*"]
    return sorted(seen.items())


def fresh_imports(modules: dict[str, tuple[Path, bool]], package: str, src: Path) -> dict[str, str | None]:
    """{module: None, or the traceback of importing it first in a fresh interpreter}."""
    jobs = max(2, os.cpu_count() or 2)
    arg = json.dumps([sorted(modules), preloads(modules, package), package, jobs])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _FRESH, arg], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the tests -----------------------------------------------------------------------------------

MODULES = discover(SRC, PACKAGE)


def test_discovery_sees_every_file():
    files = {p.resolve() for p in (SRC / PACKAGE).rglob("*.py")}
    assert {p.resolve() for p, _ in MODULES.values()} == files
    assert "come.engine.pipeline" in MODULES and "come.models.adapters" in MODULES


@pytest.fixture(scope="module")
def fresh() -> dict[str, str | None]:
    return fresh_imports(MODULES, PACKAGE, SRC)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_first_in_a_fresh_interpreter(fresh, module):
    assert fresh[module] is None, f"`import {module}` as the first come import fails:\n{fresh[module]}"


def test_import_graph_is_a_dag():
    graph = import_graph(MODULES, PACKAGE)
    cycles = find_cycles(graph)
    assert not cycles, describe(cycles, graph) + "\n(an import inside a function still closes a cycle)"


# ---- the checks themselves can fail ----------------------------------------------------------------


# ---- levels and layers ---------------------------------------------------------------------------

MAX_LEVELS = 10  # a module's level: 1 + the highest level among the modules it imports
# The layers from the ground up, each a folder of the package (or top-level modules); a module
# imports only from its own layer or one below. "" is the package itself, the public API face.
LAYERS = (("errors", "_version"), ("settings",), ("models",), ("merging",), ("scoring",), ("engine",), ("methods",),
          ("recovery", "evaluation"), ("service",), ("cli",), ("",))


def levels(graph: dict[str, dict[str, str]]) -> dict[str, int]:
    """{module: level} of an acyclic import graph: 1 for a module that imports none of the package."""
    found: dict[str, int] = {}

    def level(m: str) -> int:
        if m not in found:
            found[m] = 1 + max((level(d) for d in graph[m]), default=0)
        return found[m]

    for m in graph:
        level(m)
    return found


def deepest_chain(graph: dict[str, dict[str, str]]) -> list[str]:
    """The longest import chain, from the highest module down to the ground."""
    level = levels(graph)
    chain = [max(sorted(graph), key=level.get)]
    while graph[chain[-1]]:
        chain.append(max(sorted(graph[chain[-1]]), key=level.get))
    return chain


def layer_of(module: str, package: str, layers: tuple[tuple[str, ...], ...]) -> int | None:
    """The index in `layers` of the folder (or top-level module) that holds `module`; None: in none."""
    part = module[len(package) + 1:].split(".")[0] if module != package else ""
    return next((i for i, names in enumerate(layers) if part in names), None)


def upward_imports(graph: dict[str, dict[str, str]], package: str, layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """Every import of a module from a higher layer (or of/by a module in no layer), as 'a -> b at file:line'."""
    bad = []
    for a in sorted(graph):
        for b, where in sorted(graph[a].items()):
            la, lb = layer_of(a, package, layers), layer_of(b, package, layers)
            if la is None or lb is None or lb > la:
                bad.append(f"{a} (layer {la}) -> {b} (layer {lb})  at {where}")
    return bad


def test_import_graph_has_at_most_ten_levels():
    graph = import_graph(MODULES, PACKAGE)
    assert not find_cycles(graph)
    chain = deepest_chain(graph)
    assert len(chain) <= MAX_LEVELS, f"{len(chain)} levels: " + " -> ".join(chain)


def test_imports_go_down_the_layers():
    """No module imports one of a higher layer (an import inside a function counts; one under
    `if TYPE_CHECKING:`, for a type hint only, never runs and does not), and every module sits
    in a declared layer."""
    assert not upward_imports(import_graph(MODULES, PACKAGE), PACKAGE, LAYERS)


def test_package_faces_are_empty():
    """A subpackage's __init__.py holds a docstring only (come.methods: the registry's filling),
    so importing a folder adds no level and no hidden edge; the API face is the package's own."""
    faces = {m: imports(path, m, True) for m, (path, is_pkg) in MODULES.items()
             if is_pkg and m not in (PACKAGE, f"{PACKAGE}.methods")}
    assert faces and not {m: i for m, i in faces.items() if i}


def _write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_graph_finds_cycles_through_functions_and_subpackages(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "from . import b\n\ndef f():\n    from .sub import c\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\nimport pkg.errors\n",
        "pkg/errors.py": "",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import f\nfrom .. import errors\n",
    })
    modules = discover(tmp_path, "pkg")
    assert sorted(modules) == ["pkg", "pkg.a", "pkg.b", "pkg.errors", "pkg.sub", "pkg.sub.c"]
    graph = import_graph(modules, "pkg")
    assert graph["pkg.b"] == {"pkg.errors": "pkg/b.py:4"}  # the TYPE_CHECKING import is no edge
    assert graph["pkg.a"]["pkg.sub.c"] == "pkg/a.py:4 (in a function)" and "pkg.sub" in graph["pkg.a"]
    assert set(graph["pkg.sub.c"]) == {"pkg.a", "pkg.errors"}  # `from .. import errors`: the module, not pkg
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.c", "pkg.a"]]
    assert describe(find_cycles(graph), graph).splitlines()[1:] == [
        "  pkg.a -> pkg.sub.c -> pkg.a", "their edges (on how many of the cycles), most first:",
        "  pkg.a -> pkg.sub.c  at pkg/a.py:4 (in a function)  [1/1]", "  pkg.sub.c -> pkg.a  at pkg/sub/c.py:1  [1/1]"]
    del graph["pkg.a"]["pkg.sub.c"]
    assert find_cycles(graph) == []


def test_fresh_imports_catch_an_import_order_bug(tmp_path):
    """pkg.a fails when imported first (b needs a's g before a defines it) but imports fine
    once pkg.b is loaded: importing every module in turn in one process would miss it."""
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n\ndef g():\n    pass\n",
        "pkg/b.py": "from .a import g\n",
        "pkg/ok.py": "import json\n",
    })
    results = fresh_imports(discover(tmp_path, "pkg"), "pkg", tmp_path)
    assert sorted(results) == ["pkg", "pkg.a", "pkg.b", "pkg.ok"]
    assert "cannot import name 'g'" in results["pkg.a"]
    assert results["pkg"] is results["pkg.b"] is results["pkg.ok"] is None


def test_public_functions_keep_their_names_after_their_submodules_load():
    """`come.distill` / `come.evaluate` are public functions whose modules share their names
    (recovery/distill.py, evaluation/evaluate.py): importing the modules first leaves
    `from come import distill` the function."""
    code = ("import come.recovery.distill, come.evaluation.evaluate, come.engine.compression\n"
            "from come import compress, distill, evaluate\n"
            "assert all(callable(f) and not isinstance(f, type(come)) for f in (compress, distill, evaluate))\n"
            "from come.recovery.distill import check_pair\n"
            "import come\n")
    run = subprocess.run([sys.executable, "-c", "import come\n" + code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_level_and_layer_checks_see_a_deep_chain_and_an_upward_import(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/errors.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "from ..errors import x\n",
        "pkg/low/b.py": "from typing import TYPE_CHECKING\nfrom .a import y\nif TYPE_CHECKING:\n    from ..high.c import T\n",
        "pkg/high/__init__.py": "",
        "pkg/high/c.py": "from ..low.b import z\n\ndef f():\n    from ..low import a\n",
        "pkg/stray.py": "",
    })
    graph = import_graph(discover(tmp_path, "pkg"), "pkg")
    assert levels(graph)["pkg.high.c"] == 4 and deepest_chain(graph) == ["pkg.high.c", "pkg.low.b", "pkg.low.a",
                                                                          "pkg.errors"]
    layers = (("errors",), ("low",), ("high",), ("",))
    assert upward_imports(graph, "pkg", layers) == []  # the TYPE_CHECKING import up is no edge
    graph["pkg.low.a"]["pkg.high.c"] = "pkg/low/a.py:9"
    assert upward_imports(graph, "pkg", layers) == [
        "pkg.low.a (layer 1) -> pkg.high.c (layer 2)  at pkg/low/a.py:9"]
    del graph["pkg.low.a"]["pkg.high.c"]
    graph["pkg.stray"]["pkg.errors"] = "pkg/stray.py:1"  # a module in no declared layer
    assert upward_imports(graph, "pkg", layers) == ["pkg.stray (layer None) -> pkg.errors (layer 0)  at pkg/stray.py:1"]


# ---- the settings floor ----------------------------------------------------------------------------

SETTINGS = tuple(m for m in MODULES if m.startswith("come.settings"))  # the options objects, their parsing and
# checks, the registry they look methods up in, the Plan
HEAVY = ("torch", "transformers", "numpy")


def _reachable(graph: dict[str, dict[str, str]], roots: tuple[str, ...]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_settings_floor_imports_no_torch_nor_the_engine():
    """Every module the settings import (in functions too) imports no torch, transformers or
    numpy at its top, so no engine module is among them; the method modules, where the
    registry's names and checks come from, import none either (their engine loads in the
    functions that run it)."""
    graph = import_graph(MODULES, PACKAGE)
    below = _reachable(graph, SETTINGS)
    assert not below & {"come.methods", "come.engine.pipeline", "come.engine.runner", "come.engine.compression"}, \
        sorted(below)
    checked = below | {m for m in MODULES if m == "come.methods" or m.startswith("come.methods.")}
    heavy = {m: sorted({i.module for i in imports(MODULES[m][0], m, MODULES[m][1])
                        if i.module_level and i.module.split(".")[0] in HEAVY}) for m in sorted(checked)}
    assert not {m: h for m, h in heavy.items() if h}


def test_settings_load_without_torch():
    """Importing the settings, the registry and every method (what `come compress --help` and
    `CompressConfig(...).resolved()` need) loads no torch, in a fresh interpreter."""
    code = ("import sys; import come.settings.config, come.settings.distill_config, come.settings.specs, come.methods; "
            "from come import CompressConfig; CompressConfig(device='cpu', method='shortgpt').resolved(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_no_untyped_settings():
    """The engine names its settings' type: no `cfg: object` anywhere in the package."""
    untyped = [f"{p.relative_to(SRC)}:{n}" for p, _ in MODULES.values()
               for n, line in enumerate(p.read_text().splitlines(), 1) if "cfg: object" in line]
    assert not untyped


# ---- the loops and the methods ---------------------------------------------------------------------

LOOPS = ("come.engine.pipeline", "come.engine.dropping", "come.engine.compression")  # the loops, and where a run starts
# CoMe's own concepts (its split rules and search, unit sensitivities, its pair scorers): the
# progressive loop names none of them, in any identifier, attribute, argument or import
COME_CONCEPTS = ("split", "keeps_units", "sensitiv", "taylor", "head_score", "unit_gradients", "choose_units",
                 "choose_window_units", "built_scores", "errorscores", "posteriorscores", "granularity", "joint")


def _all_imports(path: Path) -> set[str]:
    """Every module a file's import statements name, `if TYPE_CHECKING:` included, relative
    ones as written (`..pipeline` -> 'pipeline')."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found |= {node.module or ""} | ({a.name for a in node.names} if not node.module else set())
    return found


def test_method_base_starts_no_loop():
    """methods/base.py imports no loop, not even under TYPE_CHECKING or through another module:
    the engine (come.engine.compression) runs a method in its loop, which calls the method back."""
    base = MODULES["come.methods.base"][0]
    named = {m.rpartition(".")[2] for m in _all_imports(base)}
    assert not named & {m.rpartition(".")[2] for m in LOOPS}, sorted(named)
    assert not _reachable(import_graph(MODULES, PACKAGE), ("come.methods.base",)) & set(LOOPS)


def _names(tree: ast.AST) -> set[str]:
    """Every identifier a module's code uses or defines, and every module it imports."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
        elif isinstance(node, ast.alias):
            out |= {node.name, node.asname or node.name}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def come_concepts(source: str) -> list[str]:
    """The identifiers of `source` that name one of CoMe's concepts."""
    return sorted(n for n in _names(ast.parse(source)) if any(c in n.lower() for c in COME_CONCEPTS))


def test_the_loop_does_not_know_come():
    assert come_concepts(MODULES["come.engine.pipeline"][0].read_text()) == []


@pytest.mark.parametrize("line", [
    "searched = method.keeps_units and cfg.split == 'search'",
    "from .split_search import search_split",
    "if cfg.sensitivity == 'taylor':\n    cache.unit_gradients()",
    "record = dict(split_search=None)",
    "def step(head_score): pass",
    "from .pair_scoring import built_scores as scorer",
])
def test_the_concept_check_sees_a_concept(line):
    assert come_concepts(line)
