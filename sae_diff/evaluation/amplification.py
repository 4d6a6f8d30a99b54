"""Diff amplification: exaggerate what fine-tuning changed, to surface rare ft behaviours.

Two forms, both equal to the ft model at ``alpha = 0``:

- logit space: ``p ∝ exp(l_ft + alpha (l_ft - l_base))``;
- activation space at layer ``L``: run the ft model from ``L`` on ``x^c + alpha (x^c - x^b)``.

Use them to *score* a planted behaviour's response (its log-probability as ``alpha`` grows,
:func:`response_logprob`) or to *sample* from the amplified model and count how often a
detector fires (:func:`amplification_sweep`). Sampling re-runs both models on the whole
sequence at each step (no KV cache): meant for short probes, not long generations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from sae_diff.evaluation.kl import predicting
from sae_diff.evaluation.stitching import resolve_layer
from sae_diff.pairing.model import PairedModel

MODES = ("logits", "activations")


def amplified_logits(
    logits_ft: torch.Tensor, logits_base: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``l_ft + alpha (l_ft - l_base)``."""
    if logits_ft.shape != logits_base.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(logits_ft.shape)} vs {tuple(logits_base.shape)}"
        )
    return logits_ft + alpha * (logits_ft - logits_base.to(logits_ft.device))


