"""What a dictionary is for diffing: a crosscoder, a diff-SAE, or a single-model SAE
(``ft_sae``, the chat-SAE, or ``base_sae``). One place for every module that must tell them apart."""

from __future__ import annotations

from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.dictionaries.specs import KINDS as _KINDS

#: the kinds, from the architecture table's vocabulary (sae_diff.dictionaries.specs)
KINDS: tuple[str, ...] = _KINDS


def is_crosscoder(sae: PairedDictionary) -> bool:
    """True for dictionaries with one decoder row per model (``W_dec`` ``(d_sae, n_models, d)``)."""
    w = getattr(sae, "W_dec", None)
    return w is not None and w.ndim == 3


def dictionary_kind(sae: PairedDictionary, kind: str | None = None) -> str:
    """Resolve what a dictionary is for diffing: ``crosscoder``, ``diff_sae``, ``ft_sae``, ``base_sae``.

    Crosscoders and diff-SAEs (a ``cfg.diff_sign``) are recognised; a plain SAE needs
    ``kind="ft_sae"`` (trained on the fine-tune's activations, the "chat-SAE") or
    ``kind="base_sae"`` because its weights do not say which model it was trained on.
    """
    detected: str | None = None
    if is_crosscoder(sae):
        detected = "crosscoder"
    elif getattr(getattr(sae, "cfg", None), "diff_sign", None) is not None:
        detected = "diff_sae"
    if kind is None:
        if detected is None:
            raise ValueError(
                "Cannot tell which model this SAE reads: pass kind='ft_sae' (a chat/ft-SAE, "
                "trained on the fine-tune's activations) or kind='base_sae'."
            )
        return detected
    if kind not in KINDS:
        raise ValueError(f"Unknown dictionary kind {kind!r}; choose one of {list(KINDS)}.")
    if (
        detected == "crosscoder"
        and kind != "crosscoder"
        or kind == "crosscoder"
        and detected != "crosscoder"
    ):
        raise ValueError(
            f"kind={kind!r} does not match the dictionary: its W_dec is shaped "
            f"{tuple(sae.W_dec.shape)} ({'a crosscoder' if detected == 'crosscoder' else 'an SAE'})."
        )
    if detected == "diff_sae" and kind != "diff_sae":
        raise ValueError(
            f"kind={kind!r} given for a diff-SAE (cfg.diff_sign is set); use kind='diff_sae'."
        )
    return kind
