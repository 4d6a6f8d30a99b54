"""Checks of a run's inputs before any model is loaded: local datasets and the cache.

A bad dataset path or a cache harvested for another config should fail in a second with a
message naming the file and the fix, not after minutes of model loading. The dataset checks
live in the training room (the Python API runs them too); ``sae_diff.training`` is imported
inside the function: it loads the whole trainer, which ``sae-diff --help`` does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_diff.data.cache import check_config_cache

if TYPE_CHECKING:  # pragma: no cover
    from sae_diff.training.config import PairedRunnerConfig


def preflight_datasets(cfg: PairedRunnerConfig) -> None:
    """:func:`sae_diff.training.dataset_checks.check_local_datasets` (imported here, not at
    module level: importing ``sae_diff.training`` loads the whole trainer).

    Raises:
        TrainingDataError: naming the dataset, what is wrong and the fix.
    """
    from sae_diff.training.dataset_checks import check_local_datasets

    check_local_datasets(cfg)


def preflight_cache(cfg: PairedRunnerConfig, *, what: str = "the config") -> None:
    """:func:`sae_diff.data.cache_identity.check_config_cache` before anything loads (models unknown:
    names, data, hook, masks, dtype and context size are compared; hashes once loaded)."""
    check_config_cache(cfg, what=what)


__all__ = ["preflight_cache", "preflight_datasets"]
