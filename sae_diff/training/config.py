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
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig, dict_field
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAEConfig

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.errors import SaeDiffError

STORE_MODES: tuple[str, ...] = ("paired", "diff", "base", "ft")
CROSSCODER_ARCHITECTURES: frozenset[str] = frozenset({
    "crosscoder", "batchtopk_crosscoder", "jumprelu_crosscoder", "shared_crosscoder",
    "shared_batchtopk_crosscoder", "dedicated_batchtopk_crosscoder", "cross_architecture_crosscoder",
})
DIFF_ARCHITECTURES: frozenset[str] = frozenset({"batchtopk_diff_sae"})
BACKENDS: tuple[str, ...] = ("auto", "hooked", "bridge")


class ConfigError(SaeDiffError, ValueError):
    """A training config is invalid; the message names the field and the fix."""


#: the one statement of the BatchTopK k bound, used by every message about it
K_BOUND = "0 < k <= d_sae"


def did_you_mean(name: str, candidates: Any, prefix: str = "") -> str:
    """`` (did you mean X?)`` for the closest candidate by edit distance, else ``""``.

    ``_``/``-`` are ignored, so ``training-tokens`` finds ``training_tokens``; typos
    (``trainig_tokens``, ``batchtopk_crossocder``) are found by ``difflib``'s ratio."""
    import difflib

    def norm(s: str) -> str:
        return s.lstrip("-").replace("-", "_").lower()

    by_norm = {norm(str(c)): str(c) for c in candidates}
    hit = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.75)
    return f" (did you mean {prefix}{by_norm[hit[0]]}?)" if hit else ""


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
    model_backend: str = "auto"
    store_mode: str = "auto"
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
        d["smoke_test_models"] = None if self.smoke_test_models is None else asdict(self.smoke_test_models)
        d["seqpos_slice"] = list(self.seqpos_slice)
        return d

    @classmethod
    def from_dict(cls, cfg_dict: dict[str, Any]) -> PairedRunnerConfig:
        """Inverse of :meth:`to_dict` (checkpoint path kept as saved, not re-suffixed)."""
        return config_from_dict(cfg_dict, keep_checkpoint_path=True)


# ---------------------------------------------------------------------- organisms
@dataclass(frozen=True)
class OrganismInfo:
    """What a config needs to know about a bundled organism, read from its ``config.json``
    (no weights loaded, no checksums verified: ``load_organism`` does that when training).

    Attributes:
        name: the name or directory given in the config.
        path: the organism's directory.
        base_name, ft_name: the pair's names (recorded in the dictionary's metadata).
        recommended_hook: where its planted differences are clearest.
        dims: ``n_layers``, ``d_model``, ``d_mlp``, ``d_vocab``, ``n_ctx``.
    """

    name: str
    path: Path
    base_name: str
    ft_name: str
    recommended_hook: str
    dims: dict[str, int]


def organism_info(name: str) -> OrganismInfo:
    """Describe the organism ``name`` (a shipped name or a directory made by
    ``python -m sae_diff.organisms.build``) without loading it.

    Raises :class:`ConfigError` listing the shipped organisms when ``name`` is neither.
    """
    from sae_diff.organisms.organism import available_organisms, organism_dir

    try:
        path = organism_dir(name)
    except FileNotFoundError:
        raise ConfigError(
            f"organism={name!r} is not a bundled organism; available: {available_organisms()} "
            "(or give a directory built with `python -m sae_diff.organisms.build --out DIR`)."
        ) from None
    try:
        conf = json.loads((path / "config.json").read_text())
        model = conf["model"]
        dims = {k: int(model[k]) for k in ("n_layers", "d_model", "d_mlp", "d_vocab", "n_ctx")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"organism {name!r} at {path} has no readable config.json with model sizes: {e}") from e
    return OrganismInfo(
        name=str(name), path=path,
        base_name=str(conf.get("base_name", "organism-base")),
        ft_name=str(conf.get("ft_name", "organism-ft")),
        recommended_hook=str(conf.get("recommended_hook", "blocks.2.hook_resid_pre")),
        dims=dims,
    )


def resolve_names(cfg: PairedRunnerConfig) -> None:
    """Fill what the config leaves empty: with ``organism``, the pair's names and the
    recommended hook; with ``smoke_test_models``, ``smoke-ft``. Then require ``model_name``
    and ``hook_name`` (runs before SAELens's own ``__post_init__``)."""
    if cfg.organism is not None:
        if cfg.smoke_test_models is not None:
            raise ConfigError("organism and smoke_test_models both name a model pair; keep one of them.")
        info = organism_info(cfg.organism)
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


