"""KL attribution: which latents explain the highest-KL tokens (the diff-SAE posts' pipeline).

1. Per-token ``KL(p_ft || p_stitched)`` at the dictionary's layer (base first half, ft second
   half) over the dataset; keep the ``top_tokens`` highest masked positions.
2. For each such position ``t``: the dictionary's codes on the sequence up to ``t``; every
   latent active at any position ``<= t`` is a candidate. A first-order estimate ranks them:
   ``sum_s f_j(s) * (dKL_t/dh_s . Dd_j)`` (``Dd_j`` = the latent's contribution to
   ``x^c - x^b`` per unit activation). With ``method="exact"`` the best ``n_candidates``
   are then patched one at a time, ``h = x^b + f_j Dd_j`` at every position ``<= t``, into
   the stitched run and the KL at ``t`` re-measured.
3. ``reduction`` = KL_t(stitched) - KL_t(patched); ``frac`` = reduction / KL_t(stitched).

Returned: a ranked list per token (``top_latents`` rows each) and an overall ranking
(reduction summed over the selected tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.evaluation.kl import as_token_mask, token_kl, token_strings
from sae_diff.evaluation.patching import DictionaryPatcher, split_batch
from sae_diff.evaluation.stitching import resolve_layer
from sae_diff.pairing.model import PairedModel


@dataclass
class KLAttribution:
    """``per_token``: seq, pos, token, kl_stitched, rank, latent, activation (f at ``pos``),
    reduction, frac, linear (first-order estimate of the KL change, negative = reduces);
    ``overall``: per latent n_tokens, total_reduction, mean_reduction, mean_frac, sorted."""

    per_token: pd.DataFrame
    overall: pd.DataFrame
    tokens: pd.DataFrame


@torch.no_grad()
def stitched_token_kl(
    paired: PairedModel,
    tokens: torch.Tensor,
    layer: int,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position ``KL(p_ft || p_stitched)`` ``(N, S)`` at ``layer`` (CPU)."""
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        am = None if attention_mask is None else attention_mask[sl]
        b = split_batch(paired, tokens[sl], layer, rows=sl, attention_mask=am)
        ref = paired.continue_from("ft", b.x_ft, layer, tokens=tokens[sl], attention_mask=am)
        st = paired.continue_from("ft", b.x_base, layer, tokens=tokens[sl], attention_mask=am)
        out.append(token_kl(ref, st.to(ref.device)).cpu())
    return torch.cat(out)


