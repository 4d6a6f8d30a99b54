"""Names that moved to another module keep working for one release, with a warning.

A module whose public names moved sets ``__getattr__ = moved_names(__name__, {name: new_module})``.
The alias resolves the new module by name on first access (:func:`importlib.import_module`,
not an import statement), so it adds no import-time dependency and cannot create an import
cycle with the module the name moved to (which often imports the old one).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving each moved name in its new module.

    Args:
        module: the old module's ``__name__`` (named in the warning).
        moved: ``name -> module it moved to``.
    """

    def __getattr__(name: str) -> Any:
        if name in moved:
            target = moved[name]
            warnings.warn(
                f"{module}.{name} moved to {target}.{name}; import it from there "
                "(this alias goes in the next release).",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(target), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    __getattr__.moved = dict(moved)  # type: ignore[attr-defined]  # read by tests/test_moved_names.py
    return __getattr__


def to(target: str, names: Iterable[str]) -> dict[str, str]:
    """``{name: target}`` for each name: builds the ``moved`` table of :func:`moved_names`."""
    return dict.fromkeys(names, target)


__all__ = ["moved_names", "to"]
