"""Loading a model pair with the real TransformerLens / transformers code
(:meth:`sae_diff.pairing.model.PairedModel.from_pretrained` is :func:`load_pair`).

Its own module so that ``model.py`` holds the pair's runtime (forwards, hooks, stitching) and
this one the order of the loading checks and the two backends' construction.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as loading
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sae_diff.pairing import backends as bk
from sae_diff.pairing.backends import LanguageModel, is_local_model_dir
from sae_diff.pairing.checks import check_config_dims, check_dims, check_tokenizers

if TYPE_CHECKING:
    from sae_diff.pairing.model import PairedModel

Backend = Literal["auto", "hooked", "bridge"]


def load_pair(
    cls: type[PairedModel],
    base_name: str,
    ft_name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hf_model_path_or_local_dir: str | os.PathLike[str] | None = None,
    backend: Backend = "auto",
    base_revision: str | None = None,
    ft_revision: str | None = None,
    trust_remote_code: bool = False,
    **model_kwargs: Any,
) -> PairedModel:
    """Load a pair with the real TransformerLens / transformers loading code.

    Order (cheap checks first, so a mismatched 2 x 8B pair fails before any weight is
    read): both ``config.json`` (layer count, width, vocabulary size must agree), the
    backend from the base's ``config.json`` (:func:`~sae_diff.pairing.backends.
    choose_backend`; never the folder name), both tokenizers as the user supplied them
    (``AutoTokenizer`` on the folders / Hub ids; incompatible encodings raise, differing
    BOS/EOS/PAD/chat-template configuration warns once and the ft tokenizer is used),
    then the weights. The fine-tune is loaded as a Hugging Face model and handed to
    TransformerLens with the *base* architecture (``hf_model=``).

    Args:
        base_name: Hugging Face id of the base (or TL official name), or a local folder.
        ft_name: Hugging Face id of the fine-tune, or a local folder.
        hf_model_path_or_local_dir: where to read the ft weights and tokenizer from, when
            not ``ft_name`` (e.g. ``ft_name`` is a label and the weights are on disk).
        backend: ``"bridge"`` (TransformerBridge: raw HF numerics, any architecture the
            bridge knows), ``"hooked"`` (HookedTransformer: processed weights, faster
            stitching) or ``"auto"`` (the bridge when it supports the architecture).
        base_revision, ft_revision: Hub revisions (recorded in caches).
        trust_remote_code: off by default; weights are read from safetensors (or
            ``torch.load(weights_only=True)`` by transformers).
        **model_kwargs: ``HookedTransformer.from_pretrained`` options (SAELens's
            ``model_from_pretrained_kwargs``, e.g. ``center_writing_weights``,
            ``fold_ln``, ``n_ctx``), translated for the chosen backend by
            :func:`~sae_diff.pairing.backends.translate_options`; other keys go to
            ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).

    Raises:
        PairingError: configs, dimensions or tokenizers cannot be paired, or no backend
            supports the architecture (the message names the fix).
    """
    ft_path = str(hf_model_path_or_local_dir) if hf_model_path_or_local_dir else str(ft_name)
    base_path = str(base_name)
    info_b = bk.read_model_info(
        base_path, revision=base_revision, trust_remote_code=trust_remote_code
    )
    info_f = bk.read_model_info(ft_path, revision=ft_revision, trust_remote_code=trust_remote_code)
    check_config_dims(info_b, info_f)
    chosen = bk.choose_backend(backend, info_b)
    opts = bk.translate_options(chosen, model_kwargs)
    bk.log_notes(opts.notes)

    tok_base = AutoTokenizer.from_pretrained(
        base_path, revision=base_revision, trust_remote_code=trust_remote_code
    )
    tok_ft = AutoTokenizer.from_pretrained(
        ft_path, revision=ft_revision, trust_remote_code=trust_remote_code
    )
    diffs = check_tokenizers(tok_base, tok_ft)

    hf_kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        **opts.hf_kwargs,
    }
    if chosen == "bridge":
        hf_kwargs.setdefault("attn_implementation", "eager")  # what the bridge uses
    hf_base = AutoModelForCausalLM.from_pretrained(base_path, revision=base_revision, **hf_kwargs)
    hf_ft = AutoModelForCausalLM.from_pretrained(ft_path, revision=ft_revision, **hf_kwargs)
    # TransformerLens edits the tokenizer it is given (sets PAD, sets BOS = EOS for
    # tokenizers without BOS): give it copies, keep the user's for the data.
    base: LanguageModel
    ft: LanguageModel
    if chosen == "hooked":
        base = load_hooked(
            bk.hooked_config_name(info_b),
            hf_base,
            copy.deepcopy(tok_base),
            device=device,
            dtype=dtype,
            **opts.tl_kwargs,
        )
        ft = load_hooked(
            bk.hooked_config_name(info_b),
            hf_ft,
            copy.deepcopy(tok_ft),
            device=device,
            dtype=dtype,
            **opts.tl_kwargs,
        )
    else:
        dev = torch.device(device)
        bridge_base = TransformerBridge.boot_transformers(
            base_path,
            device=device,
            dtype=dtype,
            tokenizer=copy.deepcopy(tok_base),
            hf_model=hf_base.to(dev),  # type: ignore[arg-type]
            trust_remote_code=trust_remote_code,
            **opts.tl_kwargs,
        )
        bridge_ft = TransformerBridge.boot_transformers(
            base_path,
            device=device,
            dtype=dtype,
            tokenizer=copy.deepcopy(tok_ft),
            hf_model=hf_ft.to(dev),  # type: ignore[arg-type]
            trust_remote_code=trust_remote_code,
            **opts.tl_kwargs,
        )
        if opts.processing is not None:
            for m in (bridge_base, bridge_ft):
                m.enable_compatibility_mode(disable_warnings=True, **opts.processing)
        base, ft = bridge_base, bridge_ft
    del hf_base, hf_ft
    base.eval()
    ft.eval()
    check_dims(base, ft)
    pair = cls(
        base,
        ft,
        tokenizer=tok_ft,
        base_name=str(base_name),
        ft_name=str(ft_name),
        check=False,
    )
    pair.base_tokenizer, pair.ft_tokenizer = tok_base, tok_ft
    pair.tokenizer_differences = diffs
    pair.base_revision = base_revision or _commit_hash(base_path)
    pair.ft_revision = ft_revision or _commit_hash(ft_path)
    return pair


# ---------------------------------------------------------------------- loading helpers
def load_hooked(
    base_name_or_dir: str,
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **tl_kwargs: Any,
) -> HookedTransformer:
    """A HookedTransformer with the architecture of ``base_name_or_dir`` and the weights of
    ``hf_model`` (TransformerLens's ``hf_model=`` path).

    ``HookedTransformer.from_pretrained`` only accepts official names; for a local Hugging
    Face folder this runs the same TransformerLens steps (``get_pretrained_model_config`` on
    the folder, ``get_pretrained_state_dict`` with ``hf_model``,
    ``load_and_process_state_dict``).
    """
    if not is_local_model_dir(base_name_or_dir):
        return HookedTransformer.from_pretrained(
            base_name_or_dir,
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            **tl_kwargs,
        )
    fold_ln = tl_kwargs.pop("fold_ln", True)
    center_writing_weights = tl_kwargs.pop("center_writing_weights", True)
    center_unembed = tl_kwargs.pop("center_unembed", True)
    fold_value_biases = tl_kwargs.pop("fold_value_biases", True)
    refactor = tl_kwargs.pop("refactor_factored_attn_matrices", False)
    default_padding_side = tl_kwargs.pop("default_padding_side", None)
    cfg = loading.get_pretrained_model_config(
        base_name_or_dir,
        hf_cfg=hf_model.config.to_dict(),
        fold_ln=fold_ln,
        device=device,
        dtype=dtype,
        **tl_kwargs,
    )
    state_dict = loading.get_pretrained_state_dict(base_name_or_dir, cfg, hf_model, dtype=dtype)
    model = HookedTransformer(
        cfg, tokenizer, move_to_device=False, default_padding_side=default_padding_side
    )
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor,
    )
    model.move_model_modules_to_device()
    return model


def _commit_hash(name_or_dir: str) -> str | None:
    """The Hub commit of a cached model, or None for local folders / unknown."""
    if is_local_model_dir(name_or_dir):
        return None
    try:
        return getattr(AutoConfig.from_pretrained(name_or_dir), "_commit_hash", None)
    except Exception:  # pragma: no cover - offline or missing; a revision is optional
        return None


__all__ = ["load_hooked", "load_pair"]
