"""Runner config for training a dictionary on a model pair, in SAELens's own config style.

:class:`PairedRunnerConfig` *is a* ``sae_lens.LanguageModelSAERunnerConfig`` (the nested
``sae=`` architecture config, learning-rate schedule, dead-latent windows, checkpoints,
logger ... all mean what they mean in SAELens). It adds what a pair needs:

- ``model_name`` is the **fine-tuned** model (SAELens's ``metadata.model_name``), and
  ``base_model_name`` the base it is compared with;
- ``store_mode``: which activations the dictionary reads (``paired`` for crosscoders,
  ``diff`` for diff-SAEs, ``base`` / ``ft`` for a plain SAE on one model);
- token masks (BOS, first n positions, very-high-norm tokens);
- ``cache_path``: train from a disk cache of paired activations (harvested first when missing);
- ``smoke_test_models``: a tiny random model pair for smoke tests, no download;
- ``organism``: the bundled model organism (``sae_diff.organisms``) as the pair, its
  pretraining text + chat mixture as the data, and its recommended hook by default.

Every check that needs no model runs in :func:`validate_config` (called by ``__post_init__``),
so a bad config fails before anything is loaded.

Layout of the training config (one job per module): this module holds the dataclass, the
organism / smoke-test name resolution, validation and dict/file loading (~520 lines: the
dataclass's attribute documentation is most of it);
:mod:`~sae_diff.training.model_info` what is known about the models without loading them
(organism ``config.json``, the base model's ``config.json``, the hook width check);
:mod:`~sae_diff.training.plan` the ``--dry-run`` plan and preflight checks;
:mod:`~sae_diff.training.flags` the command-line flags; :mod:`~sae_diff.training.errors`
``ConfigError``. Names that moved out of this module still resolve here, with a
``DeprecationWarning``, for one release.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig, dict_field
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAEConfig

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries import specs
from sae_diff.dictionaries.specs import StoreMode
from sae_diff.moved import moved_names, to
from sae_diff.pairing.hooks import hook_width
from sae_diff.pairing.loading import Backend
from sae_diff.training import model_info as _model_info
from sae_diff.training.errors import K_BOUND, ConfigError, did_you_mean

#: from the architecture table (sae_diff.dictionaries.specs): no architecture is named here
STORE_MODES: tuple[str, ...] = specs.STORE_MODES
CROSSCODER_ARCHITECTURES: frozenset[str] = specs.training_names("crosscoder")
DIFF_ARCHITECTURES: frozenset[str] = specs.training_names("diff_sae")
#: a config's store_mode: a StoreMode, or "auto" (the architecture's, from the table)
StoreModeOrAuto = Literal["auto", "paired", "diff", "base", "ft"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass
class SmokeTestModels:
    """A tiny, randomly initialised ``HookedTransformer`` pair built from its config (no
    download): ``ft`` is ``base`` with every weight perturbed by ``noise`` standard deviations.
    For smoke tests of the training pipeline only: the models know nothing.

    Attributes:
        n_layers: transformer blocks.
        d_model: residual width (the ``d_in`` of resid hooks).
        n_heads: attention heads (``d_head = d_model // n_heads``).
        d_vocab: vocabulary size (tokens are drawn uniformly from it).
        n_ctx: maximum context length.
        noise: perturbation of ft's weights, in units of each tensor's std.
        seed: seed of the weights and of the random tokens.
    """

    n_layers: int = 2
    d_model: int = 32
    n_heads: int = 4
    d_vocab: int = 64
    n_ctx: int = 32
    noise: float = 0.3
    seed: int = 0


def _no_wandb_logger() -> LoggingConfig:
    return LoggingConfig(log_to_wandb=False)


@dataclass
class PairedRunnerConfig(LanguageModelSAERunnerConfig[Any]):
    """SAELens's ``LanguageModelSAERunnerConfig`` for a model pair (see the module docstring).

    Every SAELens field keeps its meaning; ``model_name`` / ``model_from_pretrained_kwargs``
    describe the fine-tuned model. ``logger.log_to_wandb`` defaults to False (set it to
    true to log to Weights & Biases as SAELens does).

    Attributes:
        base_model_name: the base model (HF id, TransformerLens name or local folder).
        base_model_from_pretrained_kwargs: loading options of the base model (default: the
            same as ``model_from_pretrained_kwargs``).
        ft_weights_path: read the fine-tune's weights from here (a local HF folder) while
            ``model_name`` stays its recorded name.
        model_backend: ``hooked`` (HookedTransformer), ``bridge`` (TransformerBridge) or ``auto``.
        store_mode: ``auto`` (from the architecture), ``paired``, ``diff``, ``base`` or ``ft``.
        mask_bos: drop the BOS / attention-sink position.
        mask_first_n: drop the first n positions of every sequence.
        mask_high_norm: drop tokens whose norm exceeds this many times the median (None: off).
        dataset_column: text / tokens / messages column of the dataset (None: guess).
        dataset_split: split of ``dataset_path``.
        dataset_mixture: several datasets mixed by token share, each a
            ``sae_diff.data.sources.DatasetSpec`` mapping (path, kind, column, split, name,
            streaming, weight); replaces ``dataset_path`` (pretraining text + chat is the usual
            recipe).
        cache_path: train from this paired-activation cache; harvested first when missing.
            Unset: train on the fly from the models (no disk cache; the training rows are
            harvested shard by shard into a shuffling buffer of ``n_batches_in_buffer``
            batches), selecting the same tokens.
        cache_dtype: storage dtype of activations, on disk and in the on-the-fly buffer
            (``float32``, ``bfloat16`` or ``float16``; None: ``dtype``). Half precision halves
            the cache; batches are upcast to float32 exactly before training.
        cache_rows_per_shard: token rows per cache shard; also the rows over which the
            high-norm median is taken, on the fly too (so both paths select the same tokens).
        smoke_test_models: use a tiny random model pair (smoke tests; no download).
        organism: train on a bundled model organism (a name from
            ``sae_diff.organisms.available_organisms()``, or a directory made by its build):
            the pair is ``load_organism(organism).paired()``; ``model_name`` /
            ``base_model_name`` default to its names and ``hook_name`` to its recommended hook;
            the data is its pretraining text + chat mixture unless ``dataset_path`` or
            ``dataset_mixture`` is set.
        organism_chat_share: token share of chat conversations in the organism's data (the
            rest is pretraining text); 0 or 1 uses one kind only.
        organism_n_documents: documents of each kind to draw from the organism's corpus
            (None: enough for the run's training and evaluation tokens).
        n_norm_batches: batches used to estimate the crosscoder's per-model norm factors.
        eval_at_end: run the paired evaluator after training and save ``eval.json``.
        eval_loss_recovered: include the loss recovered by splicing reconstructions into
            each model (needs the models, also when training from a cache).
    """

    model_name: str = ""  # the fine-tune; required unless organism / smoke_test_models names it
    # None (default): prepend BOS exactly when the tokenizer has one (Gemma/Llama yes, Qwen no);
    # True/False force it. SAELens's default is True, which would give Qwen a fake BOS.
    prepend_bos: bool | None = None  # type: ignore[assignment]
    hook_name: str = ""  # required unless organism gives its recommended hook
    base_model_name: str = ""
    base_model_from_pretrained_kwargs: dict[str, Any] | None = dict_field(default=None)
    ft_weights_path: str | None = None
    model_backend: Backend = "auto"
    store_mode: StoreModeOrAuto = (
        "auto"  # "auto" becomes the architecture's StoreMode in __post_init__
    )
    mask_bos: bool = True
    mask_first_n: int = 0
    mask_high_norm: float | None = 10.0
    dataset_column: str | None = None
    dataset_split: str = "train"
    dataset_mixture: list[dict[str, Any]] | None = None
    cache_path: str | None = None
    cache_dtype: str | None = None
    cache_rows_per_shard: int = 256
    smoke_test_models: SmokeTestModels | None = None
    organism: str | None = None
    organism_chat_share: float = 0.5
    organism_n_documents: int | None = None
    n_norm_batches: int = 10
    eval_at_end: bool = True
    eval_loss_recovered: bool = True
    logger: LoggingConfig = field(default_factory=_no_wandb_logger)

    def __post_init__(self) -> None:
        if isinstance(self.smoke_test_models, dict):
            self.smoke_test_models = SmokeTestModels(**self.smoke_test_models)
        if isinstance(self.logger, dict):
            self.logger = LoggingConfig(**self.logger)
        seqpos: Any = self.seqpos_slice  # type: ignore[has-type]
        if isinstance(seqpos, list):
            self.seqpos_slice = tuple(seqpos)
        resolve_names(self)
        super().__post_init__()
        if self.store_mode == "auto":
            self.store_mode = default_store_mode(self.sae.architecture())
        validate_config(self)

    # ------------------------------------------------------------------ helpers
    @property
    def architecture(self) -> str:
        """The training architecture name (``cfg.sae.architecture()``)."""
        return self.sae.architecture()

    @property
    def is_crosscoder(self) -> bool:
        return self.architecture in CROSSCODER_ARCHITECTURES

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["smoke_test_models"] = (
            None if self.smoke_test_models is None else asdict(self.smoke_test_models)
        )
        d["seqpos_slice"] = list(self.seqpos_slice)
        return d

    @classmethod
    def from_dict(cls, cfg_dict: dict[str, Any]) -> PairedRunnerConfig:
        """Inverse of :meth:`to_dict` (checkpoint path kept as saved, not re-suffixed)."""
        return config_from_dict(cfg_dict, keep_checkpoint_path=True)


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
    if cfg.dataset_mixture is not None:
        from sae_diff.data.sources import DatasetSpec

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


def _sae_config(sae: Any, architecture: str | None = None) -> TrainingSAEConfig:
    if isinstance(sae, TrainingSAEConfig):
        return sae
    if not isinstance(sae, dict):
        raise ConfigError("The config needs an `sae:` section (architecture, d_in, d_sae, ...).")
    sae = dict(sae)
    arch = architecture or sae.pop("architecture", None)
    sae.pop("architecture", None)
    if arch is None:
        raise ConfigError(
            "sae.architecture is missing. Choose one of: "
            + ", ".join(sorted(SAE_TRAINING_CLASS_REGISTRY))
            + "."
        )
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        raise ConfigError(
            f"Unknown architecture {arch!r}{did_you_mean(arch, SAE_TRAINING_CLASS_REGISTRY)}. "
            f"Registered: {sorted(SAE_TRAINING_CLASS_REGISTRY)} "
            "(crosscoder, batchtopk_crosscoder and batchtopk_diff_sae come from sae_diff)."
        )
    cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    names = {f.name for f in fields(cfg_cls)}
    unknown = sorted(set(sae) - names - {"metadata"})
    if unknown:
        hint = "".join(did_you_mean(u, names, "sae.") for u in unknown)
        raise ConfigError(
            f"Unknown field(s) {unknown} for architecture {arch!r}{hint}; valid: {sorted(names)}."
        )
    for required in ("d_in", "d_sae"):
        if required not in sae:
            raise ConfigError(f"sae.{required} is required.")
    sae.pop("metadata", None)
    try:
        return cfg_cls(**sae)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Invalid sae config for {arch!r}: {e}") from e


def config_from_dict(
    d: dict[str, Any], *, keep_checkpoint_path: bool = False
) -> PairedRunnerConfig:
    """Build a :class:`PairedRunnerConfig` from a (YAML/JSON) dict; unknown keys are errors.

    ``keep_checkpoint_path``: use ``checkpoint_path`` as given (a saved run's config), instead
    of SAELens's behaviour of appending a fresh run id.
    """
    d = dict(d)
    names = {f.name for f in fields(PairedRunnerConfig)}
    derived = {"tokens_per_buffer"}  # attributes SAELens adds in __post_init__
    unknown = sorted(set(d) - names - derived)
    if unknown:
        hint = "; ".join(f"{u}{did_you_mean(u, names)}" for u in unknown if did_you_mean(u, names))
        raise ConfigError(f"Unknown config field(s): {unknown}. {hint}".strip())
    for k in derived:
        d.pop(k, None)
    d["sae"] = _sae_config(d.get("sae"))
    if isinstance(d.get("smoke_test_models"), dict):
        d["smoke_test_models"] = SmokeTestModels(**d["smoke_test_models"])
    if isinstance(d.get("logger"), dict):
        d["logger"] = LoggingConfig(**d["logger"])
    checkpoint_path = d.get("checkpoint_path")
    try:
        cfg: PairedRunnerConfig = PairedRunnerConfig(**d)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"Invalid config: {e}") from e
    if keep_checkpoint_path and "checkpoint_path" in d:
        cfg.checkpoint_path = checkpoint_path
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of field: value.")
    return data


# ---------------------------------------------------------------------- the plan (--dry-run)


# ---------------------------------------------------------------------- moved names (one release)
#: name -> module it moved to (one release; see sae_diff.moved)
__getattr__ = moved_names(
    __name__,
    {
        **to(
            "sae_diff.training.plan",
            (
                "Plan",
                "make_plan",
                "preflight_checks",
                "check_hook_name",
                "BLOCK_HOOKS",
                "GLOBAL_HOOKS",
            ),
        ),
        **to("sae_diff.training.flags", ("parse_config", "config_flags_help")),
        **to(
            "sae_diff.training.model_info",
            (
                "OrganismInfo",
                "organism_info",
                "KNOWN_MODEL_DIMS",
                "model_config_dir",
                "known_model_dims",
                "check_hook_d_in",
            ),
        ),
    },
)


__all__ = [
    "BACKENDS",
    "STORE_MODES",
    "ConfigError",
    "PairedRunnerConfig",
    "SmokeTestModels",
    "config_from_dict",
    "default_store_mode",
    "read_config_file",
    "resolve_names",
    "validate_config",
]
