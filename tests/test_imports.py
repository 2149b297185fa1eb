"""The package's import structure, read with ``ast`` (nothing is imported): no import cycles, ``model`` knows
nothing of ``cost`` or ``train``, and ``cost`` knows nothing of torch modules (DESIGN.md, "Data flows one way").

Nodes are modules, a package's ``__init__`` counting as the package's own node. Every import statement is an
edge, wherever it stands: at the top, inside a function (a lazy import is still a dependency of the design) or
under ``if TYPE_CHECKING``. Importing ``a.b.c`` is an edge to ``a.b.c`` and to the packages ``a.b`` and ``a``,
whose ``__init__`` Python runs first, except those that contain the importing module: they are already running
when it is. ``from a.b import c`` means the module ``a.b.c`` when there is one, else the name ``c`` of ``a.b``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "frugallm"


def module_names(src: Path, root: str) -> dict[str, Path]:
    out = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imports_of(name: str, modules: dict[str, Path], root: str) -> set[str]:
    """The modules of ``root`` that importing ``name`` makes Python run."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(modules[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    own = set(_ancestors(name))
    edges = set()
    for t in targets:
        if t != root and not t.startswith(root + "."):
            continue
        while t not in modules:  # `import frugallm.x.y` of a name that is no module: its package
            t = t.rpartition(".")[0]
        edges.add(t)
        edges.update(a for a in _ancestors(t) if a not in own)
    edges.discard(name)
    return edges


def external_imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def import_graph(src: Path, root: str) -> dict[str, set[str]]:
    modules = module_names(src, root)
    return {m: imports_of(m, modules, root) for m in modules}


def _shortest_cycle(graph: dict[str, set[str]], start: str, comp: set[str]) -> list[str]:
    """Breadth first from ``start`` back to it, inside its strongly connected component."""
    prev: dict[str, str] = {}
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[0] != start:
                        path.insert(0, prev[path[0]])
                    return path + [start]
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle of its component")


def components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan): the modules that lie on cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (about 80)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(comps, key=min)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that lies on one, each cycle once (rotated to start at its
    first module in sorted order)."""
    found: set[tuple[str, ...]] = set()
    for comp in components(graph):
        for start in sorted(comp):
            ring = _shortest_cycle(graph, start, comp)[:-1]
            i = ring.index(min(ring))
            found.add(tuple(ring[i:] + ring[:i] + [ring[i]]))
    return sorted(list(c) for c in found)


def _under(name: str, packages: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_no_import_cycles() -> None:
    found = cycles(import_graph(SRC, ROOT))
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_model_imports_nothing_of_cost_or_train() -> None:
    graph = import_graph(SRC, ROOT)
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if _under(m, ["frugallm.model"]) for t in ts
                 if _under(t, ["frugallm.cost", "frugallm.train"]))
    assert not bad, "model/ reaches up into cost/ or train/:\n" + "\n".join("  " + b for b in bad)


def test_cost_imports_no_torch_module_code() -> None:
    modules = module_names(SRC, ROOT)
    graph = import_graph(SRC, ROOT)
    forbidden = ["frugallm.model", "frugallm.train", "frugallm.serve", "frugallm.precision"]
    bad = []
    for m in sorted(modules):
        if not _under(m, ["frugallm.cost"]):
            continue
        bad += [f"{m} -> {t}" for t in sorted(graph[m]) if _under(t, forbidden)]
        bad += [f"{m} -> {t}" for t in sorted(external_imports_of(modules[m])) if _under(t, ["torch.nn"])]
    assert not bad, "cost/ imports torch module code:\n" + "\n".join("  " + b for b in bad)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_checker_sees_lazy_relative_and_package_edges(tmp_path: Path) -> None:
    src = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.b import g\n",  # lazy
        "pkg/b.py": "from . import c\n",  # relative, names a module
        "pkg/c.py": "import pkg.sub.d\n",  # runs pkg.sub's __init__ too
        "pkg/sub/__init__.py": "from pkg.a import f\n",
        "pkg/sub/d.py": "from pkg.sub import x\n",  # its own package, named explicitly
        "pkg/e.py": "from pkg.sub.d import y\n",
    })
    graph = import_graph(src, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.d"}
    assert graph["pkg.sub.d"] == {"pkg.sub"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub", "pkg.a"],  # the shortest through each
                             ["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d", "pkg.sub", "pkg.a"]]


@pytest.mark.parametrize("acyclic", [True, False])
def test_the_checker_finds_a_planted_cycle_and_only_that(tmp_path: Path, acyclic: bool) -> None:
    src = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/x.py": "import pkg.y\n",
                           "pkg/y.py": "" if acyclic else "from pkg import x\n"})
    assert cycles(import_graph(src, "pkg")) == ([] if acyclic else [["pkg.x", "pkg.y", "pkg.x"]])
