"""What the diffing study reads: the harvested activation cache and the held-out scoring set.

:func:`prepare_inputs` builds all of it once per study (:class:`StudyInputs`). The cache
(pretraining text + chat, mixed by token share) is what every dictionary trains on;
the scoring set (triggered, control and plain-text rows with per-token and per-conversation
labels) is what every method is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_diff.analysis.batches import cache_batches
from sae_diff.data.cache_reader import ActivationCache
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TokenSource
from sae_diff.evaluation.kl import per_token_kl
from sae_diff.organisms import load_organism
from sae_diff.organisms.ground_truth import DATA_DIR, organism_dir
from sae_diff.organisms.organism import Organism
from sae_diff.pairing.model import PairedModel
from sae_diff.report.config import DemoConfig, timed
from sae_diff.report.scoring import GroundTruth


def harvest(cfg: DemoConfig, org: Organism, paired: PairedModel, hook: str) -> ActivationCache:
    """Pretraining text + chat, mixed by token share, harvested once into a disk cache."""
    if org.world is not None:
        texts = org.pretraining_dataset("train", n=cfg.n_pretrain_docs, seed=cfg.seed)
        chats = org.chat_dataset("train", n=cfg.n_chat_docs, seed=cfg.seed)
        source = TokenSource(
            [texts, chats],
            org.tokenizer,
            cfg.context_size,
            proportions=[1 - cfg.chat_share, cfg.chat_share],
            max_rows=cfg.max_rows,
        )
    else:  # a custom organism without a world: its own training conversations only
        source = TokenSource(
            [org.chat_dataset("train", n=cfg.n_chat_docs, seed=cfg.seed)],
            org.tokenizer,
            cfg.context_size,
            max_rows=cfg.max_rows,
        )
    harvest_cache(
        paired,
        source,
        cfg.out / "cache",
        hook,
        batch_size=32,
        rows_per_shard=128,
        max_rows=cfg.max_rows,
        verbose=True,
    )
    return ActivationCache(cfg.out / "cache")


@dataclass
class EvalSet:
    """The held-out scoring rows: tokens, masks, ground truth and where the rows came from."""

    tokens: torch.Tensor
    valid: torch.Tensor
    assistant: torch.Tensor
    truth: GroundTruth
    origins: list[str]
    skipped: dict[str, str]


def evaluation_set(org: Organism, cfg: DemoConfig) -> EvalSet:
    """Triggered conversations, control conversations (and, with a world, plain text) with
    per-token and per-conversation labels. Behaviours whose conversation labels have an empty
    class in this set (nothing to contrast) are skipped, with the reason."""
    if hasattr(org, "scoring_set"):
        n_text = cfg.n_text if getattr(org, "world", None) is not None else 0
        ss = org.scoring_set(
            n_per_behaviour=cfg.eval_per_behaviour, n_controls=cfg.n_controls, n_text=n_text
        )
        tokens, valid, assistant = ss.tokens, ss.valid, ss.assistant
        trig, resp, conv, origins = ss.trigger_masks, ss.response_masks, ss.labels, list(ss.origins)
    else:  # an organism API without controls: the other behaviours' conversations are the negatives
        _, tokens, valid, assistant = org.eval_batch(n=cfg.eval_per_behaviour)
        trig = {b: m & valid for b, m in org.behaviour_masks(tokens).items()}
        resp = {b: m & valid for b, m in org.response_masks(tokens).items()}
        conv = {b: m.any(1) for b, m in trig.items()}
        origins = ["held_out"] * int(tokens.shape[0])
    scored = valid.clone()
    scored[:, 0] = False  # BOS
    keep, skipped = [], {}
    for b in org.behaviours:
        if b not in trig:
            skipped[b] = "no labels"
        elif not bool(conv[b].any()):
            skipped[b] = "no triggered row in the scoring set"
        elif bool(conv[b].all()):
            skipped[b] = "every row carries it (no control rows without it)"
        else:
            keep.append(b)
    truth = GroundTruth(
        scored,
        {b: trig[b] & scored for b in keep},
        {b: resp[b] & scored for b in keep},
        {b: conv[b] for b in keep},
    )
    return EvalSet(tokens, valid, assistant, truth, origins, skipped)


def organism_info(cfg: DemoConfig, org: Organism) -> dict[str, Any]:
    """Name, kind (shipped / custom) and path of the organism, for titles and report.json."""
    path = organism_dir(cfg.organism).resolve()
    shipped = path.parent == DATA_DIR.resolve()
    return {
        "name": path.name if shipped else str(cfg.organism),
        "kind": "shipped" if shipped else "custom",
        "path": str(path),
    }


def sample_acts(cache: ActivationCache, max_tokens: int = 20000) -> torch.Tensor:
    """The first ``max_tokens`` kept paired activations of the cache (read once per report)."""
    xs, n = [], 0
    for batch in cache_batches(cache):
        xs.append(batch.acts.float())
        n += batch.acts.shape[0]
        if n >= max_tokens:
            break
    return torch.cat(xs)[:max_tokens]


@dataclass
class StudyInputs:
    """What every seed reads: the models, the cache, the scoring set and its activations.

    ``acts`` are the paired activations of the scoring rows ``(N, S, 2, d)``, ``diffs`` their
    ft - base difference, ``kl`` the per-token KL(ft || base); ``sample`` paired activations of
    the cache (FVE, the baselines' training differences). The ``c_*`` tensors are the chat rows
    of the scoring set (the KL-patching evaluation's rows), ``answer`` their assistant tokens
    and ``template`` their special (chat-template) tokens.
    """

    org: Organism
    paired: PairedModel
    hook: str
    d_model: int
    meta: dict[str, Any]
    cache: ActivationCache
    ev: EvalSet
    acts: torch.Tensor
    diffs: torch.Tensor
    kl: torch.Tensor
    sample: torch.Tensor
    c_tokens: torch.Tensor
    c_valid: torch.Tensor
    answer: torch.Tensor
    template: torch.Tensor


def prepare_inputs(cfg: DemoConfig, t: float) -> tuple[StudyInputs, float]:
    """Load the organism, harvest the cache and build the scoring set (timed from ``t``)."""
    org = load_organism(cfg.organism)
    paired = org.paired()
    hook = cfg.hook or org.recommended_hook
    meta = {"base_model_name": paired.base_name, "model_name": paired.ft_name, "hook_name": hook}
    t = timed(cfg, "load", t)

    cache = harvest(cfg, org, paired, hook)
    t = timed(cfg, "harvest", t)

    ev = evaluation_set(org, cfg)
    with torch.no_grad():
        acts = paired.paired_activations(ev.tokens, [hook], attention_mask=ev.valid.long())[hook]
    diffs = acts[..., 1, :] - acts[..., 0, :]
    kl = per_token_kl(paired, ev.tokens, attention_mask=ev.valid.long())["kl"]
    sample = sample_acts(cache)
    t = timed(cfg, "evaluation_set", t)

    chat_rows = ev.assistant.any(1)
    c_tokens, c_valid = ev.tokens[chat_rows], ev.valid[chat_rows]
    inputs = StudyInputs(
        org=org,
        paired=paired,
        hook=hook,
        d_model=paired.d_model,
        meta=meta,
        cache=cache,
        ev=ev,
        acts=acts,
        diffs=diffs,
        kl=kl,
        sample=sample,
        c_tokens=c_tokens,
        c_valid=c_valid,
        answer=(ev.assistant & ev.valid)[chat_rows],
        template=torch.isin(c_tokens, torch.tensor(org.tokenizer.all_special_ids)) & c_valid,
    )
    return inputs, t


__all__ = [
    "EvalSet",
    "StudyInputs",
    "evaluation_set",
    "harvest",
    "organism_info",
    "prepare_inputs",
    "sample_acts",
]
