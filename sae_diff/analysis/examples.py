"""Max-activating examples per latent: top contexts and quantile samples, from one pass.

One streaming pass over paired batches that carry ``seq`` / ``pos`` per token (see
:mod:`sae_diff.analysis.batches`; :func:`~sae_diff.analysis.batches.cache_batches` provides
them for a disk cache) keeps, for each requested latent,

- the ``k`` highest activations (ties: first seen), and
- a uniform random sample (``reservoir`` entries, priority sampling with seeded keys) of all
  its activations, from which ``per_quantile`` examples are drawn in each of ``n_quantiles``
  equal-count activation bins — what a latent does at typical strength, not only at its peak.

Codes come from the dictionary's inference encoder (threshold, never batch top-k), on the
model the dictionary reads (both for a crosscoder, the difference for a diff-SAE).
:func:`examples_on_the_fly` computes activations from tokens with any paired forward, e.g.
``lambda t: paired_model.paired_activations(t, hook)[hook]``.

Layout: this module is the streaming pass; the records and their text / HTML are
:mod:`sae_diff.analysis.example_display`, token decoding :mod:`sae_diff.analysis.token_text`
(both importable from here as before).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from sae_diff.analysis.batches import PairedBatch, iter_paired_batches
from sae_diff.analysis.example_display import STYLE, Example, LatentExamples
from sae_diff.analysis.selection import resolve_latents
from sae_diff.analysis.token_text import decode_pieces, single_token_decoder
from sae_diff.dictionaries.codes import SparseCodes
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.kinds import dictionary_kind
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.moved import moved_names, to

_STYLE = STYLE  # its old name here; sae_diff.report.html embeds it

__getattr__ = moved_names(
    __name__,
    {
        **to("sae_diff.analysis.example_display", ("examples_html", "save_examples_html")),
        "decode_text": "sae_diff.analysis.token_text",
    },
)

#: Default context shown around the active token: tokens before and after.
DEFAULT_WINDOW = (12, 4)


def _group_top(slot: torch.Tensor, key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``key`` per ``slot`` group (ties: earlier entries first)."""
    order = torch.sort(key, descending=True, stable=True).indices
    order = order[torch.sort(slot[order], stable=True).indices]
    s = slot[order]
    start = torch.searchsorted(s, s, right=False)
    rank = torch.arange(s.numel()) - start
    return order[rank < k]


class _Keeper:
    """Top-k by value and a priority sample (random keys) per latent slot."""

    FIELDS = ("slot", "value", "seq", "pos", "key")

    def __init__(self, k: int, reservoir: int, seed: int) -> None:
        self.k, self.reservoir = k, reservoir
        self.gen = torch.Generator().manual_seed(seed)
        empty = {
            "slot": torch.empty(0, dtype=torch.long),
            "value": torch.empty(0, dtype=torch.float64),
            "seq": torch.empty(0, dtype=torch.long),
            "pos": torch.empty(0, dtype=torch.long),
            "key": torch.empty(0, dtype=torch.float64),
        }
        self.top = dict(empty)
        self.sample = dict(empty)

    def add(self, new: dict[str, torch.Tensor]) -> None:
        new = dict(
            new, key=torch.rand(new["slot"].numel(), generator=self.gen, dtype=torch.float64)
        )
        for store, by, cap in ((self.top, "value", self.k), (self.sample, "key", self.reservoir)):
            cat = {f: torch.cat([store[f], new[f]]) for f in self.FIELDS}
            keep = _group_top(cat["slot"], cat[by], cap)
            store.update({f: cat[f][keep] for f in self.FIELDS})


def _codes_with_positions(
    sae: PairedDictionary, kind: str, batches: Iterable[PairedBatch], latents: torch.Tensor
) -> Iterator[tuple[PairedBatch, dict[str, torch.Tensor]]]:
    enc = SparseCodes(sae, kind)
    slot_of = torch.full((int(sae.cfg.d_sae),), -1, dtype=torch.long)
    slot_of[latents.cpu()] = torch.arange(latents.numel())
    for batch in batches:
        if batch.seq is None or batch.pos is None:
            raise ValueError(
                "Max-activating examples need 'seq' and 'pos' per token to show contexts: yield "
                "PairedBatch(acts, seq=..., pos=...) or dicts with those keys, use "
                "sae_diff.analysis.batches.cache_batches(cache), or examples_on_the_fly(...)."
            )
        x = batch.acts.to(sae.W_dec.device, sae.W_dec.dtype)
        i, j, v = (t.cpu() for t in enc.codes(enc.encoder_input(x)))
        slot = slot_of[j]
        keep = slot >= 0
        i = i[keep]
        yield (
            batch,
            {
                "slot": slot[keep],
                "value": v[keep].double(),
                "seq": batch.seq.cpu()[i].long(),
                "pos": batch.pos.cpu()[i].long(),
            },
        )


