"""The import graph of casp: no cycles, and no library module imports the CLI.

Every module of casp/ is parsed (not imported) and every import in it counts, at module
level or inside a function, absolute or relative: ``import casp.a.b`` and
``from casp.a.b import name`` import casp.a.b; ``from casp.a import b`` imports casp.a.b
when b is a submodule, the package's ``__init__`` (casp.a) when b is a name defined there.
A deferred (function-level) import that closes a cycle is still a cycle: it only moves the
failure from import time to call time and hides the layering.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "casp"
CLI = "casp.cli"
# the ``python -m casp`` entry point is the CLI's own front door
CLI_ENTRY_POINTS = {"casp.__main__"}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str], package: str) -> set[str]:
    """The modules of ``known`` that module ``name`` (file ``path``) imports anywhere."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                if node.level > 1:
                    base = base[:-(node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.append(submodule if submodule in known else source)
        else:
            continue
        for target in targets:
            if target == package or target.startswith(package + "."):
                if target not in known:
                    raise AssertionError(f"{path}:{node.lineno} imports {target}, which is not "
                                         f"a module of {package}/")
                found.add(target)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root, package)
    known = set(files)
    return {name: imported_modules(name, path, known, package) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None: depth-first search for a back edge."""
    state: dict[str, int] = {}          # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of mutually importing modules (strongly connected
    components of more than one module), so that a failure names every tangle at once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [find_cycle({n: graph[n] & g for n in g}) for g in groups]


def importers_of(graph: dict[str, set[str]], target: str) -> dict[str, str]:
    """Modules outside ``target`` that import it, directly or through other modules:
    importer -> the chain of imports that reaches it."""
    inside = lambda m: m == target or m.startswith(target + ".")  # noqa: E731
    found = {}
    for start in graph:
        if inside(start):
            continue
        seen, frontier = {start: [start]}, [start]
        while frontier:
            node = frontier.pop()
            for nxt in sorted(graph[node]):
                if nxt in seen:
                    continue
                seen[nxt] = seen[node] + [nxt]
                if inside(nxt):
                    found.setdefault(start, " -> ".join(seen[nxt]))
                else:
                    frontier.append(nxt)
    return found


def test_casp_has_no_import_cycles():
    cycles = all_cycles(import_graph())
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_library_module_imports_the_cli():
    graph = import_graph()
    direct = sorted(m for m, targets in graph.items()
                    if not (m == CLI or m.startswith(CLI + ".")) and m not in CLI_ENTRY_POINTS
                    and any(t == CLI or t.startswith(CLI + ".") for t in targets))
    assert not direct, f"library modules importing {CLI}: {direct}"
    through = {m: chain for m, chain in importers_of(graph, CLI).items()
               if m not in CLI_ENTRY_POINTS}
    assert not through, "library modules reaching the CLI:\n" + "\n".join(through.values())


# -- the checks themselves ----------------------------------------------------------------

def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files", [
    {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "from pkg.a import x\n"},
    # a deferred import counts
    {"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import y\n",
     "pkg/b.py": "def f():\n    from pkg.a import x\n"},
    # relative imports, and a name imported from a package is its __init__
    {"pkg/__init__.py": "from pkg.sub.c import z\n", "pkg/sub/__init__.py": "",
     "pkg/sub/c.py": "from .. import helper\n"},
    # ``from package import submodule`` is the submodule
    {"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/c.py": "from pkg import d\n",
     "pkg/d.py": "from .sub import c\n"},
])
def test_a_cycle_is_found(tmp_path, files):
    write_package(tmp_path, files)
    graph = import_graph(tmp_path, "pkg")
    cycles = all_cycles(graph)
    assert len(cycles) == 1 and cycles[0][0] == cycles[0][-1], (graph, cycles)


def test_acyclic_imports_pass(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import x\n", "pkg/a.py": "from pkg.sub import c\n",
        "pkg/sub/__init__.py": "", "pkg/sub/c.py": "import os\nfrom . import d\n",
        "pkg/sub/d.py": "def f():\n    import pkg.e\n", "pkg/e.py": ""})
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.c"] == {"pkg.sub.d"} and graph["pkg.sub.d"] == {"pkg.e"}
    assert graph["pkg.a"] == {"pkg.sub.c"} and not all_cycles(graph)


def test_a_module_reaching_the_cli_is_found(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "", "pkg/cli/__init__.py": "from pkg.lib import run\n",
        "pkg/lib.py": "def run():\n    from pkg import helper\n",
        "pkg/helper.py": "def f():\n    from pkg.cli import main\n"})
    found = importers_of(import_graph(tmp_path, "pkg"), "pkg.cli")
    assert found == {"pkg.helper": "pkg.helper -> pkg.cli",
                     "pkg.lib": "pkg.lib -> pkg.helper -> pkg.cli"}
