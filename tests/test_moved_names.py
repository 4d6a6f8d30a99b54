"""Moved names: the library and the benchmarks import each name from where it lives now.

A deprecation alias (``sae_diff.moved.moved_names``) is for users' code, for one release; the
package's own code importing through one would warn on every use and keep the old module
alive. This test imports every ``sae_diff`` module, collects each module's moved names, then
parses every ``from M import N`` in ``sae_diff/`` and ``benchmarks/`` (function-level
imports included) and fails on any that goes through an alias. It also checks each alias
resolves, with a ``DeprecationWarning``, to the object its new module defines.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import warnings
from pathlib import Path

import pytest

import sae_diff

ROOT = Path(__file__).resolve().parents[1]


def _aliases() -> dict[tuple[str, str], str]:
    """``(old module, name) -> new module`` for every moved name in the package."""
    out: dict[tuple[str, str], str] = {}
    for info in pkgutil.walk_packages(sae_diff.__path__, "sae_diff."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        moved = getattr(module.__dict__.get("__getattr__"), "moved", None)
        for name, target in (moved or {}).items():
            out[(info.name, name)] = target
    return out


ALIASES = _aliases()


def test_there_are_aliases_to_check() -> None:
    assert len(ALIASES) >= 10, ALIASES  # the split modules of issue 15 keep their old names


def _imports_through_aliases(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (node.module, alias.name) in ALIASES:
                    target = ALIASES[(node.module, alias.name)]
                    found.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import "
                        f"{alias.name} (now in {target})"
                    )
    return found


def test_library_and_benchmarks_import_names_from_their_new_modules() -> None:
    files = sorted((ROOT / "sae_diff").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    found = [hit for path in files for hit in _imports_through_aliases(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("old_module, name", sorted(ALIASES))
def test_alias_warns_and_resolves_to_the_new_object(old_module: str, name: str) -> None:
    new = getattr(importlib.import_module(ALIASES[(old_module, name)]), name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = getattr(importlib.import_module(old_module), name)
    assert old is new
    assert any(
        issubclass(w.category, DeprecationWarning) and name in str(w.message) for w in caught
    )