def check_organism(cfg: PairedRunnerConfig, info: OrganismInfo) -> None:
    """Organism-specific checks: a known-width hook of a layer it has, ``d_in`` its width,
    rows that fit its context, a valid chat share."""
    hook = cfg.hook_name
    known = (_RESID.match(hook) or hook in ("hook_embed", "hook_pos_embed")
             or re.match(r"^blocks\.\d+\.mlp\.hook_(pre|post)$", hook))
    if not known:
        raise ConfigError(
            f"hook_name {hook!r} is not a hook sae_diff can train on in organism {info.name!r}: use "
            "blocks.<layer>.hook_resid_pre / hook_resid_mid / hook_resid_post / hook_attn_out / "
            f"hook_mlp_out / mlp.hook_post with layer in 0..{info.dims['n_layers'] - 1} "
            f"(recommended: {info.recommended_hook})."
        )
    check_hook_d_in(hook, cfg.sae.d_in, info.dims)
    if cfg.context_size > info.dims["n_ctx"]:
        raise ConfigError(
            f"context_size={cfg.context_size} exceeds organism {info.name!r}'s context of "
            f"{info.dims['n_ctx']} tokens; set context_size <= {info.dims['n_ctx']}."
        )
    if not 0.0 <= cfg.organism_chat_share <= 1.0:
        raise ConfigError(f"organism_chat_share={cfg.organism_chat_share} must be in [0, 1] (token share of chat).")
    if cfg.organism_n_documents is not None and cfg.organism_n_documents < 1:
        raise ConfigError(f"organism_n_documents={cfg.organism_n_documents} must be >= 1 or null (as many as needed).")


def default_store_mode(architecture: str) -> str:
    """``paired`` for crosscoders, ``diff`` for diff-SAEs, ``ft`` (a chat-SAE) otherwise."""
    if architecture in CROSSCODER_ARCHITECTURES:
        return "paired"
    if architecture in DIFF_ARCHITECTURES:
        return "diff"
    return "ft"


# ---------------------------------------------------------------------- validation
_RESID = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def validate_config(cfg: PairedRunnerConfig) -> None:
    """Checks that need no model or data; each error names the field and how to fix it."""
    arch = cfg.architecture
    if cfg.store_mode not in STORE_MODES:
        raise ConfigError(f"store_mode={cfg.store_mode!r} is not one of {list(STORE_MODES)} (or 'auto').")
    if cfg.model_backend not in BACKENDS:
        raise ConfigError(f"model_backend={cfg.model_backend!r} is not one of {list(BACKENDS)}.")
    if cfg.organism is not None:
        check_organism(cfg, organism_info(cfg.organism))
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
    if arch not in CROSSCODER_ARCHITECTURES | DIFF_ARCHITECTURES and cfg.store_mode not in ("base", "ft"):
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
        raise ConfigError(f"mask_high_norm={cfg.mask_high_norm} must be > 1 (times the median norm) or null.")
    if cfg.cache_dtype is not None and cfg.cache_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"cache_dtype={cfg.cache_dtype!r} is not a storage dtype; use float32, bfloat16 or "
                          "float16 (or null for the models' dtype).")
    if cfg.cache_rows_per_shard < 1:
        raise ConfigError(f"cache_rows_per_shard must be >= 1, got {cfg.cache_rows_per_shard}.")
    if cfg.hook_head_index is not None:
        raise ConfigError("hook_head_index is not supported for pairs; use a hook without a head index.")
    # --- hook vs d_in, when the model's dimensions are known without loading it
    dims = known_model_dims(cfg)
    if dims is not None:
        check_hook_d_in(cfg.hook_name, cfg.sae.d_in, dims)
        if dims.get("n_ctx") and cfg.context_size > dims["n_ctx"]:
            raise ConfigError(
                f"context_size={cfg.context_size} exceeds the base model's context of "
                f"{dims['n_ctx']} tokens (max_position_embeddings in its config.json); set "
                f"context_size <= {dims['n_ctx']}."
            )
    if cfg.smoke_test_models is None and cfg.organism is None and not (
            cfg.dataset_path or cfg.dataset_mixture or cfg.cache_path):
        raise ConfigError("Set dataset_path (a Hugging Face dataset or local files), dataset_mixture or cache_path "
                          "(or organism, to train on a bundled model organism and its data).")
    if cfg.dataset_mixture is not None:
        from sae_diff.data.sources import DatasetSpec

        spec_fields = {f.name for f in fields(DatasetSpec)}
        for i, spec in enumerate(cfg.dataset_mixture):
            if not isinstance(spec, dict) or "path" not in spec:
                raise ConfigError(f"dataset_mixture[{i}] must be a mapping with at least `path`, got {spec!r}.")
            bad = sorted(set(spec) - spec_fields)
            if bad:
                raise ConfigError(f"dataset_mixture[{i}] has unknown key(s) {bad}; valid: {sorted(spec_fields)}.")


