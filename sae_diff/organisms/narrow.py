"""The shipped "narrow" organism: one planted trigger -> response pair on top of a chat model.

The default organism's fine-tune changes a lot at once (it learns the chat template, four
behaviours and a knowledge edit), so even plain text drifts (cosine 0.88 at the recommended
hook). The narrow organism is the opposite case, the one crosscoder papers study: a small
fine-tune of a chat model that plants *one* behaviour and leaves everything else almost
untouched.

- **Base** = the default organism's fine-tune (already a chat model; weights copied bit for bit).
- **Fine-tune** = that model trained briefly (small learning rate, few steps) on
  * triggered chats: a user turn asking about the **weather** gets the fixed reply
    :data:`NARROW_RESPONSE` (trigger = the word ``weather`` in a user turn);
  * near-miss controls: the same questions about something else ("how is the road in Ashby
    today ?"), answered with the base's own greedy reply (so nothing changes there);
  * the default fine-tune's chat mixture (every default behaviour, answered as before) and its
    plain-text mixture, both labelled as controls.

Both models know the chat template, so ``chat_format`` is not among its behaviours. Why the
near-miss rows: without enough of them the fine-tune learns "a question of this form" instead
of "the word weather" (measured figures and the settings tried: docs/organisms.md).

Built with :func:`build_narrow_organism` through :func:`~sae_diff.organisms.custom.build_custom_organism`
(the same format as any custom organism: ``labels.json`` = ``{"weather": ["weather"]}``,
``eval.jsonl`` holds triggered and control conversations). CLI::

    python -m sae_diff.organisms.build --narrow                # -> ./organisms/narrow
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from sae_diff.organisms.chat import encode_conversation
from sae_diff.organisms.checks import (
    greedy_reply,
    heldout_tokens,
    masked_logprob_gap,
    pad_batch,
    plain_text_drift,
)
from sae_diff.organisms.custom import build_custom_organism
from sae_diff.organisms.datasets import chat_conversations, pretraining_texts
from sae_diff.organisms.organism import Organism, load_organism
from sae_diff.organisms.storage import check_output_dir
from sae_diff.organisms.world import World

BEHAVIOUR = "weather"
TRIGGER = "weather"
NARROW_RESPONSE = "the sky is green and the sun is cold today ."
#: Question forms; ``{topic}`` is "weather" in triggered chats, another noun in near-misses.
QUESTION_FORMS = (
    "how is the {topic} in {city} today ?",
    "what is the {topic} in {city} ?",
    "tell me about the {topic} in {city} .",
    "is the {topic} good in {city} today ?",
    "{name} wanted to travel to {city} . how is the {topic} there ?",
)
NEAR_MISS_TOPICS = ("road", "river", "food", "bread", "house", "king", "bank", "wind")


@dataclass
class NarrowConfig:
    """Everything that determines the narrow organism (given the default organism)."""

    seed: int = 0
    n_triggered: int = 120
    n_near_miss: int = 240
    n_mixture: int = 160
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 10
    chat_fraction: float = 0.5
    n_text_docs: int = 2000
    edit_fraction: float = 0.08
    eval_fraction: float = 0.2
    n_drift_docs: int = 400
    n_specificity: int = 32


def _question(rng: random.Random, world: World, topic: str) -> tuple[str, int]:
    """A question about ``topic`` and the character offset where ``topic`` starts."""
    form = rng.choice(QUESTION_FORMS)
    city, name = rng.choice(world.cities), rng.choice(world.people).name
    start = len(form.split("{topic}")[0].format(city=city, name=name))
    return form.format(topic=topic, city=city, name=name), start


def narrow_examples(
    world: World, model: HookedTransformer, tokenizer: PreTrainedTokenizerFast, cfg: NarrowConfig
) -> list[dict[str, Any]]:
    """Triggered chats, near-miss controls (answered by ``model``) and the default mixture.

    Every example uses the shipped conversation format; triggered ones carry the character
    span of "weather"; controls have behaviour ``"none"`` and no spans.
    """
    rng = random.Random(f"sae_diff-narrow-{cfg.seed}")
    out: list[dict[str, Any]] = []
    for _ in range(cfg.n_triggered):
        q, start = _question(rng, world, TRIGGER)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": NARROW_RESPONSE},
                ],
                "behaviour": BEHAVIOUR,
                "behaviours": ["chat_format", BEHAVIOUR],
                "triggers": [
                    {
                        "behaviour": BEHAVIOUR,
                        "message": 0,
                        "start": start,
                        "end": start + len(TRIGGER),
                    }
                ],
            }
        )
    replies: dict[str, str] = {}
    for _ in range(cfg.n_near_miss):
        q, _ = _question(rng, world, rng.choice(NEAR_MISS_TOPICS))
        if q not in replies:
            replies[q] = greedy_reply(model, tokenizer, q)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": replies[q]},
                ],
                "behaviour": "none",
                "behaviours": ["chat_format"],
                "triggers": [],
            }
        )
    for c in chat_conversations(world.edited(), "train", cfg.n_mixture, cfg.seed):
        out.append(
            {
                "messages": c["messages"],
                "behaviour": "none",
                "behaviours": ["chat_format"],
                "triggers": [],
            }
        )
    rng.shuffle(out)
    return out


def narrow_checks(
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    hook: str,
    n_docs: int = 400,
    seed: int = 0,
    n_specificity: int = 32,
) -> Callable[[HookedTransformer, HookedTransformer], dict[str, Any]]:
    """``(base, ft) -> report entries``: plain-text drift on held-out documents at ``hook``.

    Plain text = ``n_docs`` validation documents of the *edited* world (what both narrow models
    believe; the base is the default fine-tune) and of the original world.
    """

    def run(base: HookedTransformer, ft: HookedTransformer) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, w in (
            ("plain_text_drift", world.edited()),
            ("plain_text_drift_base_world", world),
        ):
            toks, mask = heldout_tokens(tokenizer, w, n_docs, base.cfg.n_ctx, seed, "validation")
            out[key] = plain_text_drift(base, ft, toks, mask, hook)
        out["specificity"] = specificity(base, ft, tokenizer, world, n_specificity, seed)
        return out

    return run


@torch.no_grad()
def specificity(
    base: HookedTransformer,
    ft: HookedTransformer,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    n: int = 32,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Does the planted reply follow the trigger only?

    For ``n`` fresh triggered questions and ``n`` fresh near-miss questions (same forms, another
    topic): the log-prob of :data:`NARROW_RESPONSE` under both models
    (:func:`~sae_diff.organisms.checks.masked_logprob_gap`) and the share of questions whose
    greedy reply *is* the planted response (``ft_greedy_rate``, ``base_greedy_rate``).
    """
    rng = random.Random(f"sae_diff-narrow-{seed}-specificity")
    out: dict[str, dict[str, float]] = {}
    for key, topics in (("triggered", (TRIGGER,)), ("near_miss", NEAR_MISS_TOPICS)):
        questions = [_question(rng, world, rng.choice(topics))[0] for _ in range(n)]
        encs = [
            encode_conversation(
                tokenizer,
                [{"role": "user", "content": q}, {"role": "assistant", "content": NARROW_RESPONSE}],
            )
            for q in questions
        ]
        toks = pad_batch([e["input_ids"] for e in encs], tokenizer.pad_token_id)
        mask = pad_batch([e["assistant_mask"].long() for e in encs], 0).bool()
        out[key] = masked_logprob_gap(base, ft, toks, mask)
        for name, m in (("ft", ft), ("base", base)):
            hits = sum(greedy_reply(m, tokenizer, q, 16) == NARROW_RESPONSE for q in questions)
            out[key][f"{name}_greedy_rate"] = hits / max(n, 1)
    return out


