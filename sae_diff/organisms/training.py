"""Model construction, sequence packing and the plain torch training loop for the organisms."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from sae_diff.organisms.chat import id_to_token, render
from sae_diff.organisms.detectors import USER, segment
from sae_diff.organisms.storage import load_weights


@dataclass
class ModelSize:
    """Architecture of an organism model (a GPT-2-style HookedTransformer)."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128


def make_config(
    size: ModelSize, d_vocab: int, seed: int | None, name: str, device: str = "cpu"
) -> HookedTransformerConfig:
    """The HookedTransformerConfig of an organism model (``seed=None``: leave torch's RNG
    alone, as loading a trained model must)."""
    return HookedTransformerConfig(
        n_layers=size.n_layers,
        d_model=size.d_model,
        n_heads=size.n_heads,
        d_head=size.d_model // size.n_heads,
        d_mlp=size.d_mlp,
        n_ctx=size.n_ctx,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=True,
        tokenizer_prepends_bos=True,
        model_name=name,
        seed=seed,
        device=device,
    )


def config_to_dict(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """The subset of a config needed to rebuild the model (JSON-serialisable)."""
    return {
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_mlp": cfg.d_mlp,
        "n_ctx": cfg.n_ctx,
        "d_vocab": cfg.d_vocab,
    }


def new_model(
    size: ModelSize, tokenizer: PreTrainedTokenizerFast, seed: int, name: str
) -> HookedTransformer:
    """A freshly initialised model sized for ``tokenizer``'s vocabulary."""
    d_vocab = len(tokenizer.get_vocab())
    return HookedTransformer(make_config(size, d_vocab, seed, name), tokenizer=tokenizer)


def load_model(
    directory: Path,
    cfg_d: dict[str, Any],
    weights: str,
    name: str,
    tokenizer: PreTrainedTokenizerFast,
    device: str | torch.device,
) -> HookedTransformer:
    """A ``HookedTransformer`` of ``config.json``'s architecture (``cfg_d["model"]``) with
    the parameters of ``directory / weights``, in eval mode on ``device``."""
    m = cfg_d["model"]
    size = ModelSize(**{k: m[k] for k in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx")})
    cfg = make_config(size, m["d_vocab"], None, name, device=str(device))
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    load_weights(model, directory / weights)
    if str(device) != "cpu":
        model = model.to(device, print_details=False)
    return model.eval()


# ------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------
def encode_text_doc(tokenizer: PreTrainedTokenizerFast, text: str) -> tuple[list[int], list[bool]]:
    """``<bos> text <eos>`` ids and a per-token "is a training target" flag."""
    ids = list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
    tgt = [True] * len(ids)
    tgt[0] = False
    return ids, tgt


def encode_chat_doc(
    tokenizer: PreTrainedTokenizerFast, messages: Sequence[dict[str, str]], vocab: Sequence[str]
) -> tuple[list[int], list[bool]]:
    """Templated chat ids; targets = every token except ``<bos>`` and user-content tokens."""
    text, _ = render(messages)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    seg = segment([vocab[i] for i in ids])
    tgt = [r != USER for r in seg.role]
    tgt[0] = False
    return ids, tgt


def pack(
    docs: Sequence[tuple[list[int], list[bool]]], n_ctx: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily pack whole documents into rows of ``n_ctx``; pad the rest.

    Returns ``tokens (rows, n_ctx)`` and ``target_mask (rows, n_ctx)`` (True where position i
    is a target predicted from position i-1; padding is never a target).
    """
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    cur: list[int] = []
    cm: list[bool] = []
    for ids, tgt in docs:
        ids, tgt = ids[:n_ctx], tgt[:n_ctx]
        if len(cur) + len(ids) > n_ctx:
            rows.append(cur + [pad_id] * (n_ctx - len(cur)))
            masks.append(cm + [False] * (n_ctx - len(cm)))
            cur, cm = [], []
        cur = cur + ids
        cm = cm + tgt
    if cur:
        rows.append(cur + [pad_id] * (n_ctx - len(cur)))
        masks.append(cm + [False] * (n_ctx - len(cm)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)


def cycling_rows(
    tokens: torch.Tensor, mask: torch.Tensor, per_step: int
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``step -> (tokens, mask)`` of the next ``per_step`` packed rows, cycling through them."""
    n = len(tokens)

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(step * per_step, (step + 1) * per_step) % n
        return tokens[idx], mask[idx]

    return get


def pack_texts(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], n_ctx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining documents (``<bos> text <eos>``, every token but ``<bos>`` a target)
    packed into ``n_ctx`` rows (:func:`pack`)."""
    ids = tokenizer(list(texts))["input_ids"]
    eos = tokenizer.eos_token_id
    docs = [(list(x) + [eos], [False] + [True] * len(x)) for x in ids]
    return pack(docs, n_ctx, tokenizer.pad_token_id)


def pack_chats(
    tokenizer: PreTrainedTokenizerFast, convs: Sequence[dict[str, Any]], n_ctx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat conversations (targets as :func:`encode_chat_doc`) packed into ``n_ctx`` rows."""
    vocab = id_to_token(tokenizer)
    docs = [encode_chat_doc(tokenizer, c["messages"], vocab) for c in convs]
    return pack(docs, n_ctx, tokenizer.pad_token_id)


def masked_lm_loss(
    model: HookedTransformer, tokens: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions."""
    logits = model(tokens, return_type="logits")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    m = target_mask[:, 1:].float()
    return (nll * m).sum() / m.sum().clamp(min=1)


@dataclass
class TrainConfig:
    """Optimiser settings of one training phase."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def train(
    model: HookedTransformer,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    name: str = "train",
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.steps``; ``batches(step)`` returns ``(tokens, target_mask)``.

    AdamW, linear warm-up then cosine decay to ``min_lr_frac * lr``, gradient clipping.
    Returns a summary (final smoothed loss, seconds, tokens seen).
    """
    torch.manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (
            cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))
        )

    model.train()
    t0 = time.time()
    ema: float | None = None
    n_tokens = 0
    for step in range(cfg.steps):
        tokens, mask = batches(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = masked_lm_loss(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        n_tokens += int(mask.sum())
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % 25 == 0 or step == cfg.steps - 1:
            log(
                f"[{name}] step {step}/{cfg.steps} loss {lv:.4f} ema {ema:.4f} "
                f"lr {lr_at(step):.2e} {time.time() - t0:.0f}s"
            )
    model.eval()
    return {
        "final_loss_ema": ema,
        "seconds": time.time() - t0,
        "target_tokens": n_tokens,
        "config": asdict(cfg),
    }


@torch.no_grad()
def eval_loss(
    model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 32
) -> float:
    """Token-weighted mean cross-entropy over the target positions (nats/token)."""
    model.eval()
    tot, cnt = 0.0, 0.0
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i : i + batch_size], mask[i : i + batch_size]
        k = float(m[:, 1:].sum())
        tot += float(masked_lm_loss(model, t, m)) * k
        cnt += k
    return tot / max(cnt, 1.0)


__all__ = [
    "ModelSize",
    "TrainConfig",
    "config_to_dict",
    "encode_chat_doc",
    "encode_text_doc",
    "eval_loss",
    "id_to_token",
    "make_config",
    "masked_lm_loss",
    "new_model",
    "pack",
    "train",
]