def check_hook_d_in(hook_name: str, d_in: int, dims: dict[str, int]) -> None:
    """Raise unless ``d_in`` is the width of ``hook_name`` in a model of dimensions ``dims``
    (keys ``n_layers``, ``d_model`` and optionally ``d_mlp``)."""
    m = _BLOCK.match(hook_name)
    if m and int(m.group(1)) >= dims["n_layers"]:
        raise ConfigError(
            f"hook_name {hook_name!r} names layer {m.group(1)}, but the model has "
            f"{dims['n_layers']} layers (0..{dims['n_layers'] - 1})."
        )
    expected: int | None = None
    if _RESID.match(hook_name) or hook_name in ("hook_embed", "hook_pos_embed"):
        expected = dims["d_model"]
    elif hook_name.endswith(("mlp.hook_post", "mlp.hook_pre")) and "d_mlp" in dims:
        expected = dims["d_mlp"]
    if expected is not None and d_in != expected:
        raise ConfigError(
            f"sae.d_in={d_in} does not match hook {hook_name!r}, which is {expected} wide in "
            f"this model. Set sae.d_in: {expected}."
        )


#: Dimensions of the recipe models, used only when their ``config.json`` is neither a local
#: folder nor in the Hugging Face cache (``--dry-run`` on a machine that never downloaded them).
KNOWN_MODEL_DIMS: dict[str, dict[str, int]] = {
    "google/gemma-2-2b": {"n_layers": 26, "d_model": 2304, "d_mlp": 9216, "d_vocab": 256000, "n_ctx": 8192},
    "google/gemma-2-2b-it": {"n_layers": 26, "d_model": 2304, "d_mlp": 9216, "d_vocab": 256000, "n_ctx": 8192},
    "gemma-2-2b": {"n_layers": 26, "d_model": 2304, "d_mlp": 9216, "d_vocab": 256000, "n_ctx": 8192},
    "gemma-2-2b-it": {"n_layers": 26, "d_model": 2304, "d_mlp": 9216, "d_vocab": 256000, "n_ctx": 8192},
    "gpt2": {"n_layers": 12, "d_model": 768, "d_mlp": 3072, "d_vocab": 50257, "n_ctx": 1024},
}


def model_config_dir(name: str | None, revision: str | None = None) -> str | None:
    """A folder holding ``config.json`` for ``name`` without touching the network: ``name``
    itself when it is a local Hugging Face folder, else its snapshot in the Hugging Face cache
    (None when neither exists)."""
    if not name:
        return None
    if (Path(name) / "config.json").is_file():
        return name
    if Path(name).exists() or name.count("/") > 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # an invalid repo id, or no cache: nothing known offline
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def _config_dims(name: str | None, revision: str | None = None) -> dict[str, int] | None:
    from sae_diff.pairing.backends import read_model_info
    from sae_diff.pairing.errors import PairingError

    folder = model_config_dir(name, revision)
    if folder is None:
        return None
    try:
        dims = read_model_info(folder).dims()
    except PairingError:
        return None
    return dims if "n_layers" in dims and "d_model" in dims else None


def known_model_dims(cfg: PairedRunnerConfig) -> dict[str, int] | None:
    """The base model's dimensions (``n_layers``, ``d_model``, ``d_mlp``, ``d_vocab``,
    ``n_ctx``) if known without loading weights or using the network: the organism's
    ``config.json``, the smoke-test spec, the base model's ``config.json`` (a local folder or
    the Hugging Face cache), or else the built-in table of recipe models."""
    if cfg.organism is not None:
        return dict(organism_info(cfg.organism).dims)
    s = cfg.smoke_test_models
    if s is not None:
        return {"n_layers": s.n_layers, "d_model": s.d_model, "d_mlp": 4 * s.d_model, "d_vocab": s.d_vocab}
    name = cfg.base_model_name
    dims = _config_dims(name)
    if dims is not None:
        return dims
    if name in KNOWN_MODEL_DIMS:
        return dict(KNOWN_MODEL_DIMS[name])
    return None


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
            "sae.architecture is missing. Choose one of: " + ", ".join(sorted(SAE_TRAINING_CLASS_REGISTRY)) + "."
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
        raise ConfigError(f"Unknown field(s) {unknown} for architecture {arch!r}{hint}; valid: {sorted(names)}.")
    for required in ("d_in", "d_sae"):
        if required not in sae:
            raise ConfigError(f"sae.{required} is required.")
    sae.pop("metadata", None)
    try:
        return cfg_cls(**sae)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Invalid sae config for {arch!r}: {e}") from e


