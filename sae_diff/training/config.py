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

Every check that needs no model runs in
:func:`~sae_diff.training.validation.validate_config` (called by ``__post_init__``), so a bad
config fails before anything is loaded.

Layout of the training config (one job per module): this module holds the dataclass and its
dict / file loading; :mod:`~sae_diff.training.validation` the organism / smoke-test name
resolution and the checks that need no model; :mod:`~sae_diff.training.model_info` what is known about the models without loading them
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
from typing import Any, Literal

import yaml
from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig, dict_field
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAEConfig

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.moved import moved_names, to
from sae_diff.pairing.loading import Backend
from sae_diff.training.errors import ConfigError, did_you_mean
from sae_diff.training.validation import (
    BACKENDS,
    CROSSCODER_ARCHITECTURES,
    STORE_MODES,
    default_store_mode,
    resolve_names,
    validate_config,
)

#: a config's store_mode: a StoreMode, or "auto" (the architecture's, from the table)
StoreModeOrAuto = Literal["auto", "paired", "diff", "base", "ft"]


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
            ``sae_diff.data.documents.DatasetSpec`` mapping (path, kind, column, split, name,
            streaming, weight); replaces ``dataset_path`` (pretraining text + chat is the usual
            recipe).
        chat_template_kwargs: extra variables for the tokenizer's chat template, passed to
            ``apply_chat_template`` when chat rows are rendered (e.g. ``{"enable_thinking":
            false}`` for Qwen3, whose template otherwise renders an empty thinking block
            differently); None: the template's defaults. Text and token rows ignore it.
        disable_concat_sequences: (SAELens's field) one document per row, truncated or
            padded, instead of packing documents into full rows. SAELens drops short sequences
            instead; here they are padded and the padding is masked out. Part of a cache's
            identity, with ``prepend_bos`` and ``chat_template_kwargs``.
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
    chat_template_kwargs: dict[str, Any] | None = dict_field(default=None)
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


def _sae_config(
    sae: TrainingSAEConfig | dict[str, Any] | None, architecture: str | None = None
) -> TrainingSAEConfig:
    """The ``sae:`` section as its architecture's ``TrainingSAEConfig``: a config is returned as
    is; a mapping is checked (architecture registered, no unknown or missing field) and built.
    ``architecture`` overrides the mapping's own ``architecture`` key."""
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
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of field: value.")
    return data


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
        **to("sae_diff.training.validation", ("DIFF_ARCHITECTURES", "check_organism")),
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
    "CROSSCODER_ARCHITECTURES",
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