def _check_mode(mode: str, layer: int | str | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "activations" and layer is None:
        raise ValueError("activation-space amplification needs layer= (an int or residual hook)")


@torch.no_grad()
def amplified_model_logits(
    paired: PairedModel,
    tokens: torch.Tensor,
    alpha: float,
    *,
    mode: str = "logits",
    layer: int | str | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``(B, S, vocab)`` of the amplified model on ``tokens`` (see the module doc)."""
    _check_mode(mode, layer)
    if mode == "logits":
        lb, lf = paired.logits(tokens, attention_mask=attention_mask)
        return amplified_logits(lf, lb, alpha)
    L = resolve_layer(paired, layer)
    xb = paired.residual_at("base", tokens, L, attention_mask=attention_mask)
    xc = paired.residual_at("ft", tokens, L, attention_mask=attention_mask).to(xb.device)
    h = xc + alpha * (xc - xb)
    return paired.continue_from("ft", h, L, tokens=tokens, attention_mask=attention_mask)


@torch.no_grad()
def sample_amplified(
    paired: PairedModel,
    prompt: torch.Tensor,
    alpha: float,
    *,
    mode: str = "logits",
    layer: int | str | None = None,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Sample continuations of ``prompt`` (``(B, P)``; equal lengths) from the amplified model.

    ``temperature = 0`` is greedy. Rows stop at a token in ``stop_token_ids`` (later
    positions are filled with that token). Returns ``(B, P + max_new_tokens)`` on CPU.
    """
    _check_mode(mode, layer)
    if prompt.dim() == 1:
        prompt = prompt[None]
    g = torch.Generator().manual_seed(seed)
    seq = prompt.detach().cpu().long()
    done = torch.zeros(seq.shape[0], dtype=torch.bool)
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long)
    for _ in range(max_new_tokens):
        logits = (
            amplified_model_logits(paired, seq, alpha, mode=mode, layer=layer)[:, -1].float().cpu()
        )
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
        nxt = torch.where(done, seq[:, -1], nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if stops.numel():
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                pad = seq[:, -1:].expand(-1, prompt.shape[1] + max_new_tokens - seq.shape[1])
                return torch.cat([seq, pad], dim=1)
    return seq


@torch.no_grad()
def response_logprob(
    paired: PairedModel,
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    alphas: Sequence[float],
    *,
    mode: str = "logits",
    layer: int | str | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Score a planted response under amplification: for each ``alpha``, the log-probability
    of the tokens marked by ``response_mask`` (``(N, S)``: the response tokens themselves,
    scored at the positions predicting them).

    Returns one row per alpha: ``logprob`` (mean over sequences of the summed response
    log-prob), ``logprob_per_token``, ``prob`` (mean of ``exp(logprob)``), ``n_seqs``.
    """
    _check_mode(mode, layer)
    if tuple(response_mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} must match tokens {tuple(tokens.shape)}"
        )
    pred = predicting(response_mask.bool().cpu())
    rows = []
    for a in alphas:
        seq_lp: list[torch.Tensor] = []
        n_tok = 0
        for start in range(0, tokens.shape[0], batch_size):
            tb = tokens[start : start + batch_size]
            m = pred[start : start + batch_size]
            lp = torch.log_softmax(
                amplified_model_logits(paired, tb, float(a), mode=mode, layer=layer).float().cpu(),
                -1,
            )
            tgt = torch.zeros_like(tb.cpu())
            tgt[:, :-1] = tb.cpu()[:, 1:]
            tok_lp = lp.gather(-1, tgt[..., None].long())[..., 0] * m
            seq_lp.append(tok_lp.sum(-1))
            n_tok += int(m.sum())
        s = torch.cat(seq_lp)
        rows.append(
            {
                "alpha": float(a),
                "mode": mode,
                "logprob": float(s.mean()),
                "logprob_per_token": float(s.sum()) / max(n_tok, 1),
                "prob": float(s.exp().mean()),
                "n_seqs": int(s.numel()),
            }
        )
    return pd.DataFrame(rows)


Detector = Callable[[torch.Tensor, str], bool]


def amplification_sweep(
    paired: PairedModel,
    prompts: Sequence[torch.Tensor] | torch.Tensor,
    alphas: Sequence[float],
    detector: Detector,
    *,
    mode: str = "logits",
    layer: int | str | None = None,
    n_samples: int = 16,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    return_samples: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """How often a behaviour appears in samples as amplification grows.

    Each prompt (1-D token tensor) is sampled ``n_samples`` times per ``alpha``;
    ``detector(new_token_ids, decoded_text) -> bool`` marks a sample as showing the behaviour
    (e.g. the planted response appears).

    Returns:
        One row per alpha: ``rate`` (fraction of samples flagged), ``n_hits``, ``n``; with
        ``return_samples`` also a DataFrame of every sample (alpha, prompt, sample, text, hit).
    """
    _check_mode(mode, layer)
    plist = [p for p in prompts] if not isinstance(prompts, torch.Tensor) else list(prompts)
    rows, samples = [], []
    tok = paired.tokenizer
    for a in alphas:
        hits = n = 0
        for i, p in enumerate(plist):
            p = p.flatten()
            batch = p[None].expand(n_samples, -1)
            out = sample_amplified(
                paired,
                batch,
                float(a),
                mode=mode,
                layer=layer,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=seed + 1000 * i,
                stop_token_ids=stop_token_ids,
            )
            for j in range(n_samples):
                new = out[j, p.numel() :]
                text = (
                    tok.decode(new.tolist())
                    if tok is not None
                    else " ".join(map(str, new.tolist()))
                )
                hit = bool(detector(new, text))
                hits += hit
                n += 1
                if return_samples:
                    samples.append(
                        {"alpha": float(a), "prompt": i, "sample": j, "text": text, "hit": hit}
                    )
        rows.append(
            {"alpha": float(a), "mode": mode, "rate": hits / max(n, 1), "n_hits": hits, "n": n}
        )
    df = pd.DataFrame(rows)
    if return_samples:
        return df, pd.DataFrame(samples)
    return df


def contains_tokens(target: Sequence[int]) -> Detector:
    """A detector: the sample contains the token sequence ``target`` contiguously."""
    t = list(target)

    def det(ids: torch.Tensor, text: str) -> bool:
        s = ids.tolist()
        return any(s[i : i + len(t)] == t for i in range(len(s) - len(t) + 1))

    return det


__all__ = [
    "MODES",
    "amplification_sweep",
    "amplified_logits",
    "amplified_model_logits",
    "contains_tokens",
    "response_logprob",
    "sample_amplified",
]
