"""Base-SAE diffing with a causal filter (the approach of OpenAI's emergent-misalignment study).

1. Rank a base-SAE's latents by how much more they fire on the fine-tune's activations than on
   the base model's, on the same tokens: Latent Scaling's firing shift
   (``latent_scaling(sae, data, kind="base_sae").firing_shift()``: ``freq_ratio`` = ft / base).
2. Keep the candidates whose *ablation* in the fine-tune changes its behaviour: run the ft model
   with the latent's contribution removed at the SAE's hook, ``x ← x − f_j(x) d_j`` (the SAE's
   error and every other latent untouched), and measure ``KL(p_ft || p_ablated)`` on the
   positions that predict assistant tokens. ``mode="steer"`` instead adds ``scale · d̂_j`` (unit
   decoder direction) at every position.
3. A candidate is kept when its KL exceeds the ``quantile`` of the same measurement for random
   latents that fire on the fine-tune (excluding the candidates): the effect must beat what
   removing an arbitrary active latent does.

The result is a table (one row per candidate and per random latent) and the kept latents, so
the filter can be scored like every other method (rank by KL among the kept candidates).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, cast

import numpy as np
import pandas as pd
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAE
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens.utilities import get_attention_mask

from sae_diff.analysis.batches import cache_batches
from sae_diff.analysis.config_file import config_kwargs
from sae_diff.analysis.latent_scaling import latent_scaling
from sae_diff.analysis.latent_scaling_result import LatentScalingResult
from sae_diff.atomic import atomic_write
from sae_diff.data.cache import ActivationCache
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TokenSource
from sae_diff.data.store import PairedActivationsStore
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.evaluation.kl import as_token_mask, predicting, token_kl
from sae_diff.evaluation.stitching import LayerError, layer_from_hook
from sae_diff.organisms import load_organism
from sae_diff.pairing.backends import is_bridge
from sae_diff.pairing.model import PairedModel
from sae_diff.training.errors import ConfigError

MODES: tuple[str, ...] = ("ablate", "steer")
#: the config fields passed on to :func:`causal_filter` (besides causal_filter_on_organism's)
_FILTER_FIELDS = ("n_candidates", "n_random", "quantile", "min_freq_ft", "mode", "scale")


@dataclass
class CausalFilterResult:
    """``table``: per latent ``role`` (candidate / random), firing shift columns when given,
    ``kl`` (mean over the predicting positions) and ``kept``; ``threshold``: the random
    baseline's quantile; ``kept``: the kept candidates, by decreasing KL."""

    table: pd.DataFrame
    threshold: float
    kept: list[int]


#: the firing-shift input: a ``latent_scaling(..., kind='base_sae')`` result or its frame
FiringShift: TypeAlias = pd.DataFrame | LatentScalingResult


def _shift_frame(shift: FiringShift) -> pd.DataFrame:
    if isinstance(shift, pd.DataFrame):
        frame = shift
    elif hasattr(shift, "to_frame"):
        frame = shift.to_frame()
    else:
        raise TypeError(
            "shift must be a DataFrame with freq_on_base / freq_on_ft / freq_ratio columns or a "
            "LatentScalingResult from latent_scaling(sae, data, kind='base_sae')."
        )
    missing = [c for c in ("freq_on_base", "freq_on_ft", "freq_ratio") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"The firing-shift table lacks {missing}: run latent_scaling(..., kind='base_sae') "
            "(firing_shift is on by default for base-SAEs) and pass its result or .to_frame()."
        )
    return frame


def rank_by_firing_shift(shift: FiringShift, n: int = 20, min_freq_ft: float = 1e-4) -> list[int]:
    """The ``n`` latents with the largest ``freq_ratio`` (ft over base; a latent that never
    fires on base ranks first, by its ft frequency), among those firing on at least
    ``min_freq_ft`` of the fine-tune's tokens."""
    frame = _shift_frame(shift)
    ok = frame[(frame["freq_on_ft"] >= min_freq_ft) & frame["freq_ratio"].notna()]
    ranked = ok.assign(_r=ok["freq_ratio"].replace(np.inf, np.finfo(np.float64).max)).sort_values(
        ["_r", "freq_on_ft"], ascending=False
    )
    return [int(j) for j in ranked.index[:n]]


