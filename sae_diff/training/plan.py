"""The dry-run: resolve a :class:`~sae_diff.training.config.PairedRunnerConfig` into a
:class:`Plan` (sizes, memory, disk, checkpoints) and run every check that needs only
configuration files and tokenizers (:func:`preflight_checks`), loading no weights.

``sae-diff train --dry-run`` prints :meth:`Plan.render`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sae_lens.util import str_to_dtype
from transformers import AutoTokenizer

from sae_diff.data.documents import DatasetSpec, detect_kind, load_rows
from sae_diff.pairing import backends as bk
from sae_diff.pairing.checks import check_config_dims, check_tokenizers
from sae_diff.pairing.errors import PairingError
from sae_diff.pairing.hooks import BLOCK_HOOKS, GLOBAL_HOOKS, split_block_hook
from sae_diff.training.config import PairedRunnerConfig
from sae_diff.training.errors import ConfigError
from sae_diff.training.model_info import check_hook_d_in, known_model_dims, model_config_dir


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
            f"disk (cache)     {size(self.cache_bytes)} at {self.cache_path}"
            if self.cache_path
            else f"disk (cache)     none: harvested on the fly ({size(self.activation_bytes_per_token)}/token)",
            f"disk (ckpts)     {self.n_checkpoints} x {size(self.checkpoint_bytes)} under {self.checkpoint_path}",
            f"output           {self.output_path}",
        ]
        if self.model_dims:
            lines.append(
                "model dims       " + ", ".join(f"{k}={v}" for k, v in self.model_dims.items())
            )
        lines += [f"note             {n}" for n in self.notes]
        return "\n".join(lines)


def check_hook_name(hook_name: str, n_layers: int | None) -> str | None:
    """Raise for a hook that cannot exist in a model of ``n_layers`` blocks or that is a
    misspelling of a standard TransformerLens hook; return a note for a non-standard name
    (it is checked against the models' hooks when they load), else None."""
    parts = split_block_hook(hook_name)
    if parts is not None:
        layer, rest = parts
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
    close = difflib.get_close_matches(
        hook_name, GLOBAL_HOOKS + tuple(f"blocks.0.{h}" for h in BLOCK_HOOKS), n=1, cutoff=0.75
    )
    if close:
        raise ConfigError(
            f"hook_name {hook_name!r} is not a TransformerLens hook; did you mean {close[0]!r}?"
        )
    raise ConfigError(
        f"hook_name {hook_name!r} is not a TransformerLens hook name. Residual-stream hooks are "
        "'blocks.L.hook_resid_pre' / 'blocks.L.hook_resid_post' (L = layer)."
    )


def _dataset_spec_dicts(cfg: PairedRunnerConfig) -> list[dict[str, Any]]:
    if cfg.dataset_mixture:
        return [dict(d) for d in cfg.dataset_mixture]
    if cfg.dataset_path:
        return [
            {"path": cfg.dataset_path, "column": cfg.dataset_column, "split": cfg.dataset_split}
        ]
    return []


def _check_dataset_columns(cfg: PairedRunnerConfig, tok_ft: Any, d_vocab: int | None) -> list[str]:
    """Read the first row of each local dataset: its column exists and holds what its kind
    needs (chat data needs the ft tokenizer's chat template; token ids fit the vocabulary)."""
    notes: list[str] = []
    for d in _dataset_spec_dicts(cfg):
        keys = {f.name for f in fields(DatasetSpec)}
        spec = DatasetSpec(**{k: v for k, v in d.items() if k in keys and v is not None})
        path = Path(spec.path).expanduser()
        if not path.exists():
            notes.append(
                f"dataset {spec.path!r}: not a local path, its columns are checked when read"
            )
            continue
        try:
            first = next(iter(load_rows(spec)), None)
        except Exception as e:  # a broken file: the data preflight names it in detail
            raise ConfigError(
                f"dataset {spec.path!r} cannot be read ({type(e).__name__}: {e})."
            ) from e
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
            if not (
                isinstance(value, list)
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
            ):
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
        if (
            kind == "tokens"
            and d_vocab
            and isinstance(value, list)
            and value
            and max(value) >= d_vocab
        ):
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
    notes: list[str] = []
    if cfg.organism is not None or cfg.smoke_test_models is not None:
        note = check_hook_name(cfg.hook_name, (known_model_dims(cfg) or {}).get("n_layers"))
        return [note] if note else []
    ft_name = cfg.ft_weights_path or cfg.model_name
    infos: dict[str, Any] = {}
    for role, name in (("base", cfg.base_model_name), ("ft", ft_name)):
        folder = model_config_dir(name)
        if folder is None:
            notes.append(
                f"{role} model {name!r}: config.json not available offline, checked when it loads"
            )
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
            opts = bk.translate_options(
                backend,
                dict(
                    cfg.base_model_from_pretrained_kwargs or cfg.model_from_pretrained_kwargs or {}
                ),
            )
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
            notes.append(
                f"{role} model {name!r}: no tokenizer files next to config.json, checked when it loads"
            )
            continue
        try:
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
            notes.append(
                "tokenizers compatible; configured differently (the ft tokenizer is used): "
                + "; ".join(diffs)
            )
        else:
            notes.append("tokenizers identical")
    tok_ft = tokenizers.get("ft")
    if (
        tok_ft is not None
        and cfg.prepend_bos is True
        and getattr(tok_ft, "bos_token_id", None) is None
    ):
        raise ConfigError(
            f"prepend_bos: true, but the tokenizer of {ft_name!r} has no BOS token (a model such as "
            "Qwen is trained without one). Remove prepend_bos (it then follows the tokenizer) or set "
            "it to false."
        )
    notes += _check_dataset_columns(cfg, tokenizers.get("ft"), info_b.d_vocab if info_b else None)
    return notes


def make_plan(cfg: PairedRunnerConfig) -> Plan:
    """Resolve ``cfg`` into a :class:`Plan` (sizes and estimates), loading nothing."""
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
        notes.append(
            f"dimensions of {cfg.base_model_name!r} unknown offline: d_in is checked when it loads"
        )
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
    "BLOCK_HOOKS",
    "GLOBAL_HOOKS",
    "Plan",
    "check_hook_name",
    "make_plan",
    "preflight_checks",
]
