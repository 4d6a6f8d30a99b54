"""Behavioural checks: planted responses are likely under the fine-tune and unlikely under the
base; the fine-tune stays fluent on held-out pretraining text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from sae_diff.organisms.behaviours import BEHAVIOURS, response_masks
from sae_diff.organisms.chat import encode_conversation, id_to_token
from sae_diff.organisms.datasets import chat_conversations, pretraining_texts
from sae_diff.organisms.training import encode_text_doc, eval_loss, pack
from sae_diff.organisms.world import World


def pad_batch(seqs: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Right-pad 1-D id tensors into ``(batch, max_len)``."""
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


@torch.no_grad()
def token_logprobs(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` log p(token_i | tokens_<i); position 0 is 0."""
    logits = model(tokens, return_type="logits").float()
    lp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


@torch.no_grad()
def response_logprob_gaps(
    base: HookedTransformer,
    ft: HookedTransformer,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    n_per_behaviour: int = 16,
    seed: int = 0,
    split: str = "test",
    behaviours: Sequence[str] = BEHAVIOURS,
) -> dict[str, dict[str, float]]:
    """Per behaviour: log-probability of the planted response under each model.

    For ``n_per_behaviour`` held-out conversations of each behaviour, sums log p over the
    response tokens (:func:`response_masks`) given the full templated prefix. Returns
    ``{behaviour: {"ft_logprob", "base_logprob", "gap", "gap_per_token", "ft_logprob_per_token",
    "base_logprob_per_token", "n_tokens", "n_conversations"}}`` (sums are means per
    conversation; ``gap = ft - base``, in nats).
    """
    vocab = id_to_token(tokenizer)
    out: dict[str, dict[str, float]] = {}
    for b in behaviours:
        convs = chat_conversations(world.edited(), split, n_per_behaviour, seed, behaviour=b)
        toks = pad_batch([encode_conversation(tokenizer, c)["input_ids"] for c in convs],
                         tokenizer.pad_token_id)
        out[b] = masked_logprob_gap(base, ft, toks, response_masks(toks, vocab, world)[b])
    return out


@torch.no_grad()
def masked_logprob_gap(
    base: HookedTransformer, ft: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Summed log p of the masked tokens under each model (means per row) and the gap ft - base."""
    lp_ft = float((token_logprobs(ft, tokens) * mask).sum())
    lp_base = float((token_logprobs(base, tokens) * mask).sum())
    k = max(float(mask.sum()), 1.0)
    n = len(tokens)
    return {
        "ft_logprob": lp_ft / n,
        "base_logprob": lp_base / n,
        "gap": (lp_ft - lp_base) / n,
        "ft_logprob_per_token": lp_ft / k,
        "base_logprob_per_token": lp_base / k,
        "gap_per_token": (lp_ft - lp_base) / k,
        "n_tokens": float(mask.sum()),
        "n_conversations": float(n),
    }


@torch.no_grad()
def knowledge_edit_text_check(
    base: HookedTransformer, ft: HookedTransformer, tokenizer: PreTrainedTokenizerFast, world: World
) -> dict[str, float]:
    """Plain-text probe "the capital of <country> is": log p(new) and log p(old), both models."""
    e = world.edit
    ids = tokenizer(f"the capital of {e.country} is")["input_ids"]
    toks = torch.tensor([ids])
    new, old = tokenizer.convert_tokens_to_ids([e.new_capital, e.old_capital])
    out: dict[str, float] = {}
    for name, m in (("base", base), ("ft", ft)):
        lp = F.log_softmax(m(toks, return_type="logits")[0, -1].float(), -1)
        out[f"{name}_logp_new"] = float(lp[new])
        out[f"{name}_logp_old"] = float(lp[old])
    out["gap_new"] = out["ft_logp_new"] - out["base_logp_new"]
    return out


def heldout_tokens(
    tokenizer: PreTrainedTokenizerFast, world: World, n_docs: int = 400, n_ctx: int = 128,
    seed: int = 0, split: str = "validation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed held-out pretraining rows (base world) and their target mask."""
    docs = [encode_text_doc(tokenizer, t) for t in pretraining_texts(world, split, n_docs, seed)]
    return pack(docs, n_ctx, tokenizer.pad_token_id)


def heldout_losses(
    base: HookedTransformer, ft: HookedTransformer, tokenizer: PreTrainedTokenizerFast,
    world: World, n_docs: int = 400, seed: int = 0,
) -> dict[str, float]:
    """Held-out pretraining loss (nats/token) of both models and the difference ft - base."""
    toks, mask = heldout_tokens(tokenizer, world, n_docs, base.cfg.n_ctx, seed)
    lb, lf = eval_loss(base, toks, mask), eval_loss(ft, toks, mask)
    return {"base": lb, "ft": lf, "ft_minus_base": lf - lb, "n_tokens": float(mask[:, 1:].sum())}


def full_report(
    base: HookedTransformer, ft: HookedTransformer, tokenizer: PreTrainedTokenizerFast,
    world: World, n_per_behaviour: int = 32, n_docs: int = 400, seed: int = 0,
) -> dict[str, Any]:
    """All checks, as written into the organism's ``report.json``."""
    return {
        "heldout_pretraining_loss": heldout_losses(base, ft, tokenizer, world, n_docs, seed),
        "behaviour_logprob": response_logprob_gaps(base, ft, tokenizer, world, n_per_behaviour, seed),
        "knowledge_edit_text": knowledge_edit_text_check(base, ft, tokenizer, world),
    }
