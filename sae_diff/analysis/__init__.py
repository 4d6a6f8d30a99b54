"""Latent analysis: the latent table, one-pass Latent Scaling, max-activating examples, plots.

See ``docs/analysis.md``. Plots live in :mod:`sae_diff.analysis.plots` (imported on first
use, so that ``import sae_diff.analysis`` does not load plotly).
"""

from typing import Any

from sae_diff.analysis.batches import (
    PairedBatch,
    as_paired_batch,
    cache_batches,
    iter_paired_batches,
)
from sae_diff.analysis.example_display import (
    Example,
    LatentExamples,
    examples_html,
    save_examples_html,
)
from sae_diff.analysis.examples import examples_on_the_fly, max_activating_examples
from sae_diff.analysis.latent_scaling import (
    DEFAULT_MIN_COUNT,
    LatentScalingResult,
    as_inference,
    dictionary_kind,
    latent_scaling,
)
from sae_diff.analysis.latent_scaling_reference import (
    latent_scaling_cost_ratio,
    latent_scaling_naive,
)
from sae_diff.analysis.latent_table import (
    geometry_frame,
    latent_table,
    load_latent_table,
    save_latent_table,
)


def __getattr__(name: str) -> Any:
    if name == "plots":
        import importlib

        return importlib.import_module("sae_diff.analysis.plots")
    raise AttributeError(f"module 'sae_diff.analysis' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MIN_COUNT",
    "Example",
    "LatentExamples",
    "LatentScalingResult",
    "PairedBatch",
    "as_inference",
    "as_paired_batch",
    "cache_batches",
    "dictionary_kind",
    "examples_html",
    "examples_on_the_fly",
    "geometry_frame",
    "iter_paired_batches",
    "latent_scaling",
    "latent_scaling_cost_ratio",
    "latent_scaling_naive",
    "latent_table",
    "load_latent_table",
    "max_activating_examples",
    "save_examples_html",
    "save_latent_table",
]
