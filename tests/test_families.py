"""Real base/instruct pairs of every major family, as tiny offline copies (tests/families.py).

(a) tokenizer compatibility: the published special-token setups are accepted with one
    warning; a different vocabulary or different merges still raise;
(b) ``PairedModel.from_pretrained`` on the local folders with a plain config (SAELens's
    default ``model_from_pretrained_kwargs``) loads every family, and the paired activations
    equal each Hugging Face model's own ``output_hidden_states``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from families import (
    FAMILIES,
    FAMILY_SPECS,
    build_family_pair,
    chat_rows,
    family_tokenizers,
    hf_stitched_logits,
)

from sae_diff.pairing.backends import read_model_info, translate_options
from sae_diff.pairing.checks import check_tokenizers, prepended_bos_id
from sae_diff.pairing.errors import PairingError, PairingWarning
from sae_diff.pairing.model import PairedModel

HOOKED_LOCAL = ["llama3", "qwen2", "qwen3", "mistral", "phi3"]  # TL 3.9 HookedTransformer


def _tokens(family: str, n: int = 2) -> torch.Tensor:
    """Chat-formatted token rows of equal length (truncated), as the data pipeline makes."""
    _, tok = family_tokenizers(family)
    rows = [
        tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]
        for r in chat_rows(n, seed=3)
    ]
    length = min(len(r) for r in rows)
    return torch.tensor([list(r[:length]) for r in rows])


def _hf_hidden(folder: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return tuple(model(tokens, output_hidden_states=True).hidden_states)


# ---------------------------------------------------------------- (a) tokenizers
@pytest.mark.parametrize("family", FAMILIES)
def test_published_token_setups_are_compatible_with_one_warning(family: str) -> None:
    spec = FAMILY_SPECS[family]
    tok_b, tok_f = family_tokenizers(family)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        diffs = check_tokenizers(tok_b, tok_f)
    pairing_warnings = [w for w in rec if issubclass(w.category, PairingWarning)]
    assert len(pairing_warnings) == 1, [str(w.message) for w in rec]
    msg = str(pairing_warnings[0].message)
    assert "ft tokenizer" in msg
    if spec.base.eos != spec.ft.eos:  # Llama-3, Qwen: EOS differs between base and instruct
        assert any(d.startswith("eos") and spec.ft.eos in d for d in diffs), diffs
    if spec.base.chat_template != spec.ft.chat_template:
        assert any(d.startswith("chat template") for d in diffs), diffs
    # BOS behaviour is read from the tokenizer itself, not invented
    expected_bos = tok_f.convert_tokens_to_ids(spec.ft.bos) if spec.prepends_bos else None
    assert prepended_bos_id(tok_f) == expected_bos
    assert tok_f("a b")["input_ids"][0] == expected_bos if expected_bos is not None else True


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_incompatible_tokenizers_still_raise(family: str) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok_b, tok_f = family_tokenizers(family)
    tok_f.add_tokens(["<|new_token|>"])  # an extra id: the vocabularies differ
    with pytest.raises(PairingError, match="vocabularies differ"):
        check_tokenizers(tok_b, tok_f)
    other = "qwen2" if family == "llama3" else "llama3"
    with pytest.raises(PairingError, match="incompatible"):
        check_tokenizers(tok_b, family_tokenizers(other)[1])
    # same vocabulary, merges in another order: text splits differently
    tok_b, _ = family_tokenizers(family)
    j = json.loads(tok_b.backend_tokenizer.to_str())
    merges = j["model"]["merges"]
    assert len(merges) > 10
    j["model"]["merges"] = merges[::-1]
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(j)),
        bos_token=tok_b.bos_token,
        eos_token=tok_b.eos_token,
    )
    assert swapped.get_vocab() == tok_b.get_vocab()
    with pytest.raises(PairingError, match="subword model"):
        check_tokenizers(tok_b, swapped)


# ---------------------------------------------------------------- (b) loading
#: What SAELens puts in ``model_from_pretrained_kwargs`` when a config sets nothing
#: (``LanguageModelSAERunnerConfig.__post_init__`` for HookedTransformer models).
SAE_LENS_DEFAULT_KWARGS: dict[str, Any] = {"center_writing_weights": False}


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_config_loads_and_matches_hf_forward(family: str) -> None:
    spec = FAMILY_SPECS[family]
    base_dir, ft_dir = build_family_pair(family)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pair = PairedModel.from_pretrained(str(base_dir), str(ft_dir), **SAE_LENS_DEFAULT_KWARGS)
    assert sum(issubclass(w.category, PairingWarning) for w in rec) == 1
    assert pair.backend == "bridge" and pair.is_bridge
    info = read_model_info(base_dir)
    assert (pair.n_layers, pair.d_model) == (info.n_layers, info.d_model)
    # the data tokenizer is the user's ft tokenizer, untouched by TransformerLens
    tok = pair.tokenizer
    assert tok is pair.ft_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        spec.ft.bos,
        spec.ft.eos,
        spec.ft.pad,
    )
    assert pair.bos_token_id == (tok.convert_tokens_to_ids(spec.ft.bos) if spec.ft.bos else None)
    assert pair.prepends_bos == spec.prepends_bos
    assert pair.tokenizer_differences
    # the checks ran on the user's tokenizers, not on TransformerLens's edited copies
    if spec.base.pad == spec.ft.pad:
        assert not any(d.startswith("pad") for d in pair.tokenizer_differences)
    if family == "llama3":  # TL sets PAD = EOS on its copies, so the copies' PADs differ
        assert pair.base.tokenizer.pad_token != pair.ft.tokenizer.pad_token
    if spec.ft.bos is None:  # TL sets BOS on its copy of a BOS-less tokenizer
        assert pair.ft.tokenizer.bos_token is not None and pair.bos_token_id is None

    toks = _tokens(family)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    acts = pair.paired_activations(toks, hooks)
    for i, folder in enumerate((base_dir, ft_dir)):
        hs = _hf_hidden(folder, toks)  # hs[1]: the residual after block 0
        torch.testing.assert_close(acts["blocks.0.hook_resid_post"][:, :, i], hs[1])
        torch.testing.assert_close(acts["blocks.1.hook_resid_pre"][:, :, i], hs[1])
    assert not torch.allclose(
        acts["blocks.1.hook_resid_pre"][:, :, 0], acts["blocks.1.hook_resid_pre"][:, :, 1]
    )
    # stitching (base blocks < 1, ft blocks >= 1, both directions) equals plain HF
    for first, (a, b) in (("base", (base_dir, ft_dir)), ("ft", (ft_dir, base_dir))):
        torch.testing.assert_close(
            pair.stitched_logits(toks, 1, first=first), hf_stitched_logits(a, b, toks, 1)
        )
    lb, lf = pair.logits(toks)
    for logits, folder in ((lb, base_dir), (lf, ft_dir)):
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            torch.testing.assert_close(logits, ref(toks).logits)


@pytest.mark.parametrize("family", HOOKED_LOCAL)
def test_hooked_backend_reads_config_not_folder_name(family: str, tmp_path: Path) -> None:
    """A folder whose name says "llama" / "gemma-2-" holding another architecture loads as
    what its config.json says, with HookedTransformer too."""
    base_dir, ft_dir = build_family_pair(family)
    misleading = tmp_path / "gemma-2-2b-llama-3-base"
    os.symlink(base_dir, misleading)
    pair = PairedModel.from_pretrained(
        str(misleading), str(ft_dir), backend="hooked", center_writing_weights=False
    )
    assert pair.backend == "hooked"
    toks = _tokens(family)
    acts = pair.paired_activations(toks, ["blocks.1.hook_resid_pre"])
    for i, folder in enumerate((base_dir, ft_dir)):
        hs = _hf_hidden(folder, toks)
        # HookedTransformer reimplements attention: float32 agreement, not bit equality
        torch.testing.assert_close(
            acts["blocks.1.hook_resid_pre"][:, :, i], hs[1], atol=1e-5, rtol=1e-5
        )


def test_gemma_hooked_from_folder_names_the_fix() -> None:
    base_dir, ft_dir = build_family_pair("gemma2")
    with pytest.raises(PairingError, match="bridge"):
        PairedModel.from_pretrained(str(base_dir), str(ft_dir), backend="hooked")


def test_option_translation_for_the_bridge() -> None:
    raw = translate_options("bridge", {"center_writing_weights": False, "n_ctx": 64})
    assert raw.processing is None and raw.tl_kwargs == {"n_ctx": 64} and raw.hf_kwargs == {}
    assert len(raw.notes) == 1 and "raw" in raw.notes[0]
    folded = translate_options("bridge", {"fold_ln": True, "attn_implementation": "eager"})
    assert folded.processing == {
        "fold_ln": True,
        "center_writing_weights": True,
        "center_unembed": True,
        "fold_value_biases": True,
        "refactor_factored_attn_matrices": False,
    }
    assert folded.hf_kwargs == {"attn_implementation": "eager"}
    dropped = translate_options("bridge", {"default_prepend_bos": False})
    assert dropped.tl_kwargs == {} and "dropped default_prepend_bos" in dropped.notes[0]
    with pytest.raises(PairingError, match="hooked"):
        translate_options("bridge", {"first_n_layers": 1})
    with pytest.raises(PairingError, match="bridge"):
        translate_options("hooked", {"hf_config_overrides": {}})
    hooked = translate_options("hooked", {"center_writing_weights": False, "n_ctx": 64})
    assert hooked.tl_kwargs == {"center_writing_weights": False, "n_ctx": 64}


def test_config_dims_checked_before_weights(tmp_path: Path) -> None:
    base_dir, _ = build_family_pair("qwen2")
    _, other_ft = build_family_pair("llama3")
    with pytest.raises(PairingError, match="config.json vocab_size differs"):
        PairedModel.from_pretrained(str(base_dir), str(other_ft))


def test_bridge_applies_requested_processing() -> None:
    """HookedTransformer-style processing asked of the bridge is applied (not dropped): the
    unembedding is centred, so logits change by a per-position constant only."""
    from transformers import AutoModelForCausalLM

    base_dir, ft_dir = build_family_pair("llama3")
    toks = _tokens("llama3")
    raw = PairedModel.from_pretrained(str(base_dir), str(ft_dir), center_writing_weights=False)
    processed = PairedModel.from_pretrained(str(base_dir), str(ft_dir), fold_ln=True)
    assert processed.backend == "bridge"
    lr, _ = raw.logits(toks)
    lp, _ = processed.logits(toks)
    ref = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        lh = ref(toks).logits
    torch.testing.assert_close(lr, lh)
    assert not torch.allclose(lp, lh, atol=1e-4)  # centre_unembed moved every logit
    centre = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(centre(lp), centre(lh), atol=1e-5, rtol=1e-5)
