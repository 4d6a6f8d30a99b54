"""data: token sources, the paired activation store (SAELens data provider), the disk cache."""

from sae_diff.data.cache import ActivationCache, ActivationCacheWriter, CacheError, RunningStats
from sae_diff.data.harvest import HarvestConfig, HarvestSummary, harvest_cache, harvest_from_config
from sae_diff.data.sources import DatasetSpec, TensorTokenSource, TokenBatch, TokenSource
from sae_diff.data.store import PairedActivationsStore

__all__ = [
    "ActivationCache",
    "ActivationCacheWriter",
    "CacheError",
    "DatasetSpec",
    "HarvestConfig",
    "HarvestSummary",
    "PairedActivationsStore",
    "RunningStats",
    "TensorTokenSource",
    "TokenBatch",
    "TokenSource",
    "harvest_cache",
    "harvest_from_config",
]
