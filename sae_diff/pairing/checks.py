"""Construction checks for a model pair: shapes, vocabularies, special tokens, hook names.

Each check raises :class:`~sae_diff.pairing.errors.PairingError` (or
:class:`~sae_diff.pairing.errors.HookNameError`) with a message that names the first
difference and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sae_diff.pairing.backends import LanguageModel
from sae_diff.pairing.errors import HookNameError, PairingError, PairingWarning
from sae_diff.pairing.hooks import stop_layer

SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def model_dims(model: LanguageModel) -> tuple[int, int, int]:
    """(n_layers, d_model, d_vocab) of a HookedTransformer or TransformerBridge."""
    cfg = model.cfg
    return int(cfg.n_layers), int(cfg.d_model), int(cfg.d_vocab)


def check_dims(base: LanguageModel, ft: LanguageModel) -> None:
    """Equal layer counts, residual widths and vocabulary sizes."""
    (bl, bd, bv), (fl, fd, fv) = model_dims(base), model_dims(ft)
    if bl != fl:
        raise PairingError(
            f"n_layers differ: base has {bl}, ft has {fl}. Model diffing needs the fine-tune "
            "to share the base architecture; load the ft weights with the base architecture "
            "(PairedModel.from_pretrained does this via hf_model=)."
        )
    if bd != fd:
        raise PairingError(
            f"d_model differs: base has {bd}, ft has {fd}. Pair a fine-tune with the base "
            "model it was trained from."
        )
    if bv != fv:
        raise PairingError(
            f"vocabulary sizes (d_vocab) differ: base {bv}, ft {fv}. A fine-tune that added "
            "tokens cannot be paired token-for-token; resize the base embedding or use the "
            "shared part of the vocabulary only."
        )


def check_config_dims(info_base: Any, info_ft: Any) -> None:
    """Equal layer counts, widths and vocabulary sizes read from both ``config.json`` (a
    :class:`~sae_diff.pairing.backends.ModelInfo` each), before any weight is loaded."""
    for attr, what in (
        ("n_layers", "n_layers"),
        ("d_model", "d_model (hidden_size)"),
        ("d_vocab", "vocab_size"),
    ):
        a, b = getattr(info_base, attr, None), getattr(info_ft, attr, None)
        if a is not None and b is not None and a != b:
            raise PairingError(
                f"config.json {what} differs: base {info_base.name!r} has {a}, ft "
                f"{info_ft.name!r} has {b}. Pair a fine-tune with the base model it was "
                "trained from (same architecture and vocabulary)."
            )


def _vocab(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def first_vocab_difference(
    tok_a: PreTrainedTokenizerBase, tok_b: PreTrainedTokenizerBase
) -> str | None:
    """Describe the first differing token id between two tokenizers, or None if equal."""
    va, vb = _vocab(tok_a), _vocab(tok_b)
    if va == vb:
        return None
    ia = {i: t for t, i in va.items()}
    ib = {i: t for t, i in vb.items()}
    for i in sorted(set(ia) | set(ib)):
        if ia.get(i) != ib.get(i):
            return f"id {i}: base has {ia.get(i)!r}, ft has {ib.get(i)!r}"
    return "the vocabularies map the same ids to different token strings"  # pragma: no cover


#: Text encoded by both tokenizers as a last check that they split text the same way.
_PROBE_TEXT = "Hello, world! 12345 The quick brown fox\n\tjumps over   the lazy dog. é ß 中文 🙂"


def _backend_json(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        return dict(json.loads(backend.to_str()))
    except (TypeError, ValueError):  # pragma: no cover - exotic backends
        return None


def encoding_difference(
    tok_base: PreTrainedTokenizerBase, tok_ft: PreTrainedTokenizerBase
) -> str | None:
    """What makes the two tokenizers *encode* text differently, or None if they agree.

    Compared: the vocabulary (every token string and id, added tokens included), the
    subword model (BPE merges / unigram scores / word-level table), the normaliser and the
    pre-tokeniser, and finally the ids of a probe text encoded without special tokens. Not
    compared: which tokens are *called* BOS/EOS/PAD/UNK, whether BOS is prepended
    (post-processor) and the chat template; those are configuration (see
    :func:`configuration_differences`).
    """
    diff = first_vocab_difference(tok_base, tok_ft)
    if diff is not None:
        return (
            f"the vocabularies differ (first differing id: {diff}; base vocab size "
            f"{len(_vocab(tok_base))}, ft {len(_vocab(tok_ft))})"
        )
    ja, jb = _backend_json(tok_base), _backend_json(tok_ft)
    if ja is not None and jb is not None:
        for part, what in (
            ("model", "subword model (merges / scores)"),
            ("normalizer", "normaliser"),
            ("pre_tokenizer", "pre-tokeniser"),
        ):
            if ja.get(part) != jb.get(part):
                return f"the {what} differs"
    try:
        ia = tok_base(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
        ib = tok_ft(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    except (TypeError, KeyError):  # pragma: no cover - not a HF tokenizer
        return None
    if list(ia) != list(ib):
        return f"they encode the probe text {_PROBE_TEXT!r} to different ids"
    return None


def prepended_bos_id(tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """The id the tokenizer itself puts before encoded text, or None when it adds none.

    Read from the tokenizer's behaviour (encode a probe with special tokens and look at the
    first id), not from ``bos_token``: Qwen declares no BOS, Phi-3 declares ``<s>`` but does
    not add it, and TransformerLens may set ``bos_token`` on its copy of a tokenizer that
    never prepends one.
    """
    if tokenizer is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
    except (TypeError, KeyError):  # pragma: no cover - not a HF tokenizer
        return None
    if len(with_special) > len(without) and with_special[0] == bos:
        return int(bos)
    return None


def _describe_token(tok: PreTrainedTokenizerBase, attr: str) -> str:
    tid = getattr(tok, attr, None)
    if tid is None:
        return "none"
    name = getattr(tok, attr.replace("_id", ""), None)
    return f"{name!s} ({tid})"


def configuration_differences(
    tok_base: PreTrainedTokenizerBase, tok_ft: PreTrainedTokenizerBase
) -> list[str]:
    """How the two (compatible) tokenizers are *configured* differently, one line each:
    BOS/EOS/PAD/UNK tokens, the set of special tokens, whether BOS is prepended, the chat
    template. Published base/instruct pairs differ here (e.g. Llama-3 base EOS
    ``<|end_of_text|>`` vs instruct ``<|eot_id|>``); none of it changes token ids."""
    out = []
    for attr in SPECIAL_TOKEN_ATTRS:
        a, b = getattr(tok_base, attr, None), getattr(tok_ft, attr, None)
        if a != b:
            out.append(
                f"{attr.replace('_id', '')}: base {_describe_token(tok_base, attr)}, "
                f"ft {_describe_token(tok_ft, attr)}"
            )
    sa = set(getattr(tok_base, "all_special_ids", []) or [])
    sb = set(getattr(tok_ft, "all_special_ids", []) or [])
    if sa != sb:
        out.append(f"special tokens: only base {sorted(sa - sb)}, only ft {sorted(sb - sa)}")
    pa, pb = prepended_bos_id(tok_base), prepended_bos_id(tok_ft)
    if pa != pb:
        out.append(f"BOS prepended on encode: base {pa}, ft {pb}")
    ca, cb = chat_template_hash(tok_base), chat_template_hash(tok_ft)
    if ca != cb:
        if ca is None or cb is None:
            out.append(
                f"chat template: base has {'none' if ca is None else 'one'}, "
                f"ft has {'none' if cb is None else 'one'}"
            )
        else:
            out.append("chat template: base and ft templates differ")
    return out


def check_tokenizers(
    tok_base: PreTrainedTokenizerBase | None,
    tok_ft: PreTrainedTokenizerBase | None,
    *,
    warn: bool = True,
) -> list[str]:
    """Raise unless the two tokenizers encode text identically; report configuration
    differences.

    Compatible tokenizers share vocabulary, subword model and normaliser (see
    :func:`encoding_difference`). Differences in *configuration* (which token is BOS/EOS/PAD,
    BOS prepending, the chat template) are normal between a base model and its instruct
    model; they are resolved, not refused: the pair uses the **ft tokenizer** as given (its
    chat template renders chat data, its special tokens mark turns and padding, its BOS
    behaviour decides whether rows start with BOS). One :class:`PairingWarning` lists them.

    Returns:
        The configuration differences (empty when there are none).

    Raises:
        PairingError: the tokenizers encode text differently (the message names the part).
    """
    if tok_base is None or tok_ft is None:
        return []
    diff = encoding_difference(tok_base, tok_ft)
    if diff is not None:
        raise PairingError(
            f"the base and ft tokenizers are incompatible: {diff}. Paired activations need "
            "the same token ids in both models: pair models that share a tokenizer (a fine-"
            "tune keeps its base model's vocabulary), or pass one shared `tokenizer=` if the "
            "vocabularies truly agree."
        )
    diffs = configuration_differences(tok_base, tok_ft)
    if diffs and warn:
        warnings.warn(
            "the base and ft tokenizers share vocabulary, merges and normaliser but are "
            "configured differently (normal for a base/instruct pair): "
            + "; ".join(diffs)
            + ". Using the ft tokenizer's special tokens, BOS behaviour and chat template "
            "for all data.",
            PairingWarning,
            stacklevel=3,
        )
    return diffs


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase | None) -> str | None:
    """A stable sha256 of a tokenizer's vocabulary and special tokens (None if absent)."""
    if tokenizer is None:
        return None
    payload = {
        "vocab": sorted(_vocab(tokenizer).items(), key=lambda kv: kv[1]),
        "special": {a: getattr(tokenizer, a, None) for a in SPECIAL_TOKEN_ATTRS},
        "all_special_ids": sorted(getattr(tokenizer, "all_special_ids", []) or []),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def chat_template_hash(tokenizer: PreTrainedTokenizerBase | None) -> str | None:
    """sha256 of the tokenizer's chat template (None if it has none)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        return None
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()


def check_token_ids(tokens: torch.Tensor, d_vocab: int, n_ctx: int | None = None) -> None:
    """Raise ``ValueError`` unless ``tokens`` is a ``(batch, seq)`` integer tensor of ids in
    ``[0, d_vocab)`` no longer than the context ``n_ctx`` (when given and positive)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(
            "tokens must be a (batch, seq) integer tensor; tokenize text with "
            "pair.tokenizer or a sae_diff.data.sources.TokenSource first."
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.numel() and (int(tokens.max()) >= d_vocab or int(tokens.min()) < 0):
        raise ValueError(
            f"token ids must lie in [0, {d_vocab}); got min {int(tokens.min())}, "
            f"max {int(tokens.max())}. Were the tokens made with another tokenizer?"
        )
    if n_ctx is not None and n_ctx > 0 and tokens.shape[1] > n_ctx:
        raise ValueError(
            f"sequence length {tokens.shape[1]} exceeds the model's context n_ctx={n_ctx}; "
            "use a smaller context_size"
        )


def valid_hook_names(model: LanguageModel) -> set[str]:
    """Every hook name a HookedTransformer / TransformerBridge accepts (bridge aliases too)."""
    return set(model.hook_dict.keys())


def check_hooks(hook_names: list[str], *models: LanguageModel) -> None:
    """Raise HookNameError if any hook is missing from any model, listing the valid names."""
    if isinstance(hook_names, str):
        hook_names = [hook_names]
    valid = set.intersection(*(valid_hook_names(m) for m in models))
    missing = [h for h in hook_names if h not in valid]
    if missing:
        resid = sorted((h for h in valid if "resid" in h), key=_natural_key)
        listed = resid if resid else sorted(valid, key=_natural_key)
        raise HookNameError(
            f"unknown hook name(s) {missing}. Valid residual-stream hooks: {listed}"
            f" ({len(valid)} valid hook names in all; see PairedModel.hook_names)."
        )


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def stop_layer_for_hook(hook_name: str, n_layers: int) -> int | None:
    """The ``stop_at_layer`` that still fires ``hook_name`` (None: the full model is needed);
    see :func:`sae_diff.pairing.hooks.stop_layer`."""
    return stop_layer(hook_name, n_layers)