def kl_attribution(
    paired: PairedModel,
    sae: PairedDictionary,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    layer: int | str | None = None,
    *,
    top_tokens: int = 20,
    n_candidates: int = 32,
    top_latents: int = 10,
    method: str = "exact",
    batch_size: int = 8,
    include_bias: bool = False,
) -> KLAttribution:
    """Rank latents by how much patching each into the stitched run reduces the KL at the
    highest-KL tokens (see the module doc).

    Args:
        paired, sae, tokens, token_mask, layer: as :func:`~sae_diff.evaluation.patching.kl_patching_table`.
        top_tokens: how many highest-KL masked positions to explain.
        n_candidates: latents patched exactly per token (the best by the first-order estimate).
        top_latents: rows kept per token.
        method: ``"exact"`` (patch and re-run) or ``"gradient"`` (first-order estimate only).
    """
    if method not in ("exact", "gradient"):
        raise ValueError(f"method must be 'exact' or 'gradient', got {method!r}")
    L = resolve_layer(paired, layer, {"dictionary": sae})
    p = DictionaryPatcher(sae, include_bias=include_bias)
    mask = as_token_mask(token_mask, tokens)
    kl = stitched_token_kl(paired, tokens, L, batch_size=batch_size)
    vals = torch.where(mask, kl, torch.tensor(float("-inf")))
    k = min(top_tokens, int(mask.sum()))
    flat = torch.topk(vals.flatten(), k).indices.tolist() if k > 0 else []
    rows_dir = p.delta_rows()
    S = tokens.shape[1]
    per_token: list[dict[str, Any]] = []
    tok_rows: list[dict[str, Any]] = []
    for idx in flat:
        b, t = divmod(int(idx), S)
        tb = tokens[b : b + 1, : t + 1]
        batch = split_batch(paired, tb, L)
        ref = paired.continue_from("ft", batch.x_ft, L, tokens=tb)[0, t]
        f = batch.codes(p)[0]  # (t+1, n)
        active = (f > 0).any(0).nonzero().flatten()
        kl0 = float(kl[b, t])
        tok_str = token_strings(paired.tokenizer, [int(tokens[b, t])])[0]
        tok_rows.append(
            {
                "seq": b,
                "pos": t,
                "token": tok_str,
                "kl_stitched": kl0,
                "n_active": int(active.numel()),
            }
        )
        if active.numel() == 0:
            continue
        # first-order estimate: d KL_t / d h . (f_j Dd_j), summed over positions
        with torch.enable_grad():
            h = batch.x_base.detach().clone().requires_grad_(True)
            logits = paired.continue_from("ft", h, L, tokens=tb)[0, t]
            token_kl(ref[None], logits[None]).sum().backward()
        assert h.grad is not None
        g = h.grad[0].to(rows_dir.dtype)  # (t+1, d)
        D = rows_dir[active.to(rows_dir.device)].to(g.device)  # (a, d)
        lin = ((g @ D.T) * f[:, active].to(g.device)).sum(0)  # (a,)
        order = torch.argsort(lin)  # most negative first
        if method == "gradient":
            cand = active[order[:top_latents].cpu()]
            red = (-lin[order[:top_latents]]).tolist()
            lin_sel = lin[order[:top_latents]].tolist()
        else:
            sel = order[:n_candidates]
            cand = active[sel.cpu()]
            lin_c = lin[sel]
            reds = []
            for lo in range(0, cand.numel(), batch_size):
                c = cand[lo : lo + batch_size]
                contrib = (
                    f[:, c].T.to(D.dtype)[..., None] * rows_dir[c.to(rows_dir.device)][:, None, :]
                )
                hs = (
                    batch.x_base[0][None] + contrib.to(batch.x_base.dtype)
                ).contiguous()  # (c, t+1, d)
                lg = paired.continue_from("ft", hs, L, tokens=tb.expand(c.numel(), -1))[:, t]
                reds.append(kl0 - token_kl(ref[None].expand_as(lg), lg).cpu())
            red_t = torch.cat(reds)
            o2 = torch.argsort(red_t, descending=True)[:top_latents]
            cand, red, lin_sel = cand[o2], red_t[o2].tolist(), lin_c[o2.to(lin_c.device)].tolist()
        for rank, (j, r, li) in enumerate(zip(cand.tolist(), red, lin_sel, strict=True)):
            per_token.append(
                {
                    "seq": b,
                    "pos": t,
                    "token": tok_str,
                    "kl_stitched": kl0,
                    "rank": rank,
                    "latent": int(j),
                    "activation": float(f[t, j]),
                    "reduction": float(r),
                    "frac": float(r) / kl0 if kl0 > 0 else float("nan"),
                    "linear": float(li),
                }
            )
    pt = pd.DataFrame(
        per_token,
        columns=[
            "seq",
            "pos",
            "token",
            "kl_stitched",
            "rank",
            "latent",
            "activation",
            "reduction",
            "frac",
            "linear",
        ],
    )
    if len(pt):
        overall = (
            pt.groupby("latent")
            .agg(
                n_tokens=("pos", "size"),
                total_reduction=("reduction", "sum"),
                mean_reduction=("reduction", "mean"),
                mean_frac=("frac", "mean"),
            )
            .sort_values("total_reduction", ascending=False)
            .reset_index()
        )
    else:
        overall = pd.DataFrame(
            columns=["latent", "n_tokens", "total_reduction", "mean_reduction", "mean_frac"]
        )
    return KLAttribution(per_token=pt, overall=overall, tokens=pd.DataFrame(tok_rows))


__all__ = ["KLAttribution", "kl_attribution", "stitched_token_kl"]