def _intervention(
    sae: PairedDictionary, latent: int, mode: str, scale: float
) -> Callable[..., torch.Tensor]:
    """A hook function ``(act, hook, f=None)``; ``f``: the latent's codes ``(..., 1)`` on
    ``act`` when already computed (the split forward encodes once per batch)."""
    d = sae.W_dec.detach()[latent]

    def ablate(act: torch.Tensor, hook: Any = None, f: torch.Tensor | None = None) -> torch.Tensor:
        if f is None:
            f = sae.encode(act.to(sae.W_dec.dtype))[..., latent : latent + 1]
        return act - (f * d.to(f.dtype)).to(act.dtype)

    def steer(act: torch.Tensor, hook: Any = None, f: torch.Tensor | None = None) -> torch.Tensor:
        return act + (scale * d / d.norm().clamp(min=1e-12)).to(act.dtype)

    return ablate if mode == "ablate" else steer


def _split_layer(model: Any, hook: str) -> int | None:
    """The split layer at which running ``model`` in two halves reproduces its full forward with
    a hook at ``hook``, or None where it cannot: a hook inside a block or off the residual
    stream (``hook_resid_mid``, an MLP output), a TransformerBridge (it cannot start mid-way, so
    a split saves nothing), a shortformer model (its positional embedding enters every block)."""
    if is_bridge(model) or getattr(model.cfg, "positional_embedding_type", None) == "shortformer":
        return None
    try:
        return layer_from_hook(hook, int(model.cfg.n_layers))
    except LayerError:
        return None


def _implicit_attention_mask(model: Any, tokens: torch.Tensor) -> torch.Tensor | None:
    """The attention mask a HookedTransformer builds by itself from ``tokens`` (only when its
    tokenizer pads on the left). A forward started mid-model (``start_at_layer``) has no tokens
    to build it from, so the split path passes it to both halves explicitly."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or getattr(tokenizer, "padding_side", None) != "left":
        return None
    return get_attention_mask(tokenizer, tokens, bool(model.cfg.default_prepend_bos))


@torch.no_grad()
def intervention_kl(
    model: Any,
    sae: PairedDictionary,
    tokens: torch.Tensor,
    latents: Sequence[int],
    mask: torch.Tensor | None = None,
    *,
    hook_name: str | None = None,
    mode: str = "ablate",
    scale: float = 4.0,
    batch_size: int = 16,
) -> torch.Tensor:
    """Mean ``KL(p_model || p_intervened)`` per latent over the positions predicting ``mask``'s
    tokens (e.g. assistant tokens; all positions when None). ``model``: a TransformerLens
    model (the fine-tune); ``sae``: a one-model SAELens SAE at ``hook_name``.

    Only the layers after the hook see the intervention, so on a residual-stream hook the layers
    before it run once per batch (``PairedModel.residual_at``) and each latent costs one
    second-half forward (``PairedModel.continue_from``), as in KL patching
    (:mod:`sae_diff.evaluation.engine`); the result equals the full forward with the
    intervention as a hook up to float rounding. Other hooks run the full model per latent."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {list(MODES)}.")
    if sae.W_dec.ndim != 2:
        raise ValueError(
            "The causal filter needs a one-model SAE (a base-SAE); got a crosscoder-shaped W_dec "
            f"{tuple(sae.W_dec.shape)}."
        )
    hook = hook_name or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not hook:
        raise ValueError("No hook: pass hook_name= or save the SAE with cfg.metadata.hook_name.")
    m = predicting(as_token_mask(mask, tokens))
    if not bool(m.any()):
        raise ValueError(
            "The mask selects no position with a next token to predict (assistant tokens after "
            "position 0); check the chat mask."
        )
    layer = _split_layer(model, hook)
    # one model seen as a pair with itself: the split primitives run only its "ft" side
    halves = None if layer is None else PairedModel(model, model, check=False)
    fns = [_intervention(sae, int(j), mode, scale) for j in latents]
    idx = torch.tensor([int(j) for j in latents], dtype=torch.long, device=sae.W_dec.device)
    totals = torch.zeros(len(latents), dtype=torch.float64)
    for start in range(0, tokens.shape[0], batch_size):
        tok = tokens[start : start + batch_size]
        mb = m[start : start + batch_size]
        if not bool(mb.any()):
            continue
        if halves is None or layer is None:
            clean = model(tok)
            runs: Iterator[torch.Tensor] = (
                model.run_with_hooks(tok, fwd_hooks=[(hook, fn)]) for fn in fns
            )
        else:
            am = _implicit_attention_mask(model, tok)
            x = halves.residual_at("ft", tok, layer, attention_mask=am)
            clean = halves.continue_from("ft", x, layer, tokens=tok, attention_mask=am)
            # every ablation reads the codes of the same x: encode once, keep the tested columns
            f = sae.encode(x.to(sae.W_dec.dtype))[..., idx] if mode == "ablate" else None
            runs = (
                halves.continue_from(
                    "ft",
                    fn(x, f=None if f is None else f[..., i : i + 1]),
                    layer,
                    tokens=tok,
                    attention_mask=am,
                )
                for i, fn in enumerate(fns)
            )
        for i, out in enumerate(runs):
            totals[i] += token_kl(clean, out).cpu()[mb].double().sum()
    return totals / float(m.sum())


