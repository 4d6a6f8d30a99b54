"""Which TransformerLens backend loads a model, and what its loading options mean there.

Everything here reads configuration files only (``config.json`` through ``AutoConfig``, the
tokenizer files through ``AutoTokenizer``), never weights, so ``sae-diff train --dry-run`` can
use it too. Two rules:

- **The backend is chosen from** ``config.json`` (``architectures`` / ``model_type``), never
  from a folder or model name: a folder called ``my-llama-run`` holding a Qwen2 model is a
  Qwen2 model. ``"auto"`` picks TransformerLens 3's ``TransformerBridge`` whenever it supports
  the architecture (raw Hugging Face numerics, so activations equal the model's own forward and
  do not depend on which entry point loaded the pair), else ``HookedTransformer``.
- **Loading options are translated per backend.** SAELens and TransformerLens users pass
  ``HookedTransformer.from_pretrained`` options (SAELens's default
  ``model_from_pretrained_kwargs`` is ``{"center_writing_weights": False}``). For the bridge,
  the weight-processing options (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
  ``fold_value_biases``, ``refactor_factored_attn_matrices``) mean
  ``bridge.enable_compatibility_mode(...)`` when any is asked for (``True``); all ``False`` /
  absent means raw weights, which is what they ask for. Options with no bridge meaning are
  dropped with a one-line log note; options that would change the model and that the chosen
  backend cannot honour raise :class:`BackendOptionError`.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformer_lens import HookedTransformer
from transformer_lens.model_bridge import TransformerBridge

from sae_diff.pairing.errors import PairingError

logger = logging.getLogger(__name__)

BackendName = Literal["hooked", "bridge"]

#: HookedTransformer's weight-processing options and its defaults for them.
PROCESSING_DEFAULTS: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}
#: HookedTransformer options the bridge has no use for: sae_diff tokenizes itself (BOS follows
#: the tokenizer, see ``PairedModel.prepends_bos``) and places models with ``device``.
_BRIDGE_DROPPED = {
    "default_prepend_bos": "sae_diff tokenizes the data itself; BOS follows the tokenizer",
    "default_padding_side": "sae_diff passes attention masks instead of relying on padding side",
    "move_to_device": "the bridge is placed with `device`",
}
#: Options both backends take under the same name.
_SHARED = {"n_ctx", "n_devices", "checkpoint_index", "checkpoint_value"}
#: Bridge-only options (``TransformerBridge.boot_transformers``).
_BRIDGE_ONLY = {"hf_config_overrides", "device_map", "max_memory", "model_class"}
#: HookedTransformer-only options that change the model.
_HOOKED_ONLY = {"first_n_layers"}
#: Options of ``HookedTransformer.from_pretrained`` / the loader itself.
_HOOKED_KNOWN = set(PROCESSING_DEFAULTS) | set(_BRIDGE_DROPPED) | _SHARED | _HOOKED_ONLY


class BackendOptionError(PairingError):
    """A loading option the chosen backend cannot honour (the message names the fix)."""


@dataclass(frozen=True)
class ModelInfo:
    """What ``config.json`` says about a model (no weights read)."""

    name: str
    architectures: tuple[str, ...]
    model_type: str | None
    n_layers: int | None
    d_model: int | None
    d_mlp: int | None
    d_vocab: int | None
    max_position_embeddings: int | None
    is_local: bool

    @property
    def architecture(self) -> str | None:
        return self.architectures[0] if self.architectures else None

    def dims(self) -> dict[str, int]:
        """``n_layers`` / ``d_model`` / ``d_mlp`` / ``d_vocab`` / ``n_ctx`` that are known."""
        out = {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "d_vocab": self.d_vocab,
            "n_ctx": self.max_position_embeddings,
        }
        return {k: int(v) for k, v in out.items() if v}


#: A language model sae_diff runs: TransformerLens's ``HookedTransformer`` or TL 3's
#: ``TransformerBridge`` (for architectures HookedTransformer lacks).
LanguageModel = HookedTransformer | TransformerBridge


def is_bridge(model: object) -> bool:
    """True for a TransformerLens 3 ``TransformerBridge`` (no ``start_at_layer`` support)."""
    return isinstance(model, TransformerBridge)


def is_local_model_dir(name: str | os.PathLike[str]) -> bool:
    """A folder holding a Hugging Face ``config.json``."""
    return (Path(name) / "config.json").is_file()


def _first_int(cfg: Any, *names: str) -> int | None:
    for n in names:
        try:
            v = getattr(cfg, n, None)
        except Exception:  # transformers >= 5.15 per-layer fields raise on global reads
            v = None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def read_model_info(
    name_or_dir: str | os.PathLike[str],
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> ModelInfo:
    """Read ``config.json`` of a local folder or a (cached) Hub model. No weights are read.

    Raises:
        PairingError: no config could be read (the message says where it looked).
    """
    from transformers import AutoConfig

    name = str(name_or_dir)
    try:
        cfg = AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:
        raise PairingError(
            f"cannot read the model config of {name!r} ({type(e).__name__}: {e}). Give a local "
            "Hugging Face folder holding config.json, or a Hub id that is downloaded (or "
            "reachable)."
        ) from e
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return ModelInfo(
        name=name,
        architectures=tuple(getattr(cfg, "architectures", None) or ()),
        model_type=getattr(cfg, "model_type", None),
        n_layers=_first_int(text, "num_hidden_layers", "n_layer", "num_layers"),
        d_model=_first_int(text, "hidden_size", "n_embd", "d_model"),
        d_mlp=_first_int(text, "intermediate_size", "n_inner", "ffn_dim"),
        d_vocab=_first_int(text, "vocab_size"),
        max_position_embeddings=_first_int(
            text, "max_position_embeddings", "n_positions", "max_sequence_length"
        ),
        is_local=is_local_model_dir(name),
    )


def bridge_architecture(info: ModelInfo) -> str | None:
    """The TransformerBridge adapter name for this config, or None if unsupported."""
    from transformer_lens.model_bridge.sources.transformers import (
        determine_architecture_from_hf_config,
    )

    class _Cfg:  # the two fields the bridge's selector reads
        architectures = list(info.architectures)
        model_type = info.model_type

    try:
        return str(determine_architecture_from_hf_config(_Cfg()))
    except ValueError:
        return None


@functools.cache
def _neutral_link(path: str) -> str:
    """A symlink to ``path`` whose name carries no model family.

    TransformerLens's ``convert_hf_model_config`` picks Llama or Gemma code paths from
    substrings of the *name* ("llama", "gemma-2-") before it reads ``config.json``; loading a
    local folder through this link makes ``config.json`` the only thing that decides.
    """
    d = Path(tempfile.mkdtemp(prefix="sae_diff_model_"))
    link = d / "model"
    link.symlink_to(Path(path).resolve(), target_is_directory=True)
    return str(link)


def hooked_config_name(info: ModelInfo) -> str:
    """The name to give HookedTransformer's config conversion for this model."""
    return _neutral_link(info.name) if info.is_local else info.name


