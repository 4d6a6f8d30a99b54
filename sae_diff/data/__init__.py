"""data: token sources, the paired activation store (SAELens data provider), the disk cache."""

from sae_diff.data.cache import ActivationCache, ActivationCacheWriter, CacheError, RunningStats
from sae_diff.data.documents import DatasetSpec
from sae_diff.data.harvest import HarvestConfig, harvest_cache, harvest_from_config
from sae_diff.data.harvest_summary import HarvestSummary
from sae_diff.data.sources import TensorTokenSource, TokenSource
from sae_diff.data.store import PairedActivationsStore
from sae_diff.data.token_batch import TokenBatch

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
