"""Checks of a :class:`~sae_diff.training.config.PairedRunnerConfig` that need no model or data.

``PairedRunnerConfig.__post_init__`` calls :func:`resolve_names` (fill the organism's /
smoke-test pair's names, require ``model_name`` and ``hook_name``) before SAELens's own
``__post_init__``, and :func:`validate_config` after it, so a bad config fails before anything
is loaded; every error names the field and the fix. Its own module so that the dataclass
module holds the fields and their documentation, and the rules live in one place (this module
only needs the config's type, not its module, at import time).
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, get_args

from sae_diff.data.documents import DatasetSpec
from sae_diff.dictionaries import specs
from sae_diff.dictionaries.specs import StoreMode
from sae_diff.pairing.hooks import hook_width
from sae_diff.pairing.loading import Backend
from sae_diff.training import model_info as _model_info
from sae_diff.training.errors import K_BOUND, ConfigError

if TYPE_CHECKING:  # a real import would be a cycle: config imports this module
    from sae_diff.training.config import PairedRunnerConfig

#: from the architecture table (sae_diff.dictionaries.specs): no architecture is named here
STORE_MODES: tuple[str, ...] = specs.STORE_MODES
CROSSCODER_ARCHITECTURES: frozenset[str] = specs.training_names("crosscoder")
DIFF_ARCHITECTURES: frozenset[str] = specs.training_names("diff_sae")
BACKENDS: tuple[str, ...] = get_args(Backend)


# ---------------------------------------------------------------------- organisms
def resolve_names(cfg: PairedRunnerConfig) -> None:
    """Fill what the config leaves empty: with ``organism``, the pair's names and the
    recommended hook; with ``smoke_test_models``, ``smoke-ft``. Then require ``model_name``
    and ``hook_name`` (runs before SAELens's own ``__post_init__``)."""
    if cfg.organism is not None:
        if cfg.smoke_test_models is not None:
            raise ConfigError(
                "organism and smoke_test_models both name a model pair; keep one of them."
            )
        info = _model_info.organism_info(cfg.organism)
        cfg.base_model_name = cfg.base_model_name or info.base_name
        cfg.model_name = cfg.model_name or info.ft_name
        cfg.hook_name = cfg.hook_name or info.recommended_hook
        if cfg.model_from_pretrained_kwargs is None:  # loaded by load_organism, not from_pretrained
            cfg.model_from_pretrained_kwargs = {}
    elif cfg.smoke_test_models is not None:
        cfg.model_name = cfg.model_name or "smoke-ft"
    if not cfg.model_name:
        raise ConfigError(
            "model_name is empty: set it to the fine-tuned model (HF id, TransformerLens name or "
            "local folder), or set organism to train on a bundled model organism."
        )
    if not cfg.hook_name:
        raise ConfigError(
            "hook_name is empty: set the hook to train on (e.g. blocks.13.hook_resid_post); only "
            "organism configs default to the organism's recommended hook."
        )


def check_organism(cfg: PairedRunnerConfig, info: _model_info.OrganismInfo) -> None:
    """Organism-specific checks: a known-width hook of a layer it has, ``d_in`` its width,
    rows that fit its context, a valid chat share."""
    hook = cfg.hook_name
    if hook_width(hook) is None:  # not a residual / attention / MLP hook of known width
        raise ConfigError(
            f"hook_name {hook!r} is not a hook sae_diff can train on in organism {info.name!r}: use "
            "blocks.<layer>.hook_resid_pre / hook_resid_mid / hook_resid_post / hook_attn_out / "
            f"hook_mlp_out / mlp.hook_post with layer in 0..{info.dims['n_layers'] - 1} "
            f"(recommended: {info.recommended_hook})."
        )
    _model_info.check_hook_d_in(hook, cfg.sae.d_in, info.dims)
    if cfg.context_size > info.dims["n_ctx"]:
        raise ConfigError(
            f"context_size={cfg.context_size} exceeds organism {info.name!r}'s context of "
            f"{info.dims['n_ctx']} tokens; set context_size <= {info.dims['n_ctx']}."
        )
    if not 0.0 <= cfg.organism_chat_share <= 1.0:
        raise ConfigError(
            f"organism_chat_share={cfg.organism_chat_share} must be in [0, 1] (token share of chat)."
        )
    if cfg.organism_n_documents is not None and cfg.organism_n_documents < 1:
        raise ConfigError(
            f"organism_n_documents={cfg.organism_n_documents} must be >= 1 or null (as many as needed)."
        )


def default_store_mode(architecture: str) -> StoreMode:
    """``paired`` for crosscoders, ``diff`` for diff-SAEs, ``ft`` (a chat-SAE) otherwise
    (:func:`sae_diff.dictionaries.specs.default_store_mode`)."""
    return specs.default_store_mode(architecture)


# ---------------------------------------------------------------------- validation
def validate_config(cfg: PairedRunnerConfig) -> None:
    """Checks that need no model or data; each error names the field and how to fix it."""
    arch = cfg.architecture
    if cfg.store_mode not in STORE_MODES:
        raise ConfigError(
            f"store_mode={cfg.store_mode!r} is not one of {list(STORE_MODES)} (or 'auto')."
        )
    if cfg.model_backend not in BACKENDS:
        raise ConfigError(f"model_backend={cfg.model_backend!r} is not one of {list(BACKENDS)}.")
    if cfg.organism is not None:
        check_organism(cfg, _model_info.organism_info(cfg.organism))
    if not cfg.base_model_name and cfg.smoke_test_models is None:
        raise ConfigError(
            "base_model_name is empty: a pair needs the base model (model_name is the fine-tune). "
            "Set base_model_name, or smoke_test_models for a tiny random pair."
        )
    # --- architecture / data-mode agreement
    if arch in CROSSCODER_ARCHITECTURES and cfg.store_mode != "paired":
        raise ConfigError(
            f"architecture {arch!r} is a crosscoder: it reads both models' activations, but "
            f"store_mode={cfg.store_mode!r}. Use store_mode: paired (or auto), or a diff-SAE "
            "(batchtopk_diff_sae) for the activation difference."
        )
    if arch in DIFF_ARCHITECTURES and cfg.store_mode != "diff":
        raise ConfigError(
            f"architecture {arch!r} is a diff-SAE: it reads x_ft - x_base, but "
            f"store_mode={cfg.store_mode!r}. Use store_mode: diff (or auto)."
        )
    if arch not in CROSSCODER_ARCHITECTURES | DIFF_ARCHITECTURES and cfg.store_mode not in (
        "base",
        "ft",
    ):
        hint = "batchtopk_crosscoder" if cfg.store_mode == "paired" else "batchtopk_diff_sae"
        raise ConfigError(
            f"architecture {arch!r} is a one-model SAE, but store_mode={cfg.store_mode!r}. Use "
            f"store_mode: ft (chat-SAE) or base, or architecture {hint!r} for {cfg.store_mode} data."
        )
    if cfg.is_crosscoder and getattr(cfg.sae, "n_models", 2) != 2:
        raise ConfigError(f"sae.n_models={cfg.sae.n_models}: a pair has 2 models.")
    # --- sizes
    k = getattr(cfg.sae, "k", None)
    if k is not None and not 0 < k <= cfg.sae.d_sae:
        raise ConfigError(
            f"sae.k={k} must satisfy {K_BOUND}={cfg.sae.d_sae}: a BatchTopK dictionary "
            "keeps k latents per token. Lower k or raise d_sae (expansion factor)."
        )
    if cfg.is_crosscoder and cfg.sae.normalize_activations != "none":
        raise ConfigError(
            "Crosscoders normalise each model with its own scalar (set automatically); leave "
            f"sae.normalize_activations at 'none', not {cfg.sae.normalize_activations!r}."
        )
    if cfg.train_batch_size_tokens <= 0 or cfg.training_tokens < cfg.train_batch_size_tokens:
        raise ConfigError(
            f"training_tokens={cfg.training_tokens} must be at least one batch "
            f"(train_batch_size_tokens={cfg.train_batch_size_tokens})."
        )
    if cfg.mask_first_n < 0:
        raise ConfigError(f"mask_first_n must be >= 0, got {cfg.mask_first_n}.")
    if cfg.mask_high_norm is not None and cfg.mask_high_norm <= 1:
        raise ConfigError(
            f"mask_high_norm={cfg.mask_high_norm} must be > 1 (times the median norm) or null."
        )
    if cfg.cache_dtype is not None and cfg.cache_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(
            f"cache_dtype={cfg.cache_dtype!r} is not a storage dtype; use float32, bfloat16 or "
            "float16 (or null for the models' dtype)."
        )
    if cfg.cache_rows_per_shard < 1:
        raise ConfigError(f"cache_rows_per_shard must be >= 1, got {cfg.cache_rows_per_shard}.")
    if cfg.hook_head_index is not None:
        raise ConfigError(
            "hook_head_index is not supported for pairs; use a hook without a head index."
        )
    # --- hook vs d_in, when the model's dimensions are known without loading it
    dims = _model_info.known_model_dims(cfg)
    if dims is not None:
        _model_info.check_hook_d_in(cfg.hook_name, cfg.sae.d_in, dims)
        if dims.get("n_ctx") and cfg.context_size > dims["n_ctx"]:
            raise ConfigError(
                f"context_size={cfg.context_size} exceeds the base model's context of "
                f"{dims['n_ctx']} tokens (max_position_embeddings in its config.json); set "
                f"context_size <= {dims['n_ctx']}."
            )
    if (
        cfg.smoke_test_models is None
        and cfg.organism is None
        and not (cfg.dataset_path or cfg.dataset_mixture or cfg.cache_path)
    ):
        raise ConfigError(
            "Set dataset_path (a Hugging Face dataset or local files), dataset_mixture or cache_path "
            "(or organism, to train on a bundled model organism and its data)."
        )
    if cfg.chat_template_kwargs is not None and not (
        isinstance(cfg.chat_template_kwargs, dict)
        and all(isinstance(k, str) for k in cfg.chat_template_kwargs)
    ):
        raise ConfigError(
            f"chat_template_kwargs={cfg.chat_template_kwargs!r} must be a mapping of chat-template "
            'variable name to value (e.g. {"enable_thinking": false}), or null.'
        )
    if cfg.dataset_mixture is not None:
        spec_fields = {f.name for f in fields(DatasetSpec)}
        for i, spec in enumerate(cfg.dataset_mixture):
            if not isinstance(spec, dict) or "path" not in spec:
                raise ConfigError(
                    f"dataset_mixture[{i}] must be a mapping with at least `path`, got {spec!r}."
                )
            bad = sorted(set(spec) - spec_fields)
            if bad:
                raise ConfigError(
                    f"dataset_mixture[{i}] has unknown key(s) {bad}; valid: {sorted(spec_fields)}."
                )


__all__ = [
    "BACKENDS",
    "CROSSCODER_ARCHITECTURES",
    "DIFF_ARCHITECTURES",
    "STORE_MODES",
    "check_organism",
    "default_store_mode",
    "resolve_names",
    "validate_config",
]