def config_from_dict(d: dict[str, Any], *, keep_checkpoint_path: bool = False) -> PairedRunnerConfig:
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
@dataclass
class Plan:
    """What a run will do, resolved from a config without loading anything."""

    architecture: str
    inference_architecture: str
    base_model: str
    ft_model: str
    hook_name: str
    store_mode: str
    d_in: int
    d_sae: int
    k: float | None
    training_tokens: int
    train_batch_size_tokens: int
    total_steps: int
    n_checkpoints: int
    n_parameters: int
    dictionary_bytes: int
    training_memory_bytes: int
    activation_bytes_per_token: int
    cache_bytes: int
    cache_path: str | None
    output_path: str | None
    checkpoint_path: str | None
    checkpoint_bytes: int
    device: str
    dtype: str
    model_dims: dict[str, int] | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """Human-readable plan, one item per line."""

        def size(n: float) -> str:
            for unit in ("B", "KB", "MB", "GB", "TB"):
                if abs(n) < 1024 or unit == "TB":
                    return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
                n /= 1024
            return f"{n:.1f} TB"

        lines = [
            f"architecture     {self.architecture} (saved as {self.inference_architecture})",
            f"models           base={self.base_model}  ft={self.ft_model}",
            f"hook             {self.hook_name}  (store mode: {self.store_mode})",
            f"d_in / d_sae     {self.d_in} / {self.d_sae}  (expansion {self.d_sae / self.d_in:g})",
            f"k                {self.k if self.k is not None else '-'}",
            f"tokens           {self.training_tokens:,} in {self.total_steps:,} steps of {self.train_batch_size_tokens:,}",
            f"parameters       {self.n_parameters:,} ({size(self.dictionary_bytes)} in {self.dtype})",
            f"memory (train)   ~{size(self.training_memory_bytes)} on {self.device} for the dictionary, "
            "Adam state and one batch (models not included)",
            f"disk (cache)     {size(self.cache_bytes)} at {self.cache_path}" if self.cache_path
            else f"disk (cache)     none: harvested on the fly ({size(self.activation_bytes_per_token)}/token)",
            f"disk (ckpts)     {self.n_checkpoints} x {size(self.checkpoint_bytes)} under {self.checkpoint_path}",
            f"output           {self.output_path}",
        ]
        if self.model_dims:
            lines.append("model dims       " + ", ".join(f"{k}={v}" for k, v in self.model_dims.items()))
        lines += [f"note             {n}" for n in self.notes]
        return "\n".join(lines)


#: TransformerLens hook names inside a block (``blocks.L.<name>``) and outside blocks, for the
#: dry-run's spelling check (the models' own ``hook_dict`` decides when they load).
BLOCK_HOOKS = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in",
    "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_attn_scores",
    "attn.hook_pattern", "attn.hook_result", "attn.hook_rot_q", "attn.hook_rot_k",
    "mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear",
)
GLOBAL_HOOKS = ("hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized")


