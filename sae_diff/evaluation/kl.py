"""Per-token KL between the two models, token masks, and the KL dashboard (METHODS.md §4).

Convention used everywhere in :mod:`sae_diff.evaluation`: metrics are per *position*. The
distribution at position ``i`` is the model's next-token prediction there (it predicts token
``i + 1``); a token mask selects positions. ``KL(p || q)`` is ``sum_v p_v (log p_v - log q_v)``;
the default direction is ``KL(p_ft || p_other)``. The NLL at position ``i`` is
``-log q_i(tokens[i + 1])`` and is undefined (NaN, excluded from means) at the last position.
To score the predictions *of* masked tokens (e.g. the answer tokens themselves) rather than the
predictions *at* them, pass ``predicting(mask)``.

Chat data is reported on the masked (assistant) positions, split into the first ``first_n``
(default 10) masked positions of each sequence and the rest (:func:`split_first_n`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sae_diff.analysis.token_text import decode_pieces
from sae_diff.pairing.model import PairedModel

FIRST_N = 10


# ---------------------------------------------------------------------------- per-token maths
def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per position from logits ``(..., vocab)`` -> ``(...)`` (float32, >= 0)."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(
            f"logits shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}; both "
            "models must be run on the same tokens."
        )
    lp = torch.log_softmax(logits_p.float(), dim=-1)
    lq = torch.log_softmax(logits_q.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token NLL per position ``(B, S)``: ``-log q_i(tokens[i+1])``; NaN at the last position."""
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    lq = torch.log_softmax(logits.float(), dim=-1)
    out = torch.full(tokens.shape, float("nan"), device=logits.device)
    if tokens.shape[1] > 1:
        tgt = tokens[:, 1:].to(logits.device, torch.long)
        out[:, :-1] = -lq[:, :-1].gather(-1, tgt[..., None])[..., 0]
    return out