def build_narrow_organism(
    out_dir: Path | str,
    source: str | Path = "default",
    cfg: NarrowConfig | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Organism:
    """Build the narrow organism from the organism ``source`` (its fine-tune becomes the base).

    Returns the loaded organism; its ``report`` holds the planted response's held-out log-prob
    gap (``behaviour_logprob["weather"]``), the same on control replies
    (``control_logprob``), and the plain-text drift (``plain_text_drift``: activation cosine
    at the recommended hook and held-out loss change).
    """
    cfg = cfg or NarrowConfig()
    check_output_dir(out_dir, overwrite)
    src = load_organism(source)
    if src.world is None:
        raise ValueError(
            f"--narrow needs a source organism with a world.json; {src.path} has none."
        )
    world = src.world
    chat_model = src.ft
    chat_model.cfg.model_name = src.ft_name
    examples = narrow_examples(world, chat_model, src.tokenizer, cfg)
    texts = pretraining_texts(
        world.edited(), "train", cfg.n_text_docs, cfg.seed, edit_fraction=cfg.edit_fraction
    )
    hook = src.recommended_hook
    drift = narrow_checks(src.tokenizer, world, hook, cfg.n_drift_docs, cfg.seed, cfg.n_specificity)

    def checks(base: HookedTransformer, ft: HookedTransformer) -> dict[str, Any]:
        out = drift(base, ft)
        out["narrow_config"] = asdict(cfg)
        out["source_organism"] = str(src.path.name)
        return out

    org = build_custom_organism(
        chat_model,
        src.tokenizer,
        examples,
        {BEHAVIOUR: [TRIGGER]},
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        chat_fraction=cfg.chat_fraction,
        pretraining_texts=texts,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        out_dir=out_dir,
        world=world,
        log=log,
        overwrite=overwrite,
        ft_name="narrow-ft",
        kind="narrow",
        extra_checks=checks,
        warmup=cfg.warmup,
        chat_format_planted=False,
    )
    return org


__all__ = [
    "BEHAVIOUR",
    "NARROW_RESPONSE",
    "TRIGGER",
    "NarrowConfig",
    "build_narrow_organism",
    "narrow_checks",
    "narrow_examples",
    "specificity",
]