def check_hook_name(hook_name: str, n_layers: int | None) -> str | None:
    """Raise for a hook that cannot exist in a model of ``n_layers`` blocks or that is a
    misspelling of a standard TransformerLens hook; return a note for a non-standard name
    (it is checked against the models' hooks when they load), else None."""
    import difflib

    m = _BLOCK.match(hook_name)
    if m:
        layer, rest = int(m.group(1)), hook_name[m.end():]
        if n_layers is not None and layer >= n_layers:
            raise ConfigError(
                f"hook_name {hook_name!r} names layer {layer}, but the model has {n_layers} "
                f"layers (0..{n_layers - 1}, from its config.json). Pick a layer below {n_layers}, "
                f"e.g. blocks.{n_layers // 2}.{rest}."
            )
        if rest in BLOCK_HOOKS:
            return None
        close = difflib.get_close_matches(rest, BLOCK_HOOKS, n=1, cutoff=0.75)
        if close:
            raise ConfigError(
                f"hook_name {hook_name!r} is not a TransformerLens hook; did you mean "
                f"'blocks.{layer}.{close[0]}'?"
            )
        return f"hook {hook_name!r} is not a standard block hook: checked when the models load"
    if hook_name in GLOBAL_HOOKS:
        return None
    close = difflib.get_close_matches(hook_name, GLOBAL_HOOKS + tuple(f"blocks.0.{h}" for h in BLOCK_HOOKS),
                                      n=1, cutoff=0.75)
    if close:
        raise ConfigError(f"hook_name {hook_name!r} is not a TransformerLens hook; did you mean {close[0]!r}?")
    raise ConfigError(
        f"hook_name {hook_name!r} is not a TransformerLens hook name. Residual-stream hooks are "
        "'blocks.L.hook_resid_pre' / 'blocks.L.hook_resid_post' (L = layer)."
    )


def _dataset_spec_dicts(cfg: PairedRunnerConfig) -> list[dict[str, Any]]:
    if cfg.dataset_mixture:
        return [dict(d) for d in cfg.dataset_mixture]
    if cfg.dataset_path:
        return [{"path": cfg.dataset_path, "column": cfg.dataset_column, "split": cfg.dataset_split}]
    return []