def max_activating_examples(
    sae: PairedDictionary,
    data: Iterable[Any],
    tokens: torch.Tensor | Sequence[Sequence[int]],
    latents: Sequence[int] | torch.Tensor,
    *,
    kind: str | None = None,
    k: int = 10,
    n_quantiles: int = 4,
    per_quantile: int = 3,
    reservoir: int = 1000,
    window: tuple[int, int] = DEFAULT_WINDOW,
    tokenizer: Any = None,
    seed: int = 0,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[int, LatentExamples]:
    """Top and quantile-sampled contexts for each of ``latents``, from one pass over ``data``.

    Args:
        sae: the dictionary (training classes are exported to inference form).
        data: paired batches with per-token ``seq``/``pos`` (see the module docstring).
        tokens: the token table ``(n_seq, seq_len)`` that ``seq``/``pos`` index
            (``cache.tokens()`` for a cache).
        latents: the latents to collect (a list of indices or a boolean mask).
        kind: ``"ft_sae"`` / ``"base_sae"`` for a plain SAE.
        k: top examples per latent; ``n_quantiles`` bins with ``per_quantile`` samples each.
        reservoir: size of the per-latent uniform sample the quantile bins are drawn from.
        window: tokens shown before and after the active token.
        tokenizer: a Hugging Face tokenizer (``decode``) or a callable id -> str.
        seed: seeds the sampling (the result is deterministic for a fixed data order).
    Returns ``{latent: LatentExamples}`` in the order of ``latents``.
    """
    if k < 0 or n_quantiles < 0 or per_quantile < 0 or reservoir < 0:
        raise ValueError("k, n_quantiles, per_quantile and reservoir must be >= 0.")
    sae = as_inference(sae)
    kind = dictionary_kind(sae, kind)
    tok = torch.as_tensor(tokens)
    if tok.ndim != 2:
        raise ValueError(
            f"tokens must be a (n_seq, seq_len) table of ids, got shape {tuple(tok.shape)}."
        )
    S = resolve_latents(latents, int(sae.cfg.d_sae), torch.device("cpu"))
    keeper = _Keeper(k, reservoir, seed)
    count = torch.zeros(S.numel(), dtype=torch.long)
    n_tokens = 0
    batches = iter_paired_batches(data, progress=progress, desc="examples", max_tokens=max_tokens)
    for batch, new in _codes_with_positions(sae, kind, batches, S):
        n_tokens += batch.n_tokens
        if (new["seq"] >= tok.shape[0]).any() or (new["pos"] >= tok.shape[1]).any():
            raise ValueError(
                f"A batch points at (seq, pos) outside the token table {tuple(tok.shape)}: "
                "pass the tokens the activations were computed on."
            )
        count += torch.bincount(new["slot"], minlength=S.numel())
        keeper.add(new)
    to_str = single_token_decoder(tokenizer)
    cache: dict[int, str] = {}

    def example(slot: int, value: float, seq: int, pos: int) -> Example:
        lo, hi = max(0, pos - window[0]), min(tok.shape[1], pos + window[1] + 1)
        ids = tok[seq, lo:hi].tolist()
        if callable(getattr(tokenizer, "decode", None)):
            strs = decode_pieces(tokenizer, ids)  # the tokenizer's own spacing between tokens
        else:
            strs = [cache.setdefault(t, to_str(t)) for t in ids]
        return Example(
            latent=int(S[slot]), value=value, seq=seq, pos=pos, tokens=strs, active=pos - lo
        )

    gen = torch.Generator().manual_seed(seed + 1)
    out: dict[int, LatentExamples] = {}
    for slot, lat in enumerate(S.tolist()):
        res = LatentExamples(latent=lat, count_active=int(count[slot]), n_tokens=n_tokens)
        top = keeper.top["slot"] == slot
        vals, seqs, poss = keeper.top["value"][top], keeper.top["seq"][top], keeper.top["pos"][top]
        res.top = [example(slot, float(v), int(s), int(p)) for v, s, p in zip(vals, seqs, poss)]
        samp = keeper.sample["slot"] == slot
        sv, ss, sp = (
            keeper.sample["value"][samp],
            keeper.sample["seq"][samp],
            keeper.sample["pos"][samp],
        )
        if sv.numel() and n_quantiles and per_quantile:
            order = torch.argsort(sv, descending=True, stable=True)
            for chunk in torch.tensor_split(order, min(n_quantiles, sv.numel())):
                pick = chunk[torch.randperm(chunk.numel(), generator=gen)[:per_quantile]]
                pick = pick[torch.argsort(sv[pick], descending=True, stable=True)]
                res.quantiles.append(
                    (
                        float(sv[chunk].min()),
                        float(sv[chunk].max()),
                        [example(slot, float(sv[q]), int(ss[q]), int(sp[q])) for q in pick],
                    )
                )
        out[lat] = res
    return out


def examples_on_the_fly(
    sae: PairedDictionary,
    forward: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    latents: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = 8,
    token_mask: torch.Tensor | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> dict[int, LatentExamples]:
    """:func:`max_activating_examples` with activations computed from ``tokens`` as needed.

    ``forward(tokens[b0:b1])`` must return paired activations ``(b, seq, 2, d)``, e.g.
    ``lambda t: paired_model.paired_activations(t, hook)[hook]``. ``token_mask``
    ``(n_seq, seq_len)`` bool drops tokens (BOS, padding) before encoding.
    """
    tok = torch.as_tensor(tokens)
    if token_mask is not None and tuple(token_mask.shape) != tuple(tok.shape):
        raise ValueError(
            f"token_mask must be shaped like tokens {tuple(tok.shape)}, got {tuple(token_mask.shape)}."
        )

    def batches() -> Iterator[PairedBatch]:
        for b0 in range(0, tok.shape[0], batch_size):
            with torch.no_grad():
                acts = forward(tok[b0 : b0 + batch_size])
            b, s = acts.shape[:2]
            seq = torch.arange(b0, b0 + b)[:, None].expand(b, s)
            pos = torch.arange(s)[None, :].expand(b, s)
            keep = (
                torch.ones(b, s, dtype=torch.bool)
                if token_mask is None
                else token_mask[b0 : b0 + b].bool()
            )
            keep_dev = keep.to(acts.device)
            yield PairedBatch(acts=acts[keep_dev], seq=seq[keep], pos=pos[keep])

    return max_activating_examples(sae, batches(), tok, latents, progress=progress, **kwargs)


__all__ = [
    "DEFAULT_WINDOW",
    "Example",
    "LatentExamples",
    "decode_pieces",
    "examples_on_the_fly",
    "max_activating_examples",
]