def hooked_supports(info: ModelInfo) -> bool:
    """Whether HookedTransformer can build this model (from ``config.json`` for local
    folders, from TransformerLens's official-name table otherwise)."""
    from transformer_lens import loading_from_pretrained as loading

    try:
        if info.is_local:
            loading.convert_hf_model_config(hooked_config_name(info))
        else:
            loading.get_official_model_name(info.name)
    except (ValueError, NotImplementedError, KeyError, AttributeError, TypeError, OSError):
        return False
    return True


def choose_backend(requested: str, info: ModelInfo) -> BackendName:
    """``"hooked"`` or ``"bridge"`` for ``requested`` in ``{"auto", "hooked", "bridge"}``.

    Raises:
        PairingError: neither backend (or not the requested one) supports the architecture.
    """
    if requested not in ("auto", "hooked", "bridge"):
        raise ValueError(f"backend must be 'auto', 'hooked' or 'bridge', got {requested!r}")
    arch = info.architecture or info.model_type
    if requested == "bridge":
        if bridge_architecture(info) is None:
            raise PairingError(
                f"TransformerBridge does not support {arch!r} (config.json of {info.name!r}). "
                "Try model_backend: hooked, or upgrade transformer-lens."
            )
        return "bridge"
    if requested == "hooked":
        if not hooked_supports(info):
            alt = " Use model_backend: bridge (or auto)." if bridge_architecture(info) else ""
            where = "from a local folder" if info.is_local else "under this name"
            raise PairingError(
                f"HookedTransformer cannot build {arch!r} {where} ({info.name!r}) in this "
                f"TransformerLens version.{alt}"
            )
        return "hooked"
    if bridge_architecture(info) is not None:
        return "bridge"
    if hooked_supports(info):
        return "hooked"
    raise PairingError(
        f"neither TransformerBridge nor HookedTransformer supports {arch!r} (config.json of "
        f"{info.name!r}, architectures={list(info.architectures)}, "
        f"model_type={info.model_type!r}). Pair models of an architecture TransformerLens knows."
    )


