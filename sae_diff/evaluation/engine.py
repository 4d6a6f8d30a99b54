"""The patching engine: run named interventions at a split layer and measure them.

For each batch the base and ft residuals at the split layer are computed once
(:func:`~sae_diff.evaluation.interventions.split_batch`); every intervention builds a residual
``h`` from them and costs one ft second-half forward. :class:`PatchMetrics` accumulates the
masked KL to the ft model (all / first ``n`` / rest positions) and the next-token NLL as exact
sums, so means over many batches equal the mean over all tokens. The table built on top of it
(targeted subsets, random baselines, gap closed) is :mod:`sae_diff.evaluation.patching`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sae_diff.evaluation.interventions import Intervention, split_batch, stitched
from sae_diff.evaluation.kl import FIRST_N, as_token_mask, split_first_n, token_kl, token_nll
from sae_diff.evaluation.stitching import resolve_layer
from sae_diff.pairing.model import PairedModel

__all__ = ["PatchMetrics", "closed_fraction", "evaluate_interventions"]


@dataclass
class PatchMetrics:
    """Masked sums for one intervention; ``.means()`` gives the reported numbers."""

    kl: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    nll: float = 0.0
    n: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # all, first, rest, nll

    def add(self, kl: torch.Tensor, nll: torch.Tensor, masks: Sequence[torch.Tensor]) -> None:
        for i, m in enumerate(masks[:3]):
            self.kl[i] += float(kl[m].double().sum())
            self.n[i] += int(m.sum())
        self.nll += float(nll[masks[3]].double().sum())
        self.n[3] += int(masks[3].sum())

    def means(self) -> dict[str, float]:
        def div(a: float, b: int) -> float:
            return a / b if b else float("nan")

        return {
            "kl": div(self.kl[0], self.n[0]),
            "kl_first": div(self.kl[1], self.n[1]),
            "kl_rest": div(self.kl[2], self.n[2]),
            "nll": div(self.nll, self.n[3]),
            "n_tokens": self.n[0],
        }


def evaluate_interventions(
    paired: PairedModel,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None,
    layer: int,
    interventions: Mapping[str, Intervention],
    *,
    first_n: int = FIRST_N,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Run every intervention at ``layer`` over the dataset and return masked means per name.

    Always includes ``"ft"`` (the reference itself, KL 0) and ``"stitched"``. Each
    intervention is a callable ``SplitBatch -> h (B, S, d)``; the ft model is run from
    ``layer`` on ``h`` (one second-half forward each).

    Returns:
        ``{name: {"kl", "kl_first", "kl_rest", "nll", "n_tokens"}}``.
    """
    layer = resolve_layer(paired, layer)
    mask = as_token_mask(token_mask, tokens)
    first, rest = split_first_n(mask, first_n)
    all_iv: dict[str, Intervention] = {"stitched": stitched(), **dict(interventions)}
    acc = {name: PatchMetrics() for name in ["ft", *all_iv]}
    starts = range(0, tokens.shape[0], batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="KL patching", disable=not progress):
            sl = slice(start, start + batch_size)
            tb = tokens[sl]
            am = None if attention_mask is None else attention_mask[sl]
            batch = split_batch(paired, tb, layer, rows=sl, attention_mask=am)
            ref = paired.continue_from("ft", batch.x_ft, layer, tokens=tb, attention_mask=am)
            dev = ref.device
            m_all = mask[sl].to(dev)
            m_nll = m_all.clone()
            m_nll[:, -1] = False
            masks = [m_all, first[sl].to(dev), rest[sl].to(dev), m_nll]
            acc["ft"].add(torch.zeros(tb.shape, device=dev), token_nll(ref, tb), masks)
            for name, fn in all_iv.items():
                h = fn(batch)
                if not isinstance(h, torch.Tensor) or h.shape != batch.x_base.shape:
                    raise ValueError(
                        f"intervention {name!r} must return a residual shaped "
                        f"{tuple(batch.x_base.shape)}, got "
                        f"{getattr(h, 'shape', type(h).__name__)}"
                    )
                logits = paired.continue_from(
                    "ft", h.contiguous(), layer, tokens=tb, attention_mask=am
                )
                acc[name].add(token_kl(ref, logits.to(dev)), token_nll(logits, tb), masks)
    return {name: a.means() for name, a in acc.items()}


def closed_fraction(kl: float, base: float) -> float:
    """Fraction of the KL gap closed, ``1 - kl / base`` (NaN when the stitched KL is 0)."""
    return 1.0 - kl / base if base > 0 else float("nan")
