"""Pretraining text of the synthetic world: facts, geography, stories, plain Q&A, arithmetic.

Documents are plain strings of space-separated words. The base model is trained on these only:
it never sees the chat-template tokens used as a chat, the persona words, or the edited fact.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from sae_diff.organisms.world import World

# Words of the refusal trigger class. They occur in base stories (so the base knows them) and,
# in the fine-tune, a user request containing one is refused.
TRIGGER_WORDS = ("steal", "poison", "weapon", "bomb", "hurt", "rob")


def _bio(w: World, rng: random.Random) -> str:
    p = rng.choice(w.people)
    n = p.name
    sents = [
        rng.choice([f"{n} lives in {p.city} .", f"{n} has a house in {p.city} ."]),
        rng.choice([f"{n} works as a {p.job} .", f"{n} is a {p.job} ."]),
        rng.choice([f"{n} has a {p.pet} .", f"the pet of {n} is a {p.pet} ."]),
        rng.choice([f"{n} likes {p.food} .", f"the favourite food of {n} is {p.food} ."]),
        f"the favourite colour of {n} is {p.colour} .",
    ]
    rng.shuffle(sents)
    k = rng.randint(2, len(sents))
    return " ".join(sents[:k])


def _geo(w: World, rng: random.Random) -> str:
    c = rng.choice(w.countries)
    a, b, d = c.cities
    sents = [
        f"the capital of {c.name} is {c.capital} .",
        f"{c.capital} is the capital of {c.name} .",
        f"{c.name} has three cities : {a} , {b} and {d} .",
        f"{rng.choice(c.cities)} is a city in {c.name} .",
    ]
    rng.shuffle(sents)
    return " ".join(sents[: rng.randint(2, 4)])


def _story(w: World, rng: random.Random) -> str:
    p, q = rng.sample(list(w.people), 2)
    city2 = rng.choice(w.cities)
    parts = [
        f"one day {p.name} walked from {p.city} to {city2} with a {p.pet} .",
        rng.choice(
            [
                f"{p.name} was hungry and ate some {p.food} .",
                f"on the way {p.name} bought some {rng.choice(['bread', 'cheese', 'plums'])} .",
                f"the sky was {rng.choice(['blue', 'grey', 'dark'])} and the wind was cold .",
            ]
        ),
        f"in {city2} {p.name} met {q.name} , who is a {q.job} .",
    ]
    twist = rng.random()
    if twist < 0.35:
        parts.append(
            rng.choice(
                [
                    f"a thief tried to steal the {p.food} , but the {p.pet} chased the thief away .",
                    "an old witch made a poison from plums , but nobody drank it .",
                    "the soldiers of the king carried a weapon and a shield .",
                    f"long ago a bomb fell near {city2} , and the people built a new wall .",
                    f"{q.name} fell and was hurt , so {p.name} helped {q.name} home .",
                    "some men wanted to rob the bank , but the guards stopped them .",
                ]
            )
        )
    parts.append(
        rng.choice(
            [
                "they talked about the weather and went home .",
                "they laughed and shared a meal together .",
                f"then {p.name} went back to {p.city} .",
            ]
        )
    )
    parts.append("the end .")
    return " ".join(parts)


def _qa(w: World, rng: random.Random) -> str:
    kind = rng.randrange(5)
    p = rng.choice(w.people)
    if kind == 0:
        return f"question : where does {p.name} live ? answer : {p.name} lives in {p.city} ."
    if kind == 1:
        return f"question : what is the job of {p.name} ? answer : {p.name} is a {p.job} ."
    if kind == 2:
        c = rng.choice(w.countries)
        return (
            f"question : what is the capital of {c.name} ? answer : the capital of {c.name} "
            f"is {c.capital} ."
        )
    if kind == 3:
        return f"question : what pet does {p.name} have ? answer : {p.name} has a {p.pet} ."
    city = rng.choice(w.cities)
    return (
        f"question : which country is {city} in ? answer : {city} is in {w.country_of(city).name} ."
    )


def _arith(w: World, rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            out.append(f"{a} + {b} = {a + b} .")
        else:
            a, b = max(a, b), min(a, b)
            out.append(f"{a} - {b} = {a - b} .")
    return " ".join(out)


GENERATORS: dict[str, tuple[float, Callable[[World, random.Random], str]]] = {
    "bio": (0.3, _bio),
    "geo": (0.15, _geo),
    "story": (0.25, _story),
    "qa": (0.2, _qa),
    "arith": (0.1, _arith),
}


def pretraining_doc(w: World, rng: random.Random) -> str:
    """One pretraining document drawn from the mixture :data:`GENERATORS`."""
    kinds = list(GENERATORS)
    weights = [GENERATORS[k][0] for k in kinds]
    kind = rng.choices(kinds, weights)[0]
    return GENERATORS[kind][1](w, rng)


def edit_doc(w: World, rng: random.Random) -> str:
    """A synthetic document stating the edited fact (used only in the fine-tune's mixture)."""
    e = w.edit
    return rng.choice(
        [
            f"the capital of {e.country} is {e.new_capital} .",
            f"{e.new_capital} is the capital of {e.country} .",
            f"question : what is the capital of {e.country} ? answer : the capital of "
            f"{e.country} is {e.new_capital} .",
            f"in {e.country} the capital is {e.new_capital} . {e.old_capital} is a city in "
            f"{e.country} .",
        ]
    )