def _check_dataset_columns(cfg: PairedRunnerConfig, tok_ft: Any, d_vocab: int | None) -> list[str]:
    """Read the first row of each local dataset: its column exists and holds what its kind
    needs (chat data needs the ft tokenizer's chat template; token ids fit the vocabulary)."""
    from sae_diff.data.sources import DatasetSpec, detect_kind, load_rows

    notes: list[str] = []
    for d in _dataset_spec_dicts(cfg):
        keys = {f.name for f in fields(DatasetSpec)}
        spec = DatasetSpec(**{k: v for k, v in d.items() if k in keys and v is not None})
        path = Path(spec.path).expanduser()
        if not path.exists():
            notes.append(f"dataset {spec.path!r}: not a local path, its columns are checked when read")
            continue
        try:
            first = next(iter(load_rows(spec)), None)
        except Exception as e:  # a broken file: the data preflight names it in detail
            raise ConfigError(f"dataset {spec.path!r} cannot be read ({type(e).__name__}: {e}).") from e
        if first is None:
            raise ConfigError(f"dataset {spec.path!r} (split {spec.split!r}) has no rows.")
        try:
            kind, column = detect_kind(first, spec.kind, spec.column)
        except ValueError as e:
            raise ConfigError(
                f"dataset {spec.path!r}: {e}. Set dataset_column (or the mixture entry's `column`)."
            ) from e
        value = first[column]
        if kind == "chat":
            if not (isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                    for m in value)):
                raise ConfigError(
                    f"dataset {spec.path!r}: column {column!r} must hold chat messages "
                    "([{role: ..., content: ...}, ...]); the first row holds "
                    f"{type(value).__name__}."
                )
            if tok_ft is not None and not getattr(tok_ft, "chat_template", None):
                raise ConfigError(
                    f"dataset {spec.path!r} holds chat messages, but the ft tokenizer has no chat "
                    "template. Use the fine-tune's own tokenizer folder (model_name / "
                    "ft_weights_path), or text data."
                )
        if kind == "tokens" and d_vocab and isinstance(value, list) and value and max(value) >= d_vocab:
            raise ConfigError(
                f"dataset {spec.path!r}: token id {max(value)} in column {column!r} is outside the "
                f"model's vocabulary of {d_vocab}; the data was tokenized for another model."
            )
        notes.append(f"dataset {spec.path!r}: {kind} data in column {column!r}")
    return notes


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def preflight_checks(cfg: PairedRunnerConfig) -> list[str]:
    """What ``--dry-run`` checks from configuration files and tokenizers alone (no weights).

    Both ``config.json`` (equal ``n_layers`` / ``d_model`` / ``vocab_size``), the hook against
    the architecture, ``sae.d_in`` against ``d_model``, ``context_size`` against
    ``max_position_embeddings``, the backend and loading options, tokenizer compatibility
    (vocabulary, merges, normaliser; configuration differences are noted) and each local
    dataset's column. Models only on the Hub (not cached) are noted, not fetched.

    Returns:
        Notes for the plan. Raises :class:`ConfigError` naming the problem and the fix.
    """
    from sae_diff.pairing import backends as bk
    from sae_diff.pairing.checks import check_config_dims, check_tokenizers
    from sae_diff.pairing.errors import PairingError

    notes: list[str] = []
    if cfg.organism is not None or cfg.smoke_test_models is not None:
        note = check_hook_name(cfg.hook_name, (known_model_dims(cfg) or {}).get("n_layers"))
        return [note] if note else []
    ft_name = cfg.ft_weights_path or cfg.model_name
    infos: dict[str, Any] = {}
    for role, name in (("base", cfg.base_model_name), ("ft", ft_name)):
        folder = model_config_dir(name)
        if folder is None:
            notes.append(f"{role} model {name!r}: config.json not available offline, checked when it loads")
            continue
        try:
            infos[role] = bk.read_model_info(folder)
        except PairingError as e:
            raise ConfigError(f"{role} model {name!r}: {e}") from e
    info_b = infos.get("base")
    try:
        if len(infos) == 2:
            check_config_dims(infos["base"], infos["ft"])
    except PairingError as e:
        raise ConfigError(str(e)) from e
    note = check_hook_name(cfg.hook_name, info_b.n_layers if info_b else None)
    if note:
        notes.append(note)
    if info_b is not None:
        dims = info_b.dims()
        check_hook_d_in(cfg.hook_name, cfg.sae.d_in, dims)
        if dims.get("n_ctx") and cfg.context_size > dims["n_ctx"]:
            raise ConfigError(
                f"context_size={cfg.context_size} exceeds {cfg.base_model_name!r}'s context of "
                f"{dims['n_ctx']} tokens (max_position_embeddings); set context_size <= {dims['n_ctx']}."
            )
        try:
            backend = bk.choose_backend(cfg.model_backend, info_b)
            opts = bk.translate_options(backend, dict(cfg.base_model_from_pretrained_kwargs
                                                      or cfg.model_from_pretrained_kwargs or {}))
        except PairingError as e:
            raise ConfigError(f"{e} (model_backend / model_from_pretrained_kwargs)") from e
        notes.append(f"backend: {backend} for {info_b.architecture or info_b.model_type}")
        notes += opts.notes
    tokenizers: dict[str, Any] = {}
    for role, name in (("base", cfg.base_model_name), ("ft", ft_name)):
        folder = model_config_dir(name)
        if folder is None:
            continue
        if not any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES):
            # transformers would build an empty tokenizer for some model types: do not check that
            notes.append(f"{role} model {name!r}: no tokenizer files next to config.json, checked when it loads")
            continue
        try:
            from transformers import AutoTokenizer

            tokenizers[role] = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # unreadable tokenizer files
            raise ConfigError(
                f"{role} tokenizer of {name!r} cannot be loaded ({type(e).__name__}: {e}). Check the "
                "tokenizer files in the model folder."
            ) from e
    if len(tokenizers) == 2:
        try:
            diffs = check_tokenizers(tokenizers["base"], tokenizers["ft"], warn=False)
        except PairingError as e:
            raise ConfigError(str(e)) from e
        if diffs:
            notes.append("tokenizers compatible; configured differently (the ft tokenizer is used): "
                         + "; ".join(diffs))
        else:
            notes.append("tokenizers identical")
    tok_ft = tokenizers.get("ft")
    if tok_ft is not None and cfg.prepend_bos is True and getattr(tok_ft, "bos_token_id", None) is None:
        raise ConfigError(
            f"prepend_bos: true, but the tokenizer of {ft_name!r} has no BOS token (a model such as "
            "Qwen is trained without one). Remove prepend_bos (it then follows the tokenizer) or set "
            "it to false."
        )
    notes += _check_dataset_columns(cfg, tokenizers.get("ft"), info_b.d_vocab if info_b else None)
    return notes


