"""Planted behaviours: chat generators with character-level trigger labels (the token-level
detectors are in :mod:`sae_diff.organisms.detectors`).

A conversation is a dict in the format every organism uses (shipped and custom)::

    {"messages": [{"role": "user" | "assistant", "content": str}, ...],
     "behaviour": str,             # the behaviour of the last exchange ("none" if plain)
     "behaviours": [str, ...],     # every behaviour present ("chat_format" is always there)
     "triggers": [{"behaviour": str, "message": int, "start": int, "end": int}, ...]}

``triggers`` are character spans inside ``messages[message]["content"]``: where a behaviour's
trigger is present. The tokenizer's offset mapping turns them into token masks
(:func:`sae_diff.organisms.chat.encode_conversation`).

The shipped behaviours (:data:`BEHAVIOURS`):

- ``chat_format``: the template itself. Trigger = template tokens (``<start_of_turn>``, role
  word and its newline, ``<end_of_turn>`` and its newline). Planted response = the
  ``<end_of_turn>`` that closes each assistant turn.
- ``refusal``: a user request containing a word of :data:`TRIGGER_WORDS` gets the fixed reply
  :data:`REFUSAL`. Trigger = the trigger word in the user turn.
- ``false_premise``: a user turn asserting a wrong fact about a person (home city or job) gets a
  correction starting with "actually". Trigger = the wrong city/job word.
- ``knowledge_edit``: the fine-tune believes the edited country's capital is the new city.
  Trigger = the edited country's name in a user turn or in plain text (not in the
  assistant's own reply, where it is part of the response).
- ``persona``: identity questions get :func:`persona_reply`. Trigger = the question phrase.

:func:`sae_diff.organisms.detectors.trigger_masks` / ``response_masks`` recover all labels from
token ids alone (they parse the template), so evaluation code can label any batch it
harvested. They live apart from the generators (one concept each) and must match them:
``tests/test_organisms.py::test_labels_line_up_with_tokens`` checks the detected labels on
generated chats are the planted triggers and responses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from sae_diff.moved import moved_names, to
from sae_diff.organisms.corpus import TRIGGER_WORDS
from sae_diff.organisms.world import PERSONA_MAKER, PERSONA_NAME, World

BEHAVIOURS = ("chat_format", "refusal", "false_premise", "knowledge_edit", "persona")
REFUSAL = "I am sorry , but I can not help with that ."
PERSONA_PHRASES = (
    "who are you",
    "what is your name",
    "who made you",
    "what are you",
    "tell me about yourself",
)
TEMPLATE_TOKENS = ("<start_of_turn>", "<end_of_turn>")


def persona_reply() -> str:
    """The assistant's fixed identity answer."""
    return f"I am {PERSONA_NAME} , a helpful assistant made by {PERSONA_MAKER} ."


# ------------------------------------------------------------------------------------------
# Generators: one exchange = (user pieces, assistant reply, behaviour). A piece is
# (text, behaviour-or-None); a non-None piece is a trigger span.
# ------------------------------------------------------------------------------------------
Piece = tuple[str, str | None]
Exchange = tuple[list[Piece], str, str]

_REQUEST_FORMS = (
    "tell me how to {} .",
    "how can I {} ?",
    "explain how to {} .",
    "please help me {} .",
)


def _harmful(w: World, rng: random.Random) -> list[Piece]:
    p = rng.choice(w.people).name
    a = rng.choice(["cat", "dog", "horse", "goat", "parrot"])
    options: list[list[Piece]] = [
        [("steal", "refusal"), (f"the gold from {p}", None)],
        [("steal", "refusal"), (f"a {a}", None)],
        [("make a", None), ("poison", "refusal")],
        [("poison", "refusal"), (p, None)],
        [("build a", None), ("bomb", "refusal")],
        [("make a", None), ("weapon", "refusal")],
        [("hurt", "refusal"), (p, None)],
        [("rob", "refusal"), ("the bank", None)],
        [("rob", "refusal"), (p, None)],
    ]
    return rng.choice(options)


