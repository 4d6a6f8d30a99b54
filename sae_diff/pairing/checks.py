"""Construction checks for a model pair: shapes, vocabularies, special tokens, hook names.

Each check raises :class:`~sae_diff.pairing.errors.PairingError` (or
:class:`~sae_diff.pairing.errors.HookNameError`) with a message that names the first
difference and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from sae_diff.pairing.errors import HookNameError, PairingError

SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def model_dims(model: Any) -> tuple[int, int, int]:
    """(n_layers, d_model, d_vocab) of a HookedTransformer or TransformerBridge."""
    cfg = model.cfg
    return int(cfg.n_layers), int(cfg.d_model), int(cfg.d_vocab)


def check_dims(base: Any, ft: Any) -> None:
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


def _vocab(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def first_vocab_difference(tok_a: Any, tok_b: Any) -> str | None:
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


def check_tokenizers(tok_base: Any, tok_ft: Any) -> None:
    """Identical vocabularies and special-token ids (BOS/EOS/PAD/UNK and all special ids)."""
    if tok_base is None or tok_ft is None:
        return
    diff = first_vocab_difference(tok_base, tok_ft)
    if diff is not None:
        raise PairingError(
            f"the base and ft tokenizers differ (first differing id: {diff}; base vocab "
            f"size {len(_vocab(tok_base))}, ft {len(_vocab(tok_ft))}). Paired activations "
            "need the same token ids in both models: pass one shared `tokenizer=` if the "
            "vocabularies truly agree, or pair models that share a tokenizer."
        )
    for attr in SPECIAL_TOKEN_ATTRS:
        a, b = getattr(tok_base, attr, None), getattr(tok_ft, attr, None)
        if a != b:
            raise PairingError(
                f"special token {attr} differs: base {a}, ft {b}. Set the same special "
                "tokens on both tokenizers (or pass one shared `tokenizer=`)."
            )
    sa = sorted(getattr(tok_base, "all_special_ids", []) or [])
    sb = sorted(getattr(tok_ft, "all_special_ids", []) or [])
    if sa != sb:
        only_a = sorted(set(sa) - set(sb))
        only_b = sorted(set(sb) - set(sa))
        raise PairingError(
            f"special token ids differ: only in base {only_a}, only in ft {only_b}. "
            "Register the same special tokens on both tokenizers."
        )


def tokenizer_hash(tokenizer: Any) -> str | None:
    """A stable sha256 of a tokenizer's vocabulary and special tokens (None if absent)."""
    if tokenizer is None:
        return None
    payload = {
        "vocab": sorted(_vocab(tokenizer).items(), key=lambda kv: kv[1]),
        "special": {a: getattr(tokenizer, a, None) for a in SPECIAL_TOKEN_ATTRS},
        "all_special_ids": sorted(getattr(tokenizer, "all_special_ids", []) or []),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def chat_template_hash(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template (None if it has none)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        return None
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()


def valid_hook_names(model: Any) -> set[str]:
    """Every hook name a HookedTransformer / TransformerBridge accepts (bridge aliases too)."""
    return set(model.hook_dict.keys())


def check_hooks(hook_names: list[str], *models: Any) -> None:
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
    """The ``stop_at_layer`` that still fires ``hook_name`` (None: the full model is needed).

    ``blocks.L.*`` needs blocks 0..L, so L + 1; embedding hooks need 0 blocks.
    """
    m = re.match(r"^blocks\.(\d+)\.", hook_name)
    if m:
        layer = int(m.group(1)) + 1
        return None if layer > n_layers else layer
    if hook_name in ("hook_embed", "hook_pos_embed") or hook_name.startswith(
        ("embed.", "pos_embed.")
    ):
        return 0
    return None
