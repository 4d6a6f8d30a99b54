"""Inference codes of a batch as sparse triples: the one sparse-encode reader of sae_diff.

:class:`SparseCodes` returns a dictionary's inference codes as row-major ``(token i, latent j,
value v)`` triples. For sae_diff's inference crosscoders (no attached hooks) it reads them off
the encoder matmul without the dense bias / ReLU / mask passes of ``sae.encode`` (same entries,
same values); for everything else it calls ``sae.encode`` and takes the non-zeros. Latent
Scaling and max-activating examples read codes through it.

It relies on the crosscoder layout of :mod:`sae_diff.dictionaries.base` (``W_enc_flat``,
``normalised_input``, ``b_enc``, ``threshold``) and only takes the fast path when the class's
``encode`` / ``hidden_pre`` / ``activate`` are the base ones, so an architecture that changes
its encoder falls back to ``sae.encode`` automatically.
"""

from __future__ import annotations

import torch

from sae_diff.dictionaries.base import CrosscoderSAE
from sae_diff.dictionaries.batchtopk_crosscoder import JumpReLUCrosscoder
from sae_diff.dictionaries.protocol import PairedDictionary

#: model index of the base and the fine-tune in paired activations ``(..., 2, d)``
BASE, FT = 0, 1


def _has_hooks(sae: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in sae.modules())


class SparseCodes:
    """Inference codes of a batch as sparse row-major triples ``(token i, latent j, value v)``.

    For sae_diff's inference crosscoders without attached hooks (``sparse_codes``), codes are
    read off the encoder matmul: ``h = x W_enc + b_enc`` is only formed where a candidate
    mask (the threshold lowered by a few ulps) fires, then filtered exactly by
    ``h > max(threshold, 0)`` — the same entries and values ``sae.encode`` returns, without its
    dense bias/ReLU/mask passes. Everything else calls ``sae.encode`` and takes its non-zeros.
    """

    def __init__(self, sae: PairedDictionary, kind: str, sparse_codes: bool = True) -> None:
        self.sae, self.kind = sae, kind
        self.n = int(sae.cfg.d_sae)
        #: the crosscoder whose codes are read off the encoder matmul, or None (sae.encode)
        self.crosscoder: CrosscoderSAE | None = None
        if sparse_codes and isinstance(sae, CrosscoderSAE):
            cls = type(sae)
            if (
                cls.encode is CrosscoderSAE.encode
                and cls.hidden_pre is CrosscoderSAE.hidden_pre
                and cls.activate in (CrosscoderSAE.activate, JumpReLUCrosscoder.activate)
                and not _has_hooks(sae)
            ):
                self.crosscoder = sae
        self.fast = self.crosscoder is not None
        if self.fast:
            thr = getattr(sae, "threshold", None)
            zero = torch.zeros(self.n, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
            self.min_pre = zero if thr is None else thr.detach().clamp(min=0)
            b = sae.b_enc.detach()
            margin = (
                4 * torch.finfo(b.dtype).eps * (self.min_pre.abs() + b.abs())
                + torch.finfo(b.dtype).tiny
            )
            self.candidate = self.min_pre - b - margin  # mm > candidate  <=  mm + b > min_pre

    def encoder_input(self, acts: torch.Tensor, model: int | None = None) -> torch.Tensor:
        if self.kind in ("crosscoder", "diff_sae"):
            return acts
        if model is None:
            model = FT if self.kind == "ft_sae" else BASE
        return acts[:, model]

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.crosscoder is not None:
            sae = self.crosscoder
            x_n = sae.normalised_input(x)
            if sae.cfg.apply_b_dec_to_input:
                x_n = x_n - sae.b_dec
            mm = x_n.reshape(x_n.shape[0], -1) @ sae.W_enc_flat
            lin = (mm > self.candidate).view(-1).nonzero().squeeze(1)
            i = torch.div(lin, self.n, rounding_mode="floor")
            j = lin - i * self.n
            v = mm.view(-1).index_select(0, lin) + sae.b_enc.detach().index_select(0, j)
            keep = v > self.min_pre.index_select(0, j)
            if not bool(keep.all()):
                i, j, v = i[keep], j[keep], v[keep]
            return i, j, v
        f = self.sae.encode(x)
        flat = f.reshape(-1)
        lin = (flat != 0).nonzero().squeeze(1)
        i = torch.div(lin, self.n, rounding_mode="floor")
        return i, lin - i * self.n, flat.index_select(0, lin)


__all__ = ["SparseCodes"]
