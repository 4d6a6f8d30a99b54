"""Latent dashboards for report.html: what a latent fires on and what it does.

A dashboard shows, for one candidate latent: its max-activating contexts and quantile samples
(decoded by the tokenizer itself, so text keeps its spaces), a histogram of its non-zero
activations on the held-out scoring set, its Δ / ν figures, the logit lens of its ft decoder
direction (which next tokens it promotes and suppresses through the ft model's final layer
norm scale and unembedding), and the behaviour it matches best at each granularity.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from sae_diff.analysis.examples import LatentExamples
from sae_diff.dictionaries.protocol import PairedDictionary


def decoder_direction(sae: PairedDictionary, kind: str, latent: int) -> torch.Tensor:
    """The latent's decoder row in the ft model's residual space ``(d,)``: the ft half of a
    crosscoder's decoder, a diff-SAE's (signed) row (what it adds to ``x_ft - x_base``), an
    SAE's row."""
    w = sae.W_dec.detach().float().cpu()
    if kind == "crosscoder":
        w = w.reshape(w.shape[0], 2, -1)[:, 1]
    elif kind == "diff_sae" and getattr(sae.cfg, "diff_sign", "ft_minus_base") == "base_minus_ft":
        w = -w
    return w[int(latent)]


@torch.no_grad()
def logit_lens(
    direction: torch.Tensor, model: Any, tokenizer: Any, k: int = 8
) -> dict[str, list[tuple[str, float]]]:
    """Top ``k`` promoted and suppressed tokens of a residual direction read by ``model``'s
    unembedding: ``((v - mean(v)) * ln_final.w) @ W_U`` (the final LayerNorm centres its input
    and scales each coordinate; its per-token normalisation does not change the ordering)."""
    v = direction.detach().double().cpu().flatten()
    w_u = model.W_U.detach().double().cpu()
    if v.shape[0] != w_u.shape[0]:
        raise ValueError(
            f"direction has {v.shape[0]} dims but the unembedding reads {w_u.shape[0]}."
        )
    v = v - v.mean()
    ln = getattr(getattr(model, "ln_final", None), "w", None)
    if ln is not None:
        v = v * ln.detach().double().cpu()
    logits = v @ w_u
    k = min(k, logits.numel())
    top, bot = torch.topk(logits, k), torch.topk(-logits, k)

    def name(i: int) -> str:
        return str(tokenizer.decode([i])) if tokenizer is not None else str(i)

    return {
        "promoted": [(name(int(i)), round(float(x), 3)) for x, i in zip(top.values, top.indices)],
        "suppressed": [
            (name(int(i)), round(-float(x), 3)) for x, i in zip(bot.values, bot.indices)
        ],
    }


def histogram(values: torch.Tensor, bins: int = 20) -> dict[str, list[float]]:
    """Counts of the non-zero values in ``bins`` equal-width bins (edges included)."""
    v = values.detach().double().flatten().cpu().numpy()
    v = v[v != 0]
    if v.size == 0:
        return {"counts": [], "edges": []}
    counts, edges = np.histogram(v, bins=bins)
    return {"counts": [int(c) for c in counts], "edges": [round(float(e), 4) for e in edges]}


def histogram_svg(hist: Mapping[str, Sequence[float]], width: int = 260, height: int = 70) -> str:
    """A small inline SVG bar chart of :func:`histogram` (no script needed)."""
    counts = list(hist.get("counts", []))
    if not counts:
        return "<p class='small'>no non-zero activation on the scoring set</p>"
    edges = list(hist["edges"])
    top = max(counts) or 1
    bw = width / len(counts)
    bars = "".join(
        f"<rect x='{i * bw:.1f}' y='{height - 14 - (height - 14) * c / top:.1f}' width='{max(bw - 1, 1):.1f}' "
        f"height='{(height - 14) * c / top:.1f}' fill='#e8782a'><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    labels = (
        f"<text x='0' y='{height - 2}' font-size='10'>{edges[0]:.3g}</text>"
        f"<text x='{width}' y='{height - 2}' font-size='10' text-anchor='end'>{edges[-1]:.3g}</text>"
    )
    return (
        f"<svg class='sd-hist' width='{width}' height='{height}' role='img' "
        f"aria-label='activation histogram'>{bars}{labels}</svg>"
    )


def best_match(matrices: Mapping[str, pd.DataFrame], candidate: int) -> dict[str, dict[str, Any]]:
    """Per granularity: the behaviour this candidate scores best on, and that AUROC."""
    out: dict[str, dict[str, Any]] = {}
    for gran, m in matrices.items():
        if candidate in m.index and m.loc[candidate].notna().any():
            b = str(m.loc[candidate].idxmax())
            out[gran] = {"behaviour": b, "auroc": round(float(m.at[candidate, b]), 4)}
    return out


def _examples_html(ex: LatentExamples) -> str:
    vmax = ex.top[0].value if ex.top else None
    parts = [
        "<div class='sd-col'><h5>Max-activating contexts</h5>",
        *(e.to_html(vmax) for e in ex.top),
    ]
    for lo, hi, exs in ex.quantiles:
        parts.append(f"<h5>Quantile sample, activations in [{lo:.3g}, {hi:.3g}]</h5>")
        parts += [e.to_html(vmax) for e in exs]
    parts.append("</div>")
    return "\n".join(parts)


def render_dashboard(method: str, info: Mapping[str, Any], ex: LatentExamples | None) -> str:
    """One latent's dashboard as an HTML ``<div class='latent-dashboard'>``."""
    latent = int(info["latent"])
    figs = []
    for key, label in (
        ("rank", "rank"),
        ("delta", "Δ"),
        ("tag", "tag"),
        ("nu_error", "ν_ε"),
        ("nu_recon", "ν_r"),
        ("nu_act", "ν_act"),
        ("count_active", "active tokens (cache)"),
        ("freq", "firing frequency"),
    ):
        if info.get(key) is not None:
            v = info[key]
            figs.append(
                f"{label} = {v:.3g}" if isinstance(v, float) else f"{label} = {html.escape(str(v))}"
            )
    match = info.get("best_match", {})
    rows = "".join(
        f"<tr><td>{g}</td><td>{html.escape(m['behaviour'])}</td><td>{m['auroc']:.3f}</td></tr>"
        for g, m in match.items()
    )
    lens = info.get("logit_lens", {})

    def toks(key: str) -> str:
        return ", ".join(
            f"<code>{html.escape(repr(t)[1:-1])}</code> ({v:+.2f})" for t, v in lens.get(key, [])
        )

    parts = [
        f"<div class='latent-dashboard' id='dash-{html.escape(method)}-{latent}'>",
        f"<h4>{html.escape(method)} latent {latent}</h4><p class='small'>{'; '.join(figs)}</p>",
        "<div class='sd-row'><div class='sd-col'>",
        "<h5>Best-matching behaviour (AUROC vs controls)</h5>",
        f"<table class='best-match'><tr><th>granularity</th><th>behaviour</th><th>AUROC</th></tr>{rows}</table>",
        "<h5>Activation histogram (held-out scoring set, non-zero)</h5>",
        histogram_svg(info.get("histogram", {})),
        "<h5>Logit lens of the ft decoder direction</h5>",
        f"<p class='logit-lens'>promotes: {toks('promoted')}<br>suppresses: {toks('suppressed')}</p></div>",
    ]
    parts.append(
        _examples_html(ex) if ex is not None else "<div class='sd-col'><p>no examples</p></div>"
    )
    parts.append("</div></div>")
    return "\n".join(parts)
