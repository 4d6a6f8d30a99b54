"""The methods of the diffing study: which dictionaries it trains and which analyses it runs.

Each trained method is one row of the architecture table (:mod:`sae_diff.dictionaries.specs`),
which alone states its data mode and kind; this module only names the methods (the labels the
report uses) and the few settings that differ between them.
"""

from __future__ import annotations

from typing import Any, TypedDict

from sae_diff.dictionaries import specs


class MethodSpec(TypedDict):
    """A trained method: its training architecture, the activations it reads and its kind."""

    architecture: str
    mode: specs.StoreMode
    kind: specs.DictionaryKind


def _method(architecture: str) -> MethodSpec:
    """A method of the study: a training architecture, with the data mode and kind of its row
    in the architecture table (sae_diff.dictionaries.specs), which is the only place they are
    stated."""
    row = specs.spec(architecture)
    if row is None:  # pragma: no cover - a programming error in METHODS
        raise KeyError(f"{architecture!r} is not in sae_diff.dictionaries.specs.ARCHITECTURES")
    return {"architecture": architecture, "mode": row.store_mode, "kind": row.kind}


#: method name (the report's label) -> its training architecture (one table row each)
METHODS: dict[str, MethodSpec] = {
    "l1_crosscoder": _method("crosscoder"),
    "batchtopk_crosscoder": _method("batchtopk_crosscoder"),
    "diff_sae": _method("batchtopk_diff_sae"),
    "chat_sae": _method("batchtopk"),
    # issue 17's crosscoder variants (trained for DemoConfig.variant_steps, so that the default
    # run with them stays within `make demo`'s 10-minute budget on 2 cores)
    "jumprelu_crosscoder": _method("jumprelu_crosscoder"),
    "shared_l1_crosscoder": _method("shared_crosscoder"),
    "shared_batchtopk_crosscoder": _method("shared_batchtopk_crosscoder"),
    "dedicated_crosscoder": _method("dedicated_batchtopk_crosscoder"),
}
#: methods built on a base-SAE (SAELens ``batchtopk`` on the base model's activations, trained
#: once per seed and shared) rather than trained as a dictionary of their own: they rank that
#: SAE's latents (sae_diff.analysis.stages / causal_filter) and are scored on the fine-tune's
#: activations at the scoring set like every other method.
ANALYSIS_METHODS: dict[str, str] = {
    "stagewise": "stage-wise diffing: the base-SAE fine-tuned on the fine-tune's activations (model-change "
    "stage, same data); latents ranked by decoder rotation",
    "causal_filter": "base-SAE diffing: latents ranked by firing shift (ft / base), kept when ablating them "
    "moves the fine-tune's assistant-token KL beyond random latents",
}
#: the seed's four methods, trained for DemoConfig.train_steps
CORE_METHODS: tuple[str, ...] = ("l1_crosscoder", "batchtopk_crosscoder", "diff_sae", "chat_sae")
#: what `sae-diff demo` runs unless --methods says otherwise: every method
DEFAULT_METHODS: tuple[str, ...] = (*METHODS, *ANALYSIS_METHODS)
#: The dictionary-free baselines and the supervised ceiling (see sae_diff.report.baselines).
BASELINES = ("probe", "mean_diff", "pca_diff", "kl_tokens")


def variant_settings(architecture: str, d_sae: int) -> dict[str, Any]:
    """Architecture-specific settings of the issue-17 variants (docs/methods.md): 1/16 of the
    latents tied, 1/8 dedicated to each model; the JumpReLU sparsity weight for L0 near k."""
    settings: dict[str, dict[str, Any]] = {
        "jumprelu_crosscoder": {"l0_coefficient": 0.5},
        "shared_crosscoder": {"n_shared_latents": d_sae // 16, "shared_sparsity_ratio": 0.15},
        "shared_batchtopk_crosscoder": {
            "n_shared_latents": d_sae // 16,
            "shared_sparsity_ratio": 0.8,
        },
        "dedicated_batchtopk_crosscoder": {
            "n_base_dedicated": d_sae // 8,
            "n_ft_dedicated": d_sae // 8,
        },
    }
    return settings.get(architecture, {})


__all__ = [
    "ANALYSIS_METHODS",
    "BASELINES",
    "CORE_METHODS",
    "DEFAULT_METHODS",
    "METHODS",
    "MethodSpec",
    "variant_settings",
]
