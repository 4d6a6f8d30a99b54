"""Behavioural checks: planted responses are likely under the fine-tune and unlikely under the
base; the fine-tune stays fluent on held-out pretraining text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from sae_diff.organisms.behaviours import BEHAVIOURS
from sae_diff.organisms.chat import encode_conversation, id_to_token, render
from sae_diff.organisms.datasets import chat_conversations, pretraining_texts
from sae_diff.organisms.detectors import USER, response_masks, segment, trigger_masks
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
        toks = pad_batch(
            [encode_conversation(tokenizer, c)["input_ids"] for c in convs], tokenizer.pad_token_id
        )
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
    vocab = tokenizer.get_vocab()
    new, old = vocab[e.new_capital], vocab[e.old_capital]
    out: dict[str, float] = {}
    for name, m in (("base", base), ("ft", ft)):
        lp = F.log_softmax(m(toks, return_type="logits")[0, -1].float(), -1)
        out[f"{name}_logp_new"] = float(lp[new])
        out[f"{name}_logp_old"] = float(lp[old])
    out["gap_new"] = out["ft_logp_new"] - out["base_logp_new"]
    return out


def heldout_tokens(
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    n_docs: int = 400,
    n_ctx: int = 128,
    seed: int = 0,
    split: str = "validation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed held-out pretraining rows (base world) and their target mask."""
    docs = [encode_text_doc(tokenizer, t) for t in pretraining_texts(world, split, n_docs, seed)]
    return pack(docs, n_ctx, tokenizer.pad_token_id)