@dataclass
class LoadOptions:
    """Loading options translated for one backend."""

    backend: BackendName
    tl_kwargs: dict[str, Any] = field(default_factory=dict)  #: for the TL loader
    hf_kwargs: dict[str, Any] = field(default_factory=dict)  #: for AutoModelForCausalLM
    processing: dict[str, bool] | None = None  #: bridge: enable_compatibility_mode kwargs
    notes: list[str] = field(default_factory=list)


def translate_options(backend: BackendName, kwargs: dict[str, Any]) -> LoadOptions:
    """Split user loading options (HookedTransformer / SAELens vocabulary) for ``backend``.

    Unknown keys go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``),
    as ``HookedTransformer.from_pretrained`` forwards them.
    """
    out = LoadOptions(backend)
    kwargs = dict(kwargs)
    if backend == "hooked":
        bad = sorted(set(kwargs) & _BRIDGE_ONLY)
        if bad:
            raise BackendOptionError(
                f"option(s) {bad} exist only for TransformerBridge; remove them or use "
                "model_backend: bridge."
            )
        for k in list(kwargs):
            if k in _HOOKED_KNOWN:
                out.tl_kwargs[k] = kwargs.pop(k)
        out.hf_kwargs = kwargs
        return out
    bad = sorted(set(kwargs) & _HOOKED_ONLY)
    if bad:
        raise BackendOptionError(
            f"option(s) {bad} change the model and TransformerBridge cannot honour them; "
            "remove them or use model_backend: hooked."
        )
    given = {k: bool(kwargs.pop(k)) for k in list(kwargs) if k in PROCESSING_DEFAULTS}
    if any(given.values()):
        out.processing = {k: given.get(k, v) for k, v in PROCESSING_DEFAULTS.items()}
        out.notes.append(
            f"TransformerBridge: weight processing {given} applied with "
            "enable_compatibility_mode (HookedTransformer defaults for the rest)"
        )
    elif given:
        out.notes.append(
            f"TransformerBridge: {given} kept as raw Hugging Face weights (no processing)"
        )
    for k in list(kwargs):
        if k in _BRIDGE_DROPPED:
            out.notes.append(
                f"TransformerBridge: dropped {k}={kwargs.pop(k)!r} ({_BRIDGE_DROPPED[k]})"
            )
        elif k in _SHARED or k in _BRIDGE_ONLY:
            out.tl_kwargs[k] = kwargs.pop(k)
    out.hf_kwargs = kwargs
    return out


def log_notes(notes: list[str]) -> None:
    """One log line per translated / dropped option."""
    for n in notes:
        logger.info(n)


__all__ = [
    "LanguageModel",
    "is_bridge",
    "PROCESSING_DEFAULTS",
    "BackendOptionError",
    "LoadOptions",
    "ModelInfo",
    "bridge_architecture",
    "choose_backend",
    "hooked_config_name",
    "hooked_supports",
    "is_local_model_dir",
    "read_model_info",
    "translate_options",
]