# ---------------------------------------------------------------------------- masks
def as_token_mask(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """A boolean ``(B, S)`` mask on CPU; ``None`` means every position. Checks the shape."""
    if mask is None:
        return torch.ones(tokens.shape, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"token mask shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape)}; "
            "build it with sae_diff.pairing.masks on the same token batch."
        )
    return mask.detach().to("cpu").bool()


def first_n_of_mask(mask: torch.Tensor, n: int = FIRST_N) -> torch.Tensor:
    """The first ``n`` True positions of each row of ``mask`` (e.g. the first 10 answer tokens)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    mask = mask.bool()
    return mask & (mask.long().cumsum(-1) <= n)


def split_first_n(mask: torch.Tensor, n: int = FIRST_N) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, rest)``: the first ``n`` masked positions of each row, and the remaining ones."""
    first = first_n_of_mask(mask, n)
    return first, mask.bool() & ~first


def predicting(mask: torch.Tensor) -> torch.Tensor:
    """Shift a mask of *target* tokens to the positions that predict them (``mask[:, 1:]``)."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    out[:, :-1] = mask[:, 1:].bool()
    return out


def masked_summary(values: torch.Tensor, mask: torch.Tensor, n: int = FIRST_N) -> dict[str, float]:
    """Mean of ``values`` over ``mask`` (all / first ``n`` / rest), NaN-aware; and token counts."""
    first, rest = split_first_n(mask, n)
    out: dict[str, float] = {}
    for key, m in (("all", mask.bool()), ("first", first), ("rest", rest)):
        v = values[m.to(values.device)]
        v = v[~torch.isnan(v)]
        out[key] = float(v.mean()) if v.numel() else float("nan")
        out[f"n_{key}"] = int(v.numel())
    return out


# ---------------------------------------------------------------------------- token strings
def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Readable strings for token ids (``str(id)`` when there is no tokenizer)."""
    if tokenizer is None:
        return [str(i) for i in ids]
    try:
        return [tokenizer.decode([i]) for i in ids]
    except Exception:  # pragma: no cover - exotic tokenizers
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Per-token strings that join to the tokenizer's own decoding (spaces kept); ids as
    ``[id]`` strings, space-separated, without a tokenizer."""
    if tokenizer is None:
        return [(" " if i else "") + str(t) for i, t in enumerate(ids)]
    return decode_pieces(tokenizer, ids)


def _lead(piece: str) -> str:
    return piece[: len(piece) - len(piece.lstrip(" "))]


# ---------------------------------------------------------------------------- dataset pass
@torch.no_grad()
def per_token_kl(
    paired: PairedModel,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    reverse: bool = False,
) -> dict[str, torch.Tensor]:
    """Run both models over ``tokens`` (batched) and return per-position ``(N, S)`` CPU tensors:
    ``kl`` = KL(p_ft || p_base) (``reverse=True``: KL(p_base || p_ft)), ``nll_base``, ``nll_ft``,
    and the top-1 predictions ``top_base``, ``top_ft``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = ("kl", "nll_base", "nll_ft", "top_base", "top_ft")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for start in range(0, tokens.shape[0], batch_size):
        tb = tokens[start : start + batch_size]
        am = None if attention_mask is None else attention_mask[start : start + batch_size]
        lb, lf = paired.logits(tb, attention_mask=am)
        lb = lb.to(lf.device)
        kl = token_kl(lb, lf) if reverse else token_kl(lf, lb)
        parts["kl"].append(kl.cpu())
        parts["nll_base"].append(token_nll(lb, tb).cpu())
        parts["nll_ft"].append(token_nll(lf, tb).cpu())
        parts["top_base"].append(lb.argmax(-1).cpu())
        parts["top_ft"].append(lf.argmax(-1).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------- dashboard
@dataclass
class KLDashboard:
    """Where the two models' outputs diverge.

    Attributes:
        table: the ``top_n`` highest-KL masked positions, one row each: ``seq``, ``pos``,
            ``token`` (the token at the position), ``next_token`` (the token it predicts),
            ``kl``, ``nll_base``, ``nll_ft``, ``top_base``/``top_ft`` (top-1 predictions),
            ``in_first`` (one of the first ``first_n`` masked positions), ``context`` (the
            preceding ``context`` tokens, the position in ``[[ ]]``).
        summary: mean KL over masked positions: ``all``, ``first``, ``rest`` and counts.
        kl: per-position KL ``(N, S)``, NaN outside the mask.
        tokens, mask: what was evaluated.
    """

    table: pd.DataFrame
    summary: dict[str, float]
    kl: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    tokenizer: Any = None
    first_n: int = FIRST_N
    context: int = 12
    title: str = "KL(p_ft || p_base) per token"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_html(self) -> str:
        """A self-contained HTML page: the summary, then each top row with its context
        coloured by per-token KL (darker = more divergent)."""
        vmax = float(torch.nan_to_num(self.kl, nan=0.0).max()) or 1.0
        rows = []
        for r in self.table.itertuples(index=False):
            lo = max(0, int(r.pos) - self.context)
            ids = self.tokens[int(r.seq), lo : int(r.pos) + 2].tolist()
            strs = _pieces(self.tokenizer, ids)
            spans = []
            for off, s in enumerate(strs):
                p = lo + off
                k = float(self.kl[int(r.seq), p]) if p < self.kl.shape[1] else float("nan")
                a = 0.0 if k != k else min(1.0, k / vmax)
                style = f"background: rgba(220,40,40,{a:.2f});"
                if p == int(r.pos):
                    style += " outline: 2px solid #000;"
                if p == int(r.pos) + 1:
                    style += " color: #888;"
                title = f"pos {p}, KL {k:.4f}"
                spans.append(
                    f'<span style="{style}" title="{title}">{html.escape(repr(s)[1:-1])}</span>'
                )
            rows.append(
                "<tr>"
                f"<td>{int(r.seq)}</td><td>{int(r.pos)}</td><td>{r.kl:.4f}</td>"
                f"<td>{r.nll_base:.3f}</td><td>{r.nll_ft:.3f}</td>"
                f"<td>{html.escape(str(r.top_base))}</td><td>{html.escape(str(r.top_ft))}</td>"
                f"<td>{'yes' if r.in_first else ''}</td>"
                f"<td style='font-family: monospace'>{''.join(spans)}</td></tr>"
            )
        sm = self.summary
        head = (
            f"<h2>{html.escape(self.title)}</h2><p>Mean over masked positions: all "
            f"{sm['all']:.4f} (n={sm['n_all']}), first {self.first_n} {sm['first']:.4f} "
            f"(n={sm['n_first']}), rest {sm['rest']:.4f} (n={sm['n_rest']}). Boxed: the "
            "position; grey: the token it predicts.</p>"
        )
        cols = "".join(
            f"<th>{c}</th>"
            for c in (
                "seq",
                "pos",
                "KL",
                "NLL base",
                "NLL ft",
                "top base",
                "top ft",
                f"first {self.first_n}",
                "context",
            )
        )
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>KL dashboard</title>"
            "<style>td,th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:left}</style>"
            f"</head><body>{head}<table><tr>{cols}</tr>{''.join(rows)}</table></body></html>"
        )

    def save_html(self, path: str | Path) -> Path:
        """Write :meth:`to_html` to ``path`` and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def top_kl_table(
    kl: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    top_n: int = 50,
    first_n: int = FIRST_N,
    context: int = 12,
    tokenizer: Any = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """The ``top_n`` highest-``kl`` masked positions as a DataFrame (see :class:`KLDashboard`).
    ``extra`` adds per-position columns (``(N, S)`` tensors, e.g. NLLs or top-1 ids)."""
    mask = as_token_mask(mask, tokens)
    first = first_n_of_mask(mask, first_n)
    vals = torch.where(mask, kl.float().cpu(), torch.tensor(float("-inf")))
    k = min(top_n, int(mask.sum()))
    top = torch.topk(vals.flatten(), k) if k > 0 else None
    rows: list[dict[str, Any]] = []
    S = tokens.shape[1]
    for flat in [] if top is None else top.indices.tolist():
        b, p = divmod(int(flat), S)
        lo = max(0, p - context)
        pieces = _pieces(tokenizer, tokens[b, lo : p + 1].tolist())
        tok = token_strings(tokenizer, [int(tokens[b, p])])[0]
        nxt = token_strings(tokenizer, [int(tokens[b, p + 1])])[0] if p + 1 < S else ""
        row: dict[str, Any] = {
            "seq": b,
            "pos": p,
            "token": tok,
            "next_token": nxt,
            "kl": float(kl[b, p]),
            "in_first": bool(first[b, p]),
            # decoded by the tokenizer itself, so the context keeps its spaces
            "context": "".join(pieces[:-1]) + _lead(pieces[-1]) + f"[[{pieces[-1].lstrip(' ')}]]",
        }
        for name, t in (extra or {}).items():
            v = t[b, p]
            if name.startswith("top_"):
                row[name] = token_strings(tokenizer, [int(v)])[0]
            else:
                row[name] = float(v)
        rows.append(row)
    cols = ["seq", "pos", "token", "next_token", "kl", *(extra or {}).keys(), "in_first", "context"]
    return pd.DataFrame(rows, columns=cols)


def kl_dashboard(
    paired: PairedModel,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    top_n: int = 50,
    first_n: int = FIRST_N,
    context: int = 12,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
) -> KLDashboard:
    """Per-token KL(p_ft || p_base) over a dataset and its highest-KL positions with context.

    Args:
        paired: the model pair.
        tokens: ``(N, S)`` token ids.
        token_mask: ``(N, S)`` bool, the positions to report (e.g. the assistant mask of
            chat data, with BOS / padding excluded); ``None`` = every position.
        top_n: rows in the table.
        first_n: the "first" split (first ``first_n`` masked positions of each sequence).
        context: tokens of left context shown per row.

    Returns:
        A :class:`KLDashboard` (``.table``, ``.summary``, ``.to_html()``, ``.save_html()``).
    """
    mask = as_token_mask(token_mask, tokens)
    stats = per_token_kl(paired, tokens, batch_size=batch_size, attention_mask=attention_mask)
    kl = torch.where(mask, stats["kl"], torch.tensor(float("nan")))
    summary = masked_summary(stats["kl"], mask, first_n)
    extra = {k: stats[k] for k in ("nll_base", "nll_ft", "top_base", "top_ft")}
    table = top_kl_table(
        stats["kl"],
        tokens.cpu(),
        mask,
        top_n=top_n,
        first_n=first_n,
        context=context,
        tokenizer=paired.tokenizer,
        extra=extra,
    )
    return KLDashboard(
        table=table,
        summary=summary,
        kl=kl,
        tokens=tokens.cpu(),
        mask=mask,
        tokenizer=paired.tokenizer,
        first_n=first_n,
        context=context,
    )


__all__ = [
    "FIRST_N",
    "KLDashboard",
    "as_token_mask",
    "first_n_of_mask",
    "kl_dashboard",
    "masked_summary",
    "per_token_kl",
    "predicting",
    "split_first_n",
    "token_kl",
    "token_nll",
    "token_strings",
    "top_kl_table",
]
