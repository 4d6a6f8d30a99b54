"""No import cycles inside ``sae_diff``, function-level imports included.

A function-level import hides a cycle from the interpreter (the module is already loaded by the
time the function runs) but not from a reader: ``a`` needs ``b`` and ``b`` needs ``a`` all the
same. This test parses every module's imports with :mod:`ast` (module level, inside functions
and classes; not ``if TYPE_CHECKING:`` blocks, which never run), builds the module graph and
fails on any strongly connected component of more than one module, listing it.

Edges: ``import a.b`` and ``from a.b import c`` are edges to ``a.b``, or to ``a.b.c`` when that
is itself a module; relative imports are resolved against the importing module's package. An
import of a package is an edge to its ``__init__``. Implicit parent-package imports are not
edges (Python initialises a package before its submodules without a cycle problem).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sae_diff"


def _modules(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import statement that can run."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> modules of sae_diff it imports`` (self-imports dropped)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, names in _imports(tree, module, path.name == "__init__.py"):
            if not target.startswith(PACKAGE):
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if subs:
                graph[module].update(subs)
            if len(subs) < len(names) or not names:
                hit = target
                while hit not in modules and "." in hit:
                    hit = hit.rsplit(".", 1)[0]
                if hit in modules:
                    graph[module].add(hit)
        graph[module].discard(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def _describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    members = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
    return "{" + ", ".join(comp) + "}: " + "; ".join(edges)


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path: Path) -> None:
    """The checker itself: a function-level import closing a cycle is found; TYPE_CHECKING
    imports and a one-way chain are not cycles."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from sae_diff.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sae_diff.a\n"
        "def g():\n    import sae_diff.a\n"
    )
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sae_diff import a\n"
    )
    graph = import_graph(tmp_path)
    assert graph["sae_diff.a"] == {"sae_diff.sub.b"}
    assert graph["sae_diff.sub.b"] == {"sae_diff.c"}
    assert graph["sae_diff.d"] == set()
    assert cycles(graph) == [["sae_diff.a", "sae_diff.c", "sae_diff.sub.b"]]
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(tmp_path)) == []


def test_no_import_cycles_in_sae_diff() -> None:
    graph = import_graph()
    assert len(graph) > 50, "the package was not found"
    found = cycles(graph)
    if found:
        pytest.fail(
            "import cycles in sae_diff (break each by moving the shared code into a module "
            "both can import):\n" + "\n".join(_describe(c, graph) for c in found)
        )


#: the rooms of ``sae_diff`` in the order data flows (docs/architecture.md): a module may import
#: its own layer and the layers below, never one above. ``sae_diff`` itself (the package
#: ``__init__``: registers the architectures, re-exports interop) sits above what it imports.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "atomic", "moved", "process_group", "synthetic"}),
    frozenset({"pairing", "dictionaries"}),
    frozenset({"data", "organisms", "interop"}),
    frozenset({"sae_diff"}),
    frozenset({"hub", "training"}),
    frozenset({"analysis", "evaluation"}),
    frozenset({"report"}),
    frozenset({"commands"}),
    frozenset({"cli"}),
)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(module: str) -> int:
    room = _room(module)
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise AssertionError(f"{module}: room {room!r} is in no layer of LAYERS; add it")


def test_imports_follow_the_layers() -> None:
    """Lower rooms never import higher ones (function-level imports included): e.g. the data
    room runs without the trainer, and the library never imports the CLI."""
    graph = import_graph()
    upward = [
        f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]) if _layer(b) > _layer(a)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