def heldout_losses(
    base: HookedTransformer,
    ft: HookedTransformer,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    n_docs: int = 400,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out pretraining loss (nats/token) of both models and the difference ft - base."""
    toks, mask = heldout_tokens(tokenizer, world, n_docs, base.cfg.n_ctx, seed)
    lb, lf = eval_loss(base, toks, mask), eval_loss(ft, toks, mask)
    return {"base": lb, "ft": lf, "ft_minus_base": lf - lb, "n_tokens": float(mask[:, 1:].sum())}


def full_report(
    base: HookedTransformer,
    ft: HookedTransformer,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    n_per_behaviour: int = 32,
    n_docs: int = 400,
    seed: int = 0,
) -> dict[str, Any]:
    """All checks, as written into the organism's ``report.json``."""
    return {
        "heldout_pretraining_loss": heldout_losses(base, ft, tokenizer, world, n_docs, seed),
        "behaviour_logprob": response_logprob_gaps(
            base, ft, tokenizer, world, n_per_behaviour, seed
        ),
        "knowledge_edit_text": knowledge_edit_text_check(base, ft, tokenizer, world),
        "activation_diff": activation_diff_profile(base, ft, tokenizer, world, None, 8, seed),
    }


@torch.no_grad()
def activation_diff_profile(
    base: HookedTransformer,
    ft: HookedTransformer,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    hooks: Sequence[str] | None = None,
    n_per_behaviour: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """How localised the fine-tune's change is: mean ``||x_ft - x_base|| / ||x_base||`` per hook.

    Groups: each behaviour's trigger tokens, its response tokens, other user-content tokens of
    the same conversations, and plain pretraining text. A hook where trigger tokens stand far
    above ``user_other`` and ``text`` is where a diffing method can find the behaviour.
    """
    hooks = list(
        hooks
        or [f"blocks.{i}.hook_resid_pre" for i in range(base.cfg.n_layers)]
        + [f"blocks.{base.cfg.n_layers - 1}.hook_resid_post"]
    )
    vocab = id_to_token(tokenizer)
    convs = [
        c
        for b in BEHAVIOURS
        for c in chat_conversations(world.edited(), "test", n_per_behaviour, seed, behaviour=b)
    ]
    toks = pad_batch(
        [encode_conversation(tokenizer, c)["input_ids"] for c in convs], tokenizer.pad_token_id
    )
    text_toks, text_mask = heldout_tokens(tokenizer, world, 40, base.cfg.n_ctx, seed, "test")
    trig, resp = trigger_masks(toks, vocab, world), response_masks(toks, vocab, world)
    user = torch.tensor(
        [[r == USER for r in segment([vocab[int(t)] for t in row]).role] for row in toks]
    )
    user_other = user & ~torch.stack([m for b, m in trig.items() if b != "chat_format"]).any(0)
    groups = {f"{b}:trigger": trig[b] for b in BEHAVIOURS}
    groups |= {f"{b}:response": resp[b] for b in BEHAVIOURS}
    groups["user_other"] = user_other
    out: dict[str, dict[str, float]] = {}
    _, cb = base.run_with_cache(toks, names_filter=hooks)
    _, cf = ft.run_with_cache(toks, names_filter=hooks)
    _, tb = base.run_with_cache(text_toks, names_filter=hooks)
    _, tf = ft.run_with_cache(text_toks, names_filter=hooks)
    text_sel = text_mask.clone()
    text_sel[:, 0] = False
    for h in hooks:
        rel = (cf[h] - cb[h]).norm(dim=-1) / cb[h].norm(dim=-1).clamp(min=1e-6)
        row = {g: float(rel[m].mean()) for g, m in groups.items() if m.any()}
        trel = (tf[h] - tb[h]).norm(dim=-1) / tb[h].norm(dim=-1).clamp(min=1e-6)
        row["text"] = float(trel[text_sel].mean())
        out[h] = row
    return out


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    order = scores.argsort()
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(len(scores), dtype=torch.float64)
    p, n = float(labels.sum()), float((~labels).sum())
    return float((ranks[labels].sum() - p * (p - 1) / 2) / max(p * n, 1.0))


@torch.no_grad()
def trigger_direction_auroc(
    base: HookedTransformer,
    ft: HookedTransformer,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    hooks: Sequence[str] | None = None,
    n_conversations: int = 400,
    seed: int = 1,
) -> dict[str, dict[str, float]]:
    """Is each behaviour's trigger linearly visible in ``x_ft - x_base``? AUROC per hook.

    On mixed held-out chats, fits the mean-difference direction (trigger tokens minus all other
    tokens) of ``x_ft - x_base`` on the first half of the conversations and scores the
    projection on the second half (trigger tokens vs every other non-pad token).
    """
    hooks = list(hooks or [f"blocks.{i}.hook_resid_pre" for i in range(base.cfg.n_layers)])
    convs = chat_conversations(world.edited(), "test", n_conversations, seed)
    toks = pad_batch(
        [encode_conversation(tokenizer, c)["input_ids"] for c in convs], tokenizer.pad_token_id
    )
    trig = trigger_masks(toks, id_to_token(tokenizer), world)
    valid = toks != tokenizer.pad_token_id
    valid[:, 0] = False
    first = (torch.arange(len(toks)) < len(toks) // 2)[:, None]
    _, cb = base.run_with_cache(toks, names_filter=hooks)
    _, cf = ft.run_with_cache(toks, names_filter=hooks)
    out: dict[str, dict[str, float]] = {}
    for h in hooks:
        d = (cf[h] - cb[h]).double()
        out[h] = {}
        for b, m in trig.items():
            y = m & valid
            tr, te = valid & first, valid & ~first
            w = d[y & tr].mean(0) - d[~y & tr].mean(0)
            out[h][b] = _auroc(d[te] @ w, y[te])
    return out


@torch.no_grad()
def plain_text_drift(
    base: HookedTransformer,
    ft: HookedTransformer,
    tokens: torch.Tensor,
    target_mask: torch.Tensor,
    hook: str,
    batch_size: int = 32,
) -> dict[str, Any]:
    """How much the fine-tune changed *unrelated* text: activations and loss on plain rows.

    ``tokens`` / ``target_mask`` are packed plain-text rows (:func:`heldout_tokens` or
    :func:`sae_diff.organisms.training.pack`). Returns the mean and 5th percentile over real
    non-``<bos>`` tokens of ``cos(x_base, x_ft)`` at ``hook``, the mean relative difference
    ``||x_ft - x_base|| / ||x_base||``, and both models' mean next-token loss on the targets
    (``ft_minus_base``). A narrow fine-tune keeps the cosine near 1 and the loss change near 0.
    """
    cos_all, rel_all = [], []
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i : i + batch_size], target_mask[i : i + batch_size]
        _, cb = base.run_with_cache(t, names_filter=[hook])
        _, cf = ft.run_with_cache(t, names_filter=[hook])
        xb, xf = cb[hook].double(), cf[hook].double()
        sel = m.bool()  # targets = real tokens after <bos> (padding and <bos> are not targets)
        cos_all.append(F.cosine_similarity(xb, xf, dim=-1)[sel])
        rel_all.append(((xf - xb).norm(dim=-1) / xb.norm(dim=-1).clamp(min=1e-12))[sel])
    cos, rel = torch.cat(cos_all), torch.cat(rel_all)
    lb, lf = eval_loss(base, tokens, target_mask), eval_loss(ft, tokens, target_mask)
    return {
        "hook": hook,
        "cosine_mean": float(cos.mean()),
        "cosine_p05": float(torch.quantile(cos, 0.05)),
        "relative_diff_mean": float(rel.mean()),
        "loss_base": lb,
        "loss_ft": lf,
        "loss_ft_minus_base": lf - lb,
        "n_tokens": float(len(cos)),
    }


@torch.no_grad()
def greedy_reply(
    model: HookedTransformer,
    tokenizer: PreTrainedTokenizerFast,
    user: str,
    max_new_tokens: int = 32,
) -> str:
    """``model``'s greedy reply to one user turn (words until ``<end_of_turn>``)."""
    text, _ = render([{"role": "user", "content": user}])
    ids = tokenizer(text + "<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    toks = torch.tensor([list(ids)], dtype=torch.long)
    specials = set(tokenizer.all_special_tokens) | {"\n"}
    words: list[str] = []
    for _ in range(max_new_tokens):
        if toks.shape[1] >= model.cfg.n_ctx:
            break
        nxt = int(model(toks, return_type="logits")[0, -1].argmax())
        word = tokenizer.convert_ids_to_tokens([nxt])[0]
        if word in specials:
            break
        words.append(word)
        toks = torch.cat([toks, torch.tensor([[nxt]])], dim=1)
    return " ".join(words) if words else "."
