"""Errors and messages shared by the training modules (config, validation, model_info, plan,
flags; tokens and data).

Its own module so that :mod:`~sae_diff.training.model_info`, :mod:`~sae_diff.training.plan`
and :mod:`~sae_diff.training.tokens` can raise these errors without importing the config
dataclass or the data provider (no import cycle).
"""

from __future__ import annotations

import difflib
from typing import Any

from sae_diff.errors import SaeDiffError


class ConfigError(SaeDiffError, ValueError):
    """A training config is invalid; the message names the field and the fix."""


class TrainingDataError(SaeDiffError, RuntimeError):
    """The run's data cannot be built (missing dataset column, empty data, ...)."""


#: the one statement of the BatchTopK k bound, used by every message about it
K_BOUND = "0 < k <= d_sae"


def did_you_mean(name: str, candidates: Any, prefix: str = "") -> str:
    """`` (did you mean X?)`` for the closest candidate by edit distance, else ``""``.

    ``_``/``-`` are ignored, so ``training-tokens`` finds ``training_tokens``; typos
    (``trainig_tokens``, ``batchtopk_crossocder``) are found by ``difflib``'s ratio."""

    def norm(s: str) -> str:
        return s.lstrip("-").replace("-", "_").lower()

    by_norm = {norm(str(c)): str(c) for c in candidates}
    hit = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.75)
    return f" (did you mean {prefix}{by_norm[hit[0]]}?)" if hit else ""


__all__ = ["K_BOUND", "ConfigError", "TrainingDataError", "did_you_mean"]