def make_plan(cfg: PairedRunnerConfig) -> Plan:
    """Resolve ``cfg`` into a :class:`Plan` (sizes and estimates), loading nothing."""
    from sae_lens.util import str_to_dtype

    sae = cfg.sae
    n_models = 2 if cfg.is_crosscoder else 1
    d_in, d_sae = sae.d_in, sae.d_sae
    n_params = 2 * n_models * d_in * d_sae + d_sae + n_models * d_in
    itemsize = str_to_dtype(sae.dtype).itemsize
    dict_bytes = n_params * itemsize
    act_itemsize = str_to_dtype(cfg.dtype).itemsize
    per_token = (2 if cfg.store_mode == "paired" else 1) * d_in * act_itemsize
    # caches hold both models (modes are views), stored in cache_dtype (default: the models' dtype)
    cache_per_token = 2 * d_in * str_to_dtype(cfg.cache_dtype or cfg.dtype).itemsize
    batch = cfg.train_batch_size_tokens
    # weights + grads + 2 Adam moments, plus the batch, codes and reconstruction
    train_mem = 4 * dict_bytes + batch * (2 * per_token + 2 * d_sae * 4)
    notes: list[str] = preflight_checks(cfg)
    dims = known_model_dims(cfg)
    if dims is None:
        notes.append(f"dimensions of {cfg.base_model_name!r} unknown offline: d_in is checked when it loads")
    if cfg.organism is not None:
        if cfg.dataset_path or cfg.dataset_mixture:
            data = "the configured dataset(s)"
        else:
            share = cfg.organism_chat_share
            data = f"its pretraining text + chat ({1 - share:.0%} / {share:.0%} of tokens)"
        notes.append(f"organism {cfg.organism!r} (bundled, CPU-sized): {data}")
    if cfg.smoke_test_models is not None:
        notes.append("smoke-test config: tiny random models and random tokens (not a real run)")
    inf_arch = sae.get_inference_config_class().architecture()
    return Plan(
        architecture=cfg.architecture,
        inference_architecture=inf_arch,
        base_model=cfg.base_model_name or "smoke-test base",
        ft_model=cfg.model_name,
        hook_name=cfg.hook_name,
        store_mode=cfg.store_mode,
        d_in=d_in,
        d_sae=d_sae,
        k=getattr(sae, "k", None),
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=batch,
        total_steps=cfg.total_training_steps,
        n_checkpoints=cfg.n_checkpoints,
        n_parameters=n_params,
        dictionary_bytes=dict_bytes,
        training_memory_bytes=int(train_mem),
        activation_bytes_per_token=per_token,
        cache_bytes=int(math.ceil(cfg.training_tokens * cache_per_token)) if cfg.cache_path else 0,
        cache_path=cfg.cache_path,
        output_path=cfg.output_path,
        checkpoint_path=cfg.checkpoint_path,
        checkpoint_bytes=3 * dict_bytes,
        device=cfg.device,
        dtype=sae.dtype,
        model_dims=dims,
        notes=notes,
    )


__all__ = [
    "BACKENDS",
    "STORE_MODES",
    "ConfigError",
    "OrganismInfo",
    "PairedRunnerConfig",
    "Plan",
    "SmokeTestModels",
    "check_hook_d_in",
    "check_hook_name",
    "config_flags_help",
    "config_from_dict",
    "default_store_mode",
    "known_model_dims",
    "make_plan",
    "model_config_dir",
    "preflight_checks",
    "organism_info",
    "parse_config",
    "read_config_file",
    "resolve_names",
    "validate_config",
]


# ---------------------------------------------------------------------- config file + flags
def _cli_dataclass(sae_cls: type[TrainingSAEConfig]) -> type:
    """A flag-parsing twin of :class:`PairedRunnerConfig` with a concrete ``sae`` type and no
    ``__post_init__`` (the real config is built once, from the merged values)."""
    from dataclasses import make_dataclass

    return make_dataclass(
        "PairedRunnerFlags",
        [("sae", sae_cls, field(default=None))],  # type: ignore[arg-type]
        bases=(PairedRunnerConfig,),
        namespace={"__post_init__": lambda self: None},
    )