def causal_filter(
    model: Any,
    sae: PairedDictionary,
    tokens: torch.Tensor,
    shift: FiringShift,
    mask: torch.Tensor | None = None,
    *,
    n_candidates: int = 20,
    n_random: int = 20,
    quantile: float = 0.95,
    min_freq_ft: float = 1e-4,
    hook_name: str | None = None,
    mode: str = "ablate",
    scale: float = 4.0,
    seed: int = 0,
    batch_size: int = 16,
) -> CausalFilterResult:
    """Rank by firing shift, then keep the candidates whose intervention KL beats the random
    baseline's ``quantile`` (module docstring). ``model`` is the fine-tune; ``tokens`` /
    ``mask`` are chat rows and their assistant-token mask."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}.")
    frame = _shift_frame(shift)
    candidates = rank_by_firing_shift(frame, n=n_candidates, min_freq_ft=min_freq_ft)
    if not candidates:
        raise ValueError(
            f"No latent fires on at least {min_freq_ft} of the fine-tune's tokens with a defined "
            "freq_ratio: lower min_freq_ft or pass more data to latent_scaling."
        )
    pool = frame[
        (frame["freq_on_ft"] >= min_freq_ft) & ~frame.index.isin(candidates)
    ].index.to_numpy()
    if len(pool) == 0:
        raise ValueError("No other active latent for the random baseline: lower n_candidates.")
    rng = np.random.default_rng(seed)
    randoms = [int(j) for j in rng.choice(pool, size=min(n_random, len(pool)), replace=False)]
    kl = intervention_kl(
        model,
        sae,
        tokens,
        candidates + randoms,
        mask,
        hook_name=hook_name,
        mode=mode,
        scale=scale,
        batch_size=batch_size,
    ).numpy()
    threshold = float(np.quantile(kl[len(candidates) :], quantile))
    cols = ["freq_on_base", "freq_on_ft", "freq_ratio"]
    table = frame.loc[candidates + randoms, cols].copy()
    table.insert(0, "role", ["candidate"] * len(candidates) + ["random"] * len(randoms))
    table["kl"] = kl
    table["kept"] = (table["role"] == "candidate") & (table["kl"] > threshold)
    table.index.name = "latent"
    kept = [int(j) for j in table[table["kept"]].sort_values("kl", ascending=False).index]
    return CausalFilterResult(table=table, threshold=threshold, kept=kept)


def causal_filter_on_organism(
    out: str | Path,
    *,
    organism: str = "default",
    hook: str | None = None,
    context_size: int = 64,
    n_docs: int = 300,
    max_rows: int = 320,
    expansion: int = 8,
    k: int = 16,
    train_steps: int = 300,
    batch_size: int = 256,
    lr: float = 2e-3,
    n_eval: int = 8,
    seed: int = 0,
    **filter_kw: Any,
) -> tuple[CausalFilterResult, SAE[Any]]:
    """The method end to end on a bundled organism: harvest its pretraining text + chat through
    both models (one cache under ``out``), train a base-SAE (SAELens ``batchtopk``) on the base
    side, measure the firing shift on the same tokens (Latent Scaling, ``kind="base_sae"``),
    then filter on held-out conversations (``n_eval`` per behaviour) by the fine-tune's KL on
    their assistant tokens. Returns the filter result and the base-SAE (inference form)."""
    out = Path(out)
    org = load_organism(organism)
    paired = org.paired()
    hook = hook or org.recommended_hook
    parts = [org.chat_dataset("train", n=n_docs, seed=seed)]
    if org.world is not None:
        parts.insert(0, org.pretraining_dataset("train", n=n_docs, seed=seed))
    src = TokenSource(parts, org.tokenizer, context_size, max_rows=max_rows)
    harvest_cache(
        paired,
        src,
        out / "cache",
        hook,
        batch_size=32,
        rows_per_shard=128,
        max_rows=max_rows,
        progress=False,
        verbose=False,
    )
    cache = ActivationCache(out / "cache")
    d_model = int(paired.base.cfg.d_model)
    torch.manual_seed(seed)
    train = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=d_model, d_sae=expansion * d_model, k=k)
    )
    store = PairedActivationsStore.from_cache(cache, mode="base", batch_size=batch_size, seed=seed)
    SAETrainer(
        SAETrainerConfig(
            total_training_samples=train_steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr,
            dead_feature_window=max(train_steps // 2, 50),
            feature_sampling_window=max(train_steps, 100),
        ),
        train,
        store,
    ).fit()
    sae = cast(SAE[Any], as_inference(train))  # a SAELens training SAE exports a SAELens SAE
    sae.cfg.metadata.hook_name = hook
    shift = latent_scaling(sae, cache_batches(cache), kind="base_sae", progress=False)
    _, tokens, valid, assistant = org.eval_batch(n=n_eval)
    result = causal_filter(
        org.ft,
        sae,
        tokens,
        shift,
        assistant.bool() & valid.bool(),
        hook_name=hook,
        seed=seed,
        **filter_kw,
    )
    return result, sae


def main(argv: Sequence[str] | None = None) -> int:
    """``sae-diff causal-filter --config configs/analysis/causal_filter_organism.yaml`` (or
    ``python -m sae_diff.analysis.causal_filter``): the method end to end from one config (the fields of :func:`causal_filter_on_organism`, plus
    :func:`causal_filter`'s: ``n_candidates``, ``n_random``, ``quantile``, ``mode``, ``scale``)."""
    ap = argparse.ArgumentParser(prog="sae-diff causal-filter", description=main.__doc__)
    ap.add_argument(
        "--config", required=True, help="YAML/JSON file with causal_filter_on_organism's fields"
    )
    ap.add_argument("--out", help="output folder (overrides the config's `out`)")
    args = ap.parse_args(argv)
    kw = config_kwargs(causal_filter_on_organism, args.config)
    own = set(inspect.signature(causal_filter_on_organism).parameters) - {"filter_kw"}
    extra = set(kw) - own - set(_FILTER_FIELDS)
    if extra:
        raise ConfigError(f"Unknown field(s) {sorted(extra)} in {args.config}.")
    if args.out:
        kw["out"] = args.out
    if "out" not in kw:
        ap.error("no output folder: set `out:` in the config or pass --out DIR")
    res, sae = causal_filter_on_organism(**kw)
    out = Path(kw["out"])
    atomic_write(out / "causal_filter.csv", lambda p: res.table.to_csv(p))
    sae.save_model(str(out / "base_sae"))
    print(res.table.round(4).to_string())
    print(f"threshold {res.threshold:.4g}; kept {res.kept}; table: {out / 'causal_filter.csv'}")
    return 0


__all__ = [
    "CausalFilterResult",
    "causal_filter",
    "causal_filter_on_organism",
    "intervention_kl",
    "rank_by_firing_shift",
]


if __name__ == "__main__":
    raise SystemExit(main())
