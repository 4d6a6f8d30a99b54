"""Latent Scaling in closed form, streamed in one pass over paired activations (METHODS.md §3).

For latent j with direction ``d_j`` (the ft decoder row ``d_j^c`` of a crosscoder; the only
decoder row of an SAE), codes ``f_ij`` from the *inference* encoder (JumpReLU threshold, never
batch top-k) and a target ``y_i``::

    beta_j = d_j^T (sum_i f_ij y_i) / (||d_j||^2 * sum_i f_ij^2)

Targets, for model m in {base (index 0), ft (index 1)}:

- crosscoders: ``reconstruction`` (y = xhat^m) and ``error``
  (y = x^m - (xhat^m - f_ij d_j^m)); ``activation`` (y = x^m) is available too;
- SAEs (chat/ft-SAE, base-SAE, diff-SAE): ``activation`` (y = x^m).

Ratios ``nu_error = beta_error_base / beta_error_ft`` (ν_ε), ``nu_recon`` (ν_r) and ``nu_act``.

**Normalised space.** Saved crosscoders have their per-model scalars ``cfg.norm_factors``
folded into the weights (they read raw activations). Latent Scaling works in the training
(normalised) space: inputs are ``x_n^m = norm_factors[m] * x^m`` and decoder rows come from
``geometry.decoder_rows(sae, normalised=True)``; codes are unchanged by the fold. For SAEs
(one scalar for all targets) betas are invariant to the scale, so raw activations are used.

**One pass, every target, no per-latent data.** Per batch: one encode, a sparse decode of the
active codes (crosscoders), and one sparse ``F^T Y`` accumulation with the stacked targets
``Y = [x^b, x^c, xhat^b, xhat^c]`` (``d x n`` accumulators ``A``), plus ``C = sum f^2`` and
``count_active``. The error target uses the identity::

    beta_j^{error,m} = d_j^T (A_x^m - A_xhat^m)[:, j] / (||d_j||^2 C_j) + d_j^T d_j^m / ||d_j||^2

Accumulators are float64; per-batch products run in the dictionary's dtype.
:func:`~sae_diff.analysis.latent_scaling_reference.latent_scaling_naive` is the reference that
does build the per-latent targets.

Layout: this module is the streamed one-pass algorithm; the result type is
:mod:`~sae_diff.analysis.latent_scaling_result`, the sparse-code reader
:mod:`sae_diff.dictionaries.codes`, the slow reference and the cost measurement
:mod:`~sae_diff.analysis.latent_scaling_reference`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as tF

from sae_diff.analysis.batches import PairedBatch, iter_paired_batches
from sae_diff.analysis.latent_scaling_result import DEFAULT_MIN_COUNT, LatentScalingResult
from sae_diff.analysis.selection import resolve_latents
from sae_diff.dictionaries import geometry
from sae_diff.dictionaries.codes import BASE, FT, SparseCodes
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.kinds import KINDS, dictionary_kind, is_crosscoder
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.dictionaries.sparse_matmul import offsets_from_sorted
from sae_diff.dictionaries.specs import DictionaryKind
from sae_diff.moved import moved_names, to

Kind = DictionaryKind  # the vocabulary of sae_diff.dictionaries.specs
TARGETS: tuple[str, ...] = ("reconstruction", "error", "activation")
_SHORT = {"reconstruction": "recon", "error": "error", "activation": "act"}


# --------------------------------------------------------------------------------------
# dictionaries
# --------------------------------------------------------------------------------------
def _norm_factors(sae: PairedDictionary) -> torch.Tensor | None:
    factors = getattr(sae.cfg, "norm_factors", None)
    if factors is None:
        return None
    return torch.as_tensor(factors, dtype=sae.W_dec.dtype, device=sae.W_dec.device)


#: the sparse code reader moved to sae_diff.dictionaries.codes (public); kept under its old
#: private name for code that imported it from here
_Encoder = SparseCodes


# --------------------------------------------------------------------------------------
# the one-pass implementation
# --------------------------------------------------------------------------------------
def _resolve_targets(kind: str, targets: Sequence[str] | str | None) -> tuple[str, ...]:
    if targets is None:
        return ("reconstruction", "error") if kind == "crosscoder" else ("activation",)
    if isinstance(targets, str):
        targets = (targets,)
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"Unknown Latent Scaling target(s) {bad}; choose from {list(TARGETS)}.")
    if kind != "crosscoder" and set(targets) - {"activation"}:
        raise ValueError(
            f"Targets {sorted(set(targets) - {'activation'})} need a crosscoder (a decoder row per "
            f"model to reconstruct each model); a {kind} is analysed with the 'activation' target."
        )
    return tuple(dict.fromkeys(targets))


def _check_ft_decoder(sae: PairedDictionary, kind: str) -> None:
    if kind == "crosscoder" and sae.W_dec.shape[1] < 2:
        raise ValueError(
            f"Latent Scaling ratios need a decoder row for the ft model (index {FT}) and the base "
            f"model (index {BASE}); this crosscoder has n_models={sae.W_dec.shape[1]}."
        )


class _Pass:
    """Streaming accumulators for :func:`latent_scaling` (see the module docstring)."""

    def __init__(
        self,
        sae: PairedDictionary,
        kind: str,
        latents: torch.Tensor,
        targets: tuple[str, ...],
        firing_shift: bool,
        compute_dtype: torch.dtype | None,
        sparse_codes: bool = True,
    ) -> None:
        self.sae, self.kind, self.targets = sae, kind, targets
        self.enc = SparseCodes(sae, kind, sparse_codes)
        dev = sae.W_dec.device
        self.device = dev
        self.dtype = compute_dtype or sae.W_dec.dtype
        n = self.n = int(sae.cfg.d_sae)
        self.latents = latents
        self.subset = latents.numel() != n or not torch.equal(latents, torch.arange(n, device=dev))
        self.slot = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.slot[latents] = torch.arange(latents.numel(), device=dev)
        self.n_tokens = 0
        self.count = torch.zeros(n, dtype=torch.long, device=dev)
        self.sum = torch.zeros(n, dtype=torch.float64, device=dev)
        self.sum_sq = torch.zeros(n, dtype=torch.float64, device=dev)
        self.max = torch.zeros(n, dtype=torch.float64, device=dev)
        self.mask_tokens: dict[str, int] = {}
        self.mask_counts: dict[str, torch.Tensor] = {}
        self.firing_shift = firing_shift
        self.other_count = torch.zeros(n, dtype=torch.long, device=dev) if firing_shift else None
        self.other_sum = torch.zeros(n, dtype=torch.float64, device=dev) if firing_shift else None
        self.n_models = 2
        self.factors: torch.Tensor | None = None
        self.need_recon = kind == "crosscoder" and bool({"reconstruction", "error"} & set(targets))
        if kind == "crosscoder":
            self.n_models = int(sae.W_dec.shape[1])
            rows = geometry.decoder_rows(sae, normalised=True).to(self.dtype)  # (n, M, d)
            self.W_n = rows.reshape(n, -1).contiguous()
            factors = _norm_factors(sae)
            b = sae.b_dec.detach().to(self.dtype)
            self.factors = None if factors is None else factors.to(self.dtype)
            self.b_n = (b if self.factors is None else b * self.factors[:, None]).reshape(-1)
        d = int(sae.cfg.d_in)
        self.d = d
        blocks = 2 * self.n_models if self.need_recon else self.n_models
        self.A = torch.zeros(latents.numel(), blocks * d, dtype=torch.float64, device=dev)
        # codes and targets wait here until about n_latents tokens are pending: each flush
        # writes the whole (n_latents, width) accumulator, so flushing per small batch would
        # cost more memory traffic than the encoder matmul itself
        self.flush_tokens = max(int(latents.numel()), 4096)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []
        self.pending_tokens = 0

    @torch.no_grad()
    def update(self, batch: PairedBatch) -> None:
        x = batch.acts.to(self.device, self.sae.W_dec.dtype)
        B = x.shape[0]
        i, j, v = self.enc.codes(self.enc.encoder_input(x))
        self.n_tokens += B
        self.count += torch.bincount(j, minlength=self.n)
        v64 = v.double()
        self.sum += torch.bincount(j, v64, minlength=self.n)
        self.sum_sq += torch.bincount(j, v64 * v64, minlength=self.n)
        self.max.scatter_reduce_(0, j, v64, reduce="amax")
        for name, mask in batch.all_masks().items():
            mask = mask.to(self.device)
            self.mask_tokens[name] = self.mask_tokens.get(name, 0) + int(mask.sum())
            add = torch.bincount(j[mask.index_select(0, i)], minlength=self.n)
            self.mask_counts[name] = (
                self.mask_counts[name] + add if name in self.mask_counts else add
            )
        if self.firing_shift:
            assert self.other_count is not None and self.other_sum is not None
            other = BASE if self.kind == "ft_sae" else FT
            _, jo, vo = self.enc.codes(self.enc.encoder_input(x, other))
            self.other_count += torch.bincount(jo, minlength=self.n)
            self.other_sum += torch.bincount(jo, vo.double(), minlength=self.n)
        # --- Latent Scaling accumulators: A += F^T Y, sparse in F ---------------------------
        # x-blocks are accumulated from the raw x; the per-model scalars are applied to A at
        # the end (A_x^m is linear in x^m), which saves a pass over the batch
        vw = v.to(self.dtype)
        targets = [x.to(self.dtype).reshape(B, -1)]
        if self.need_recon:
            xhat = tF.embedding_bag(
                j, self.W_n, offsets_from_sorted(i, B), mode="sum", per_sample_weights=vw
            )
            targets.append(xhat.add_(self.b_n))
        if self.subset:
            slot = self.slot.index_select(0, j)
            keep = slot >= 0
            i, jj, vw = i[keep], slot[keep], vw[keep]
        else:
            jj = j
        self.pending.append((i, jj, vw, targets))
        self.pending_tokens += B
        if self.pending_tokens >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        """A += F^T Y for the pending batches at once (one sort, one bag sum per target)."""
        if not self.pending:
            return
        start, rows, cols, vals = 0, [], [], []
        for i, jj, vw, targets in self.pending:
            rows.append(i + start)
            cols.append(jj)
            vals.append(vw)
            start += targets[0].shape[0]
        ys = [torch.cat([p[3][t] for p in self.pending]) for t in range(len(self.pending[0][3]))]
        i, jj, vw = torch.cat(rows), torch.cat(cols), torch.cat(vals)
        self.pending, self.pending_tokens = [], 0
        # group the codes by latent (int32 sort keys are ~3x faster), sum f_ij * Y_i per bag
        jj_sorted, order = torch.sort(jj.int(), stable=True)
        tok, w = i.index_select(0, order), vw.index_select(0, order)
        offsets = offsets_from_sorted(jj_sorted.long(), self.latents.numel())
        width = 0
        for Y in ys:
            # add_ promotes to float64 on the fly: no float64 copy of the (n, width) bag sums
            self.A[:, width : width + Y.shape[1]].add_(
                tF.embedding_bag(tok, Y, offsets, mode="sum", per_sample_weights=w)
            )
            width += Y.shape[1]

    def result(self, min_count: int) -> LatentScalingResult:
        self.flush()
        S = self.latents
        C = self.sum_sq[S]
        betas: dict[str, torch.Tensor] = {}
        rows = geometry.decoder_rows(self.sae, normalised=True)[S].double()  # (L, M, d)
        D = rows[:, FT] if self.kind == "crosscoder" else rows[:, 0]
        norm2 = (D * D).sum(-1)
        proj = torch.einsum(
            "ld,lkd->lk", D, self.A.view(S.numel(), -1, self.d)
        )  # d_j^T A[:, j] per block
        if self.factors is not None:  # x-blocks were summed from raw activations: scale them now
            proj[:, : self.n_models] *= self.factors.double()[None, :]
        denom = norm2 * C
        nan = torch.full_like(denom, math.nan)

        def ratio(num: torch.Tensor) -> torch.Tensor:
            return torch.where(
                denom > 0, num / denom.clamp(min=torch.finfo(torch.float64).tiny), nan
            )

        M = self.n_models
        for m, name in ((BASE, "base"), (FT, "ft")):
            if "activation" in self.targets:
                betas[f"beta_act_{name}"] = ratio(proj[:, m])
            if "reconstruction" in self.targets:
                betas[f"beta_recon_{name}"] = ratio(proj[:, M + m])
            if "error" in self.targets:
                own = (D * rows[:, m]).sum(-1) / norm2
                betas[f"beta_error_{name}"] = ratio(proj[:, m] - proj[:, M + m]) + own
        return LatentScalingResult(
            kind=self.kind,
            latents=S.cpu(),
            n_tokens=self.n_tokens,
            min_count=min_count,
            count_active=self.count[S].cpu(),
            sum_act=self.sum[S].cpu(),
            sum_sq_act=C.cpu(),
            max_act=self.max[S].cpu(),
            betas={k: v.cpu() for k, v in betas.items()},
            mask_tokens=dict(self.mask_tokens),
            mask_counts={k: v[S].cpu() for k, v in self.mask_counts.items()},
            other_count=None if self.other_count is None else self.other_count[S].cpu(),
            other_sum=None if self.other_sum is None else self.other_sum[S].cpu(),
        )


def latent_scaling(
    sae: PairedDictionary,
    data: Iterable[Any],
    *,
    kind: str | None = None,
    latents: Sequence[int] | torch.Tensor | None = None,
    targets: Sequence[str] | str | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    firing_shift: bool | None = None,
    compute_dtype: torch.dtype | None = None,
    sparse_codes: bool = True,
    max_tokens: int | None = None,
    progress: bool = True,
) -> LatentScalingResult:
    """Closed-form Latent Scaling for all targets in one streaming pass (METHODS.md §3).

    Args:
        sae: a crosscoder, diff-SAE, ft-SAE (chat-SAE) or base-SAE; training classes are
            exported to their inference form first (threshold encoder, never batch top-k).
            Crosscoders are analysed in their normalised (training) space: inputs times
            ``cfg.norm_factors``, decoder rows from ``geometry.decoder_rows(normalised=True)``.
        data: an iterable of paired batches ``(B, 2, d)`` (see :mod:`sae_diff.analysis.batches`),
            e.g. a ``PairedActivationsStore``, a cache reader or a list.
        kind: ``crosscoder`` / ``diff_sae`` are detected; a plain SAE needs ``ft_sae`` or ``base_sae``.
        latents: indices (or a boolean mask) of the latents to analyse; all by default.
        targets: crosscoders: any of ``reconstruction``, ``error``, ``activation`` (default the
            first two); SAEs: ``activation``.
        min_count: latents active on fewer tokens get NaN ratios (betas are still reported).
        firing_shift: for ft/base-SAEs, also encode the *other* model's activations (a second
            encode) to report frequency and mean-activation ratios; default on for them.
        compute_dtype: dtype of the per-batch products (default: the dictionary's); sums are float64.
        sparse_codes: for sae_diff's inference crosscoders (no hooks attached), read the codes
            straight off the pre-activations (``f = h`` where ``h > max(threshold, 0)``): the
            same values as ``sae.encode`` without its dense ReLU/mask passes. ``False`` always
            calls ``sae.encode``.
        max_tokens: stop after this many tokens (needed for a looping store).
        progress: show a tqdm bar over the data pass.
    """
    sae = as_inference(sae)
    kind = dictionary_kind(sae, kind)
    _check_ft_decoder(sae, kind)
    tgts = _resolve_targets(kind, targets)
    if min_count < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}.")
    if firing_shift is None:
        firing_shift = kind in ("ft_sae", "base_sae")
    elif firing_shift and kind not in ("ft_sae", "base_sae"):
        raise ValueError(
            "firing_shift compares an SAE on base vs ft activations: it needs kind "
            f"'ft_sae' or 'base_sae', not {kind!r}."
        )
    S = resolve_latents(latents, int(sae.cfg.d_sae), sae.W_dec.device)
    acc = _Pass(sae, kind, S, tgts, firing_shift, compute_dtype, sparse_codes)
    n_models = acc.n_models
    for batch in iter_paired_batches(
        data, n_models=n_models, progress=progress, desc="Latent Scaling", max_tokens=max_tokens
    ):
        if batch.acts.shape[-1] != acc.d:
            raise ValueError(
                f"Activations have d={batch.acts.shape[-1]} but the dictionary has "
                f"d_in={acc.d}: use the dictionary's hook point."
            )
        acc.update(batch)
    return acc.result(min_count)


# --------------------------------------------------------------------------------------
# moved names (one release)
# --------------------------------------------------------------------------------------
#: names that moved to the float64 reference module (one release; see sae_diff.moved)
__getattr__ = moved_names(
    __name__,
    {
        **to(
            "sae_diff.analysis.latent_scaling_reference",
            ("latent_scaling_naive", "latent_scaling_cost_ratio"),
        ),
        "MODELS": "sae_diff.analysis.latent_scaling_result",
    },
)


__all__ = [
    "DEFAULT_MIN_COUNT",
    "KINDS",
    "TARGETS",
    "Kind",
    "LatentScalingResult",
    "as_inference",
    "dictionary_kind",
    "is_crosscoder",
    "latent_scaling",
]
