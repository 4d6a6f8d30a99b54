"""Keyword arguments of an analysis entry point from a YAML/JSON config file.

The analysis command lines (``sae-diff stagewise``, ``sae-diff causal-filter`` and their
``python -m`` forms) read one config whose fields are the keyword arguments of the function
they run; this checks the fields against the function's signature so a typo is a one-line
:class:`~sae_diff.training.errors.ConfigError` naming the valid fields.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_diff.training.config import read_config_file
from sae_diff.training.errors import ConfigError

__all__ = ["config_kwargs"]


def config_kwargs(func: Callable[..., Any], path: str | Path) -> dict[str, Any]:
    """Keyword arguments of ``func`` from a YAML/JSON config file, with a clear error naming
    unknown fields (and the valid ones): a :class:`~sae_diff.training.errors.ConfigError`, so
    ``sae-diff`` prints it as one line."""
    data = read_config_file(path)
    # `method:` names the analysis for `sae-diff train` (sae_diff.commands.handlers.ANALYSIS_METHODS)
    data.pop("method", None)
    params = inspect.signature(func).parameters
    valid = sorted(
        n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )
    valid = sorted({*valid, "stages"} if "plan" in valid else valid)
    unknown = (
        sorted(set(data) - set(valid))
        if not any(p.kind == p.VAR_KEYWORD for p in params.values())
        else []
    )
    if unknown:
        raise ConfigError(f"Unknown field(s) {unknown} in {path}; valid: {valid}.")
    return data