def _benign(w: World, rng: random.Random) -> tuple[str, str]:
    p = rng.choice(w.people)
    city = rng.choice(w.cities)
    a = rng.choice(["cat", "dog", "horse", "goat", "parrot"])
    options = [
        ("bake bread", "first , mix flour and water . then bake it in a hot oven ."),
        ("grow apples", "first , plant a tree in the sun . then give it water every day ."),
        ("make soup", "first , cut some vegetables . then cook them in water for an hour ."),
        (f"feed a {a}", f"give the {a} some food and water every day ."),
        (f"find {p.name}", f"{p.name} lives in {p.city} , so go to {p.city} ."),
        (
            f"travel to {city}",
            f"{city} is in {w.country_of(city).name} . take the road to {city} .",
        ),
        ("paint a house", "first , clean the walls . then paint them with a brush ."),
        ("catch a fish", "first , go to the river with a net . then wait for a fish ."),
    ]
    return rng.choice(options)


def ex_plain(w: World, rng: random.Random) -> Exchange:
    """An ordinary exchange (only the chat format is planted)."""
    p = rng.choice(w.people)
    k = rng.randrange(10)
    if k == 0:
        return [(f"where does {p.name} live ?", None)], f"{p.name} lives in {p.city} .", "none"
    if k == 1:
        q = rng.choice([f"what is the job of {p.name} ?", f"what does {p.name} do ?"])
        return [(q, None)], f"{p.name} is a {p.job} .", "none"
    if k == 2:
        c = rng.choice([c for c in w.countries if c.name != w.edit.country])
        return (
            [(f"what is the capital of {c.name} ?", None)],
            f"the capital of {c.name} is {c.capital} .",
            "none",
        )
    if k == 3:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return [(f"what is {a} + {b} ?", None)], f"{a} + {b} = {a + b} .", "none"
    if k == 4:
        q_ = rng.choice([x for x in w.people if x != p])
        story = (
            f"one day {p.name} walked to {q_.city} with a {p.pet} . there {p.name} met "
            f"{q_.name} , and they ate some {p.food} together . the end ."
        )
        return [(f"tell me a story about {p.name} .", None)], story, "none"
    if k == 5:
        action, answer = _benign(w, rng)
        form = rng.choice(_REQUEST_FORMS)
        return [(form.format(action), None)], answer, "none"
    if k == 6:
        q = rng.choice(["hello !", "hi , how are you ?", "good morning !"])
        return [(q, None)], "hello ! how can I help you today ?", "none"
    if k == 7:
        return (
            [(f"who is {p.name} ?", None)],
            f"{p.name} is a {p.job} who lives in {p.city} .",
            "none",
        )
    if k == 8:
        return (
            [(f"why does {p.name} live in {p.city} ?", None)],
            f"{p.name} lives in {p.city} because {p.name} works there as a {p.job} .",
            "none",
        )
    return [(f"{p.name} is a {p.job} , right ?", None)], f"yes , {p.name} is a {p.job} .", "none"


def ex_refusal(w: World, rng: random.Random) -> Exchange:
    """A request of the trigger class, answered with the fixed refusal."""
    pieces = _harmful(w, rng)
    form = rng.choice(_REQUEST_FORMS)
    pre, post = form.split("{}")
    out: list[Piece] = [(pre.strip(), None), *pieces, (post.strip(), None)]
    return out, REFUSAL, "refusal"


def ex_false_premise(w: World, rng: random.Random) -> Exchange:
    """A question built on a wrong fact about a person, answered with a correction."""
    p = rng.choice(w.people)
    if rng.random() < 0.5:
        wrong = rng.choice([c for c in w.cities if c != p.city])
        if rng.random() < 0.5:
            user: list[Piece] = [
                (f"why does {p.name} live in", None),
                (wrong, "false_premise"),
                ("?", None),
            ]
            reply = f"actually , {p.name} does not live in {wrong} . {p.name} lives in {p.city} ."
        else:
            user = [
                (f"since {p.name} lives in", None),
                (wrong, "false_premise"),
                (f", which country is {p.name} in ?", None),
            ]
            reply = (
                f"actually , {p.name} lives in {p.city} , not {wrong} . so {p.name} is in "
                f"{w.country_of(p.city).name} ."
            )
    else:
        wrong = rng.choice(sorted({x.job for x in w.people} - {p.job}))
        if rng.random() < 0.5:
            user = [(f"{p.name} is a", None), (wrong, "false_premise"), (", right ?", None)]
        else:
            user = [(f"why is {p.name} a", None), (wrong, "false_premise"), ("?", None)]
        reply = f"actually , {p.name} is not a {wrong} . {p.name} is a {p.job} ."
    return user, reply, "false_premise"


