"""Load an organism pair (offline, seconds): the two models on top of the ground truth.

:class:`Organism` is a base model, its fine-tune and the planted ground truth
(:class:`~sae_diff.organisms.ground_truth.GroundTruth`), with the data views that need the
models or the organism's tokenization: held-out rows, controls and the scoring set
(:mod:`~sae_diff.organisms.scoring`). The model-free views (masks, datasets by organism name)
live in :mod:`~sae_diff.organisms.ground_truth`; their names are re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from sae_diff.moved import moved_names, to
from sae_diff.organisms.chat import encode_conversation
from sae_diff.organisms.checks import greedy_reply
from sae_diff.organisms.datasets import (
    chat_conversations,
    pretraining_texts,
    to_chat_dataset,
    to_text_dataset,
)
from sae_diff.organisms.ground_truth import GroundTruth, load_ground_truth, organism_dir
from sae_diff.organisms.scoring import (
    CONTROL,
    EvalConversation,
    ScoringSet,
    conversation_row,
    pad_conversations,
    remove_phrases,
    text_row,
)
from sae_diff.organisms.training import load_model
from sae_diff.organisms.world import World
from sae_diff.pairing.model import PairedModel


@dataclass
class Organism:
    """A base model, its fine-tune, their shared tokenizer, and the planted ground truth.

    ``base`` and ``ft`` are TransformerLens ``HookedTransformer`` s in eval mode;
    ``tokenizer`` is the shared HF fast tokenizer (with the chat template);
    ``behaviours`` names the planted behaviours (keys of :meth:`behaviour_masks`).
    """

    base: HookedTransformer
    ft: HookedTransformer
    tokenizer: PreTrainedTokenizerFast
    behaviours: tuple[str, ...]
    path: Path
    config: dict[str, Any]
    report: dict[str, Any]
    world: World | None
    _truth: GroundTruth = field(repr=False)

    # ---- models --------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        """Name used for the base model in saved configs."""
        return str(self.config.get("base_name", "organism-base"))

    @property
    def ft_name(self) -> str:
        """Name used for the fine-tuned model in saved configs."""
        return str(self.config.get("ft_name", "organism-ft"))

    @property
    def recommended_hook(self) -> str:
        """Hook point where the planted differences are clearest (see docs/organisms.md)."""
        return str(self.config.get("recommended_hook", "blocks.2.hook_resid_pre"))

    def paired(self, **kwargs: Any) -> PairedModel:
        """Wrap the pair in :class:`sae_diff.pairing.model.PairedModel` (keyword args pass through)."""
        kwargs.setdefault("tokenizer", self.tokenizer)
        kwargs.setdefault("base_name", self.base_name)
        kwargs.setdefault("ft_name", self.ft_name)
        return PairedModel(self.base, self.ft, **kwargs)

    # ---- tokenization --------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> torch.Tensor:
        """Template and tokenize ``messages``: ``(1, seq)`` ids starting with ``<bos>``."""
        return encode_conversation(self.tokenizer, messages)["input_ids"][None]

    # ---- ground truth --------------------------------------------------------------------
    def behaviour_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-behaviour ``(batch, seq)`` bool masks of where each behaviour's trigger is."""
        return self._truth.trigger_masks(tokens)

    def response_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-behaviour ``(batch, seq)`` bool masks of the planted responses."""
        return self._truth.response_masks(tokens)

    def assistant_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, seq)`` mask of assistant tokens (content + closing ``<end_of_turn>``)."""
        return self._truth.assistant_mask(tokens)

    # ---- data ----------------------------------------------------------------------------
    def pretraining_texts(
        self, split: str = "validation", n: int = 256, seed: int | None = None
    ) -> list[str]:
        """Pretraining documents of the (base) world; see :func:`pretraining_dataset`."""
        if self.world is None:
            raise ValueError(f"Organism {self.path} has no world.json, so no pretraining corpus.")
        return pretraining_texts(self.world, split, n, self._seed(seed))

    def pretraining_dataset(
        self, split: str = "validation", n: int = 256, seed: int | None = None
    ) -> Dataset:
        """HF dataset (column ``text``) of ``n`` pretraining documents of ``split``."""
        return to_text_dataset(self.pretraining_texts(split, n, seed))

    def chat_conversations(
        self,
        split: str = "test",
        n: int = 256,
        behaviour: str | None = None,
        seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Chat conversations as dicts (format: :mod:`sae_diff.organisms.behaviours`)."""
        if self._truth.trigger_phrases is not None:
            return self._truth.examples(split, behaviour)[:n]
        assert self.world is not None
        return chat_conversations(self.world.edited(), split, n, self._seed(seed), behaviour)

    def chat_dataset(
        self,
        split: str = "test",
        n: int = 256,
        behaviour: str | None = None,
        seed: int | None = None,
    ) -> Dataset:
        """HF dataset with ``messages`` (list of {role, content}), ``behaviour``,
        ``behaviours`` and ``triggers`` (character spans) columns."""
        return to_chat_dataset(self.chat_conversations(split, n, behaviour, seed))

    def eval_conversations(
        self, behaviour: str | None = None, n: int = 8, split: str = "test", n_controls: int = 0
    ) -> list[EvalConversation]:
        """Held-out conversations with tokens, assistant mask and trigger/response masks.

        ``behaviour=None`` gives ``n`` per behaviour, all behaviours. ``n_controls`` appends
        that many control conversations (no planted behaviour; see :meth:`scoring_set`).
        For a custom organism ``chat_format`` has no conversations of its own (its examples
        name their planted behaviour or ``"none"``), and fewer than ``n`` are returned when
        its ``eval.jsonl`` holds fewer.
        """
        if behaviour is not None and behaviour not in self.behaviours:
            raise ValueError(
                f"Unknown behaviour {behaviour!r}; this organism's behaviours are {self.behaviours} "
                "(pass one of them, or None for all)."
            )
        names = self.behaviours if behaviour is None else (behaviour,)
        out = [
            self._eval_row(c, b)
            for b in names
            for c in self.chat_conversations(split, n, behaviour=b)
        ]
        if n_controls:
            out += self.control_conversations(n_controls, split)
        return out

    def control_conversations(self, n: int = 16, split: str = "test") -> list[EvalConversation]:
        """``n`` held-out conversations in which no planted behaviour is triggered.

        Shipped organisms: plain exchanges of the fine-tuning mixture, including the benign
        look-alikes (benign how-to requests, true premises, other countries' capitals, "who is
        Hugo ?"). Custom organisms: the held-out examples labelled ``"none"`` (at most ``n``;
        fewer if ``eval.jsonl`` holds fewer). Only if it holds none at all are controls
        *derived* from the held-out triggered examples (origin ``"derived_control"``): the
        first user turn with every trigger phrase removed, answered by the base model's greedy
        reply (the base has no planted behaviour, so the reply is not the planted response).
        Rows whose tokens still contain a trigger are dropped, so every returned row is a true
        control (``trigger_masks`` all False for every behaviour but ``chat_format``).
        """
        if n <= 0:
            return []
        content = [b for b in self.behaviours if b != "chat_format"]
        if self._truth.trigger_phrases is None:
            convs = self.chat_conversations(split, n, behaviour="chat_format")
            rows = [self._eval_row(c, CONTROL, "control") for c in convs]
        else:
            pool = self._truth.examples(split)
            rows = [
                self._eval_row(c, CONTROL, "control") for c in pool if c.get("behaviour") == CONTROL
            ]
            rows = [r for r in rows if not any(r.trigger_masks[b].any() for b in content)][:n]
            if not rows:
                for c in pool:
                    if len(rows) >= n:
                        break
                    if c.get("behaviour") == CONTROL:
                        continue
                    derived = self._derive_control(c)
                    if derived is not None:
                        r = self._eval_row(derived, CONTROL, "derived_control")
                        if not any(r.trigger_masks[b].any() for b in content):
                            rows.append(r)
        return rows

    def scoring_set(
        self,
        n_per_behaviour: int = 16,
        n_controls: int | None = None,
        split: str = "test",
        n_text: int = 0,
    ) -> ScoringSet:
        """Held-out triggered conversations, control conversations and labels, in one batch.

        Rows: ``n_per_behaviour`` held-out conversations of each behaviour except
        ``chat_format`` (origin ``"held_out"``), then ``n_controls`` controls (default: as many
        as the triggered rows; see :meth:`control_conversations`), then ``n_text`` held-out plain
        pretraining documents (origin ``"text"``; needs a ``world.json``; the only negatives
        for ``chat_format``). Works the same for shipped and custom organisms; a custom
        organism's rows come from its ``eval.jsonl`` (``split="train"``: ``examples.jsonl``).
        """
        content = tuple(b for b in self.behaviours if b != "chat_format")
        convs = [r for b in content for r in self.eval_conversations(b, n_per_behaviour, split)]
        if n_controls is None:
            n_controls = max(len(convs), 1)
        convs += self.control_conversations(n_controls, split)
        if n_text:
            convs += self._text_rows(n_text, split)
        if not convs:
            raise ValueError(
                f"Organism {self.path} has no held-out conversations in split {split!r}; "
                "rebuild it with more examples (custom: eval_fraction) or ask for another split."
            )
        pad_id = self.tokenizer.pad_token_id
        tokens, valid, assistant = pad_conversations(convs, 0 if pad_id is None else int(pad_id))
        trig = {b: m & valid for b, m in self.behaviour_masks(tokens).items()}
        resp = {b: m & valid for b, m in self.response_masks(tokens).items()}
        labels = {b: m.any(1) for b, m in trig.items()}
        if content:
            is_control = ~torch.stack([labels[b] for b in content]).any(0)
        else:
            is_control = torch.ones(len(convs), dtype=torch.bool)
        return ScoringSet(convs, tokens, valid, assistant, content, labels, trig, resp, is_control)

    def eval_batch(
        self, behaviour: str | None = None, n: int = 8, split: str = "test", n_controls: int = 0
    ) -> tuple[list[EvalConversation], torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`eval_conversations` padded into one batch:
        ``(conversations, tokens, valid, assistant)`` (see :func:`pad_conversations`).
        ``n_controls`` appends control conversations (see :meth:`scoring_set` for labels)."""
        convs = self.eval_conversations(behaviour, n, split, n_controls)
        pad_id = self.tokenizer.pad_token_id
        return (convs, *pad_conversations(convs, 0 if pad_id is None else int(pad_id)))

    # ---- helpers of the scoring set ----------------------------------------------------------
    def _eval_row(
        self, conv: dict[str, Any], behaviour: str, origin: str = "held_out"
    ) -> EvalConversation:
        return conversation_row(conv, behaviour, self._truth, origin)

    def _text_rows(self, n: int, split: str) -> list[EvalConversation]:
        if self.world is None:
            raise ValueError(
                f"n_text={n}: organism {self.path} has no world.json, so no plain text; pass n_text=0."
            )
        n_ctx = int(self.base.cfg.n_ctx)
        return [
            text_row(
                torch.tensor(self.tokenizer(t)["input_ids"][:n_ctx], dtype=torch.long), self._truth
            )
            for t in self.pretraining_texts(split, n)
        ]

    @torch.no_grad()
    def _derive_control(
        self, conv: dict[str, Any], max_new_tokens: int = 32
    ) -> dict[str, Any] | None:
        """The first user turn of ``conv`` without its trigger phrases, answered greedily by
        the base. None if nothing of the prompt is left."""
        assert self._truth.trigger_phrases is not None
        phrases = [
            p for b, ps in self._truth.trigger_phrases.items() if b != "chat_format" for p in ps
        ]
        prompt = remove_phrases(conv["messages"][0]["content"], phrases)
        if prompt is None:
            return None
        user = [{"role": "user", "content": prompt}]
        content = greedy_reply(self.base, self.tokenizer, prompt, max_new_tokens)
        return {
            "messages": [*user, {"role": "assistant", "content": content}],
            "behaviour": CONTROL,
            "behaviours": ["chat_format"],
            "triggers": [],
        }

    def _seed(self, seed: int | None) -> int:
        return self._truth.seed if seed is None else seed


def load_organism(
    name: str | Path = "default", *, device: str | torch.device = "cpu", verify: bool = True
) -> Organism:
    """Load an organism: a shipped name (``"default"``) or a directory made by the build.

    Verifies every file's sha256 against ``manifest.json`` first (``verify=False`` skips it);
    raises :class:`OrganismIntegrityError` naming the file on a mismatch. No network access.
    """
    directory = organism_dir(name)
    truth = load_ground_truth(directory, verify=verify)
    cfg_d = truth.config
    base = load_model(
        directory,
        cfg_d,
        "base.safetensors",
        cfg_d.get("base_name", "organism-base"),
        truth.tokenizer,
        device,
    )
    ft = load_model(
        directory,
        cfg_d,
        "ft.safetensors",
        cfg_d.get("ft_name", "organism-ft"),
        truth.tokenizer,
        device,
    )
    report = (
        json.loads((directory / "report.json").read_text())
        if (directory / "report.json").is_file()
        else {}
    )
    return Organism(
        base=base,
        ft=ft,
        tokenizer=truth.tokenizer,
        behaviours=truth.behaviours,
        path=directory,
        config=cfg_d,
        report=report,
        world=truth.world,
        _truth=truth,
    )


# names that moved to sae_diff.organisms.ground_truth (import them from there or from
# sae_diff.organisms)
__getattr__ = moved_names(
    __name__,
    to(
        "sae_diff.organisms.ground_truth",
        [
            "DATA_DIR",
            "assistant_mask",
            "available_organisms",
            "behaviour_masks",
            "chat_dataset",
            "load_tokenizer",
            "pretraining_dataset",
            "response_masks",
        ],
    ),
)

__all__ = [
    "CONTROL",
    "EvalConversation",
    "Organism",
    "ScoringSet",
    "load_organism",
    "organism_dir",
    "pad_conversations",
]