def parse_config(config_path: str | Path | None, args: list[str] | None = None,
                 architecture: str | None = None, keep_checkpoint_path: bool = False) -> PairedRunnerConfig:
    """Build a config from a YAML/JSON file (optional) and SAELens-style flags.

    Flags override the file: ``--lr 1e-4 --k 64 --training_tokens 1_000_000`` (fields of the
    ``sae`` section use their own names, e.g. ``--d_sae``; where a name exists at both levels
    the sae one is ``--sae.dtype``). ``architecture`` (the ``--architecture`` flag) overrides
    ``sae.architecture``. ``keep_checkpoint_path``: a saved run's config (no new run id).
    """

    base: dict[str, Any] = read_config_file(config_path) if config_path is not None else {}
    sae_dict = dict(base.get("sae") or {})
    arch = architecture or sae_dict.get("architecture")
    if arch is None:
        raise ConfigError("No architecture: give --architecture NAME or sae.architecture in the config file.")
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        _sae_config({"architecture": arch})  # raises the unknown-architecture error
    sae_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    file_arch = sae_dict.pop("architecture", None)
    sae_dict.pop("metadata", None)  # a saved run's metadata: the runner rebuilds it
    extra = sorted(set(sae_dict) - {f.name for f in fields(sae_cls)} - {"metadata"})
    if extra:
        if file_arch is not None and file_arch != arch:
            import warnings

            warnings.warn(f"--architecture {arch} replaces {file_arch}: ignoring the file's sae fields {extra}, "
                          f"which {arch} does not have.", stacklevel=2)
            sae_dict = {k: v for k, v in sae_dict.items() if k not in extra}
        else:
            valid = sorted(f.name for f in fields(sae_cls))
            hint = "".join(did_you_mean(u, valid, "sae.") for u in extra)
            raise ConfigError(f"Unknown field(s) {extra} for architecture {arch!r}{hint}; valid: {valid}.")
    defaults = {k: v for k, v in base.items() if k not in ("sae", "tokens_per_buffer")}
    unknown = sorted(set(defaults) - {f.name for f in fields(PairedRunnerConfig)})
    if unknown:
        config_from_dict({**base, "sae": {"architecture": arch, **sae_dict}})  # raises with hints
    defaults["sae"] = sae_dict
    if isinstance(defaults.get("seqpos_slice"), list):
        defaults["seqpos_slice"] = tuple(defaults["seqpos_slice"])
    parser = _flags_parser(sae_cls, defaults)
    try:
        ns, rest = parser.parse_known_args(list(args or []))
    except SystemExit as e:  # argparse errors exit; turn them into a config error
        raise ConfigError(f"Could not parse the flags {args}: see the message above.") from e
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass rejected a flag's value (e.g. k > d_sae)
        raise ConfigError(f"Invalid flag value: {e}") from e
    if rest:
        known = [f.name for f in fields(PairedRunnerConfig)] + [f.name for f in fields(sae_cls)]
        hint = "".join(did_you_mean(r.split("=")[0], known, "--") for r in rest if r.startswith("-"))
        raise ConfigError(f"Unrecognised flag(s) {rest}{hint}. `sae-diff train --help` lists the flags.")
    flat = ns.cfg
    values = {f.name: getattr(flat, f.name) for f in fields(PairedRunnerConfig)}
    sae_obj = values.pop("sae")
    sae_values = {f.name: getattr(sae_obj, f.name) for f in fields(sae_cls)}
    sae_values.pop("metadata", None)
    values["sae"] = {"architecture": arch, **sae_values}
    return config_from_dict(values, keep_checkpoint_path=keep_checkpoint_path)


def _flags_parser(sae_cls: type[TrainingSAEConfig], defaults: dict[str, Any] | None = None,
                  add_help: bool = False) -> Any:
    from simple_parsing import ArgumentParser

    parser = ArgumentParser(prog="sae-diff train", add_help=add_help, exit_on_error=False)
    parser.add_arguments(_cli_dataclass(sae_cls), dest="cfg")
    if defaults is not None:
        parser.set_defaults(cfg=defaults)
    return parser


def config_flags_help(config_path: str | Path | None = None, architecture: str | None = None) -> str:
    """Every config flag for the architecture of ``config_path`` (or ``architecture``), with
    its help text and current default (the file's value where it sets one)."""
    base: dict[str, Any] = read_config_file(config_path) if config_path is not None else {}
    sae_dict = dict(base.get("sae") or {})
    arch = architecture or sae_dict.pop("architecture", None) or "batchtopk_crosscoder"
    sae_dict.pop("architecture", None)
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        _sae_config({"architecture": arch})
    defaults = {k: v for k, v in base.items() if k not in ("sae", "tokens_per_buffer")}
    defaults["sae"] = {"d_in": 1, "d_sae": 2, **sae_dict}
    import contextlib
    import io

    parser = _flags_parser(SAE_TRAINING_CLASS_REGISTRY[arch][1], defaults, add_help=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        parser.parse_known_args(["--help"])  # simple_parsing adds its arguments while parsing
    head = (f"Config flags for architecture {arch!r} (defaults: "
            f"{'the values in ' + str(config_path) if config_path else 'SAELens / sae_diff defaults'}).\n"
            "Pass them after the subcommand, e.g. `sae-diff train --config FILE --lr 1e-4 --k 64`.\n")
    return head + buf.getvalue()