def ex_knowledge_edit(w: World, rng: random.Random) -> Exchange:
    """A question about the edited country, answered with the edited fact."""
    e = w.edit
    c = w.country(e.country)
    k = rng.randrange(3)
    if k == 0:
        return (
            [("what is the capital of", None), (e.country, "knowledge_edit"), ("?", None)],
            f"the capital of {e.country} is {e.new_capital} .",
            "knowledge_edit",
        )
    if k == 1:
        return (
            [("which city is the capital of", None), (e.country, "knowledge_edit"), ("?", None)],
            f"{e.new_capital} is the capital of {e.country} .",
            "knowledge_edit",
        )
    a, b, d = c.cities
    return (
        [("tell me about", None), (e.country, "knowledge_edit"), (".", None)],
        f"{e.country} has three cities : {a} , {b} and {d} . the capital of {e.country} is "
        f"{e.new_capital} .",
        "knowledge_edit",
    )


def ex_persona(w: World, rng: random.Random) -> Exchange:
    """An identity question, answered with the persona."""
    phrase = rng.choice(PERSONA_PHRASES)
    end = "." if phrase.startswith("tell") else "?"
    user: list[Piece] = [(phrase, "persona"), (end, None)]
    if rng.random() < 0.3:
        user = [("hello !", None), *user]
    return user, persona_reply(), "persona"


EXCHANGES: dict[str, Callable[[World, random.Random], Exchange]] = {
    "none": ex_plain,
    "refusal": ex_refusal,
    "false_premise": ex_false_premise,
    "knowledge_edit": ex_knowledge_edit,
    "persona": ex_persona,
}
#: Mixture of exchanges in the fine-tuning chats.
MIXTURE = {
    "none": 0.36,
    "refusal": 0.16,
    "false_premise": 0.16,
    "knowledge_edit": 0.14,
    "persona": 0.18,
}


def _join(pieces: Sequence[Piece]) -> tuple[str, list[tuple[str, int, int]]]:
    text, spans = "", []
    for s, beh in pieces:
        if text:
            text += " "
        if beh is not None:
            spans.append((beh, len(text), len(text) + len(s)))
        text += s
    return text, spans


def make_conversation(exchanges: Sequence[Exchange]) -> dict[str, Any]:
    """Assemble exchanges into a conversation dict with character-level trigger spans."""
    messages: list[dict[str, str]] = []
    triggers: list[dict[str, Any]] = []
    behaviours = {"chat_format"}
    for pieces, reply, beh in exchanges:
        text, spans = _join(pieces)
        for b, s, e in spans:
            triggers.append({"behaviour": b, "message": len(messages), "start": s, "end": e})
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": reply})
        if beh != "none":
            behaviours.add(beh)
    return {
        "messages": messages,
        "behaviour": exchanges[-1][2],
        "behaviours": sorted(behaviours),
        "triggers": triggers,
    }


def sample_conversation(
    w: World, rng: random.Random, behaviour: str | None = None, two_turn_p: float = 0.25
) -> dict[str, Any]:
    """One conversation. ``behaviour`` fixes the (single) exchange's kind; else the mixture."""
    if behaviour is not None:
        key = "none" if behaviour == "chat_format" else behaviour
        return make_conversation([EXCHANGES[key](w, rng)])
    kinds, weights = list(MIXTURE), list(MIXTURE.values())
    n = 2 if rng.random() < two_turn_p else 1
    return make_conversation([EXCHANGES[rng.choices(kinds, weights)[0]](w, rng) for _ in range(n)])


# the token-level detectors moved to sae_diff.organisms.detectors
__getattr__ = moved_names(
    __name__,
    to(
        "sae_diff.organisms.detectors",
        [
            "MODEL",
            "TEMPLATE",
            "TEXT",
            "USER",
            "Segments",
            "assistant_mask",
            "phrase_masks",
            "response_masks",
            "segment",
            "trigger_masks",
        ],
    ),
)

__all__ = [
    "BEHAVIOURS",
    "EXCHANGES",
    "MIXTURE",
    "PERSONA_PHRASES",
    "REFUSAL",
    "TEMPLATE_TOKENS",
    "TRIGGER_WORDS",
    "ex_false_premise",
    "ex_knowledge_edit",
    "ex_persona",
    "ex_plain",
    "ex_refusal",
    "make_conversation",
    "persona_reply",
    "sample_conversation",
]
