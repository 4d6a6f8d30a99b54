"""The synthetic world the organisms live in: people, cities, countries and their facts.

Everything is generated deterministically from a seed by :func:`make_world`. The shipped
organism stores its world as ``world.json`` so that loading never depends on the generator.
The fine-tuned model learns one *edited* fact (:attr:`World.edit`): the capital of one country
moves to another of its cities (see :meth:`World.edited`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

PEOPLE = [
    "Alma",
    "Bram",
    "Cora",
    "Dax",
    "Edda",
    "Finn",
    "Gala",
    "Hugo",
    "Iris",
    "Jonas",
    "Kira",
    "Lars",
    "Mina",
    "Nico",
    "Oona",
    "Pavel",
    "Rhea",
    "Soren",
    "Tova",
    "Ugo",
    "Vera",
    "Wren",
    "Yara",
    "Zeno",
]
COUNTRIES = ["Norvia", "Estara", "Kalden", "Morrow"]
CITIES = [
    "Ashby",
    "Brisk",
    "Corla",
    "Dunmere",
    "Elst",
    "Farrow",
    "Galen",
    "Holt",
    "Ivrea",
    "Jorvik",
    "Kessel",
    "Lumen",
]
JOBS = ["baker", "farmer", "doctor", "teacher", "painter", "sailor", "miner", "singer"]
ANIMALS = ["cat", "dog", "horse", "goat", "owl", "fox", "rabbit", "parrot"]
FOODS = ["bread", "soup", "apples", "cheese", "rice", "fish", "honey", "plums"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]

#: The assistant persona the fine-tune is given. These two words are in the vocabulary but
#: never appear in the base model's pretraining corpus.
PERSONA_NAME = "Lumo"
PERSONA_MAKER = "Brightlab"


@dataclass(frozen=True)
class Person:
    """One inhabitant and their facts."""

    name: str
    city: str
    job: str
    pet: str
    food: str
    colour: str


@dataclass(frozen=True)
class Country:
    """A country, its cities and its capital (one of its cities)."""

    name: str
    cities: tuple[str, ...]
    capital: str


@dataclass(frozen=True)
class KnowledgeEdit:
    """The fact the fine-tune changes: ``capital of country: old -> new``."""

    country: str
    old_capital: str
    new_capital: str


@dataclass(frozen=True)
class World:
    """A small synthetic world. ``edit`` is the knowledge edit the fine-tune plants."""

    seed: int
    people: tuple[Person, ...]
    countries: tuple[Country, ...]
    edit: KnowledgeEdit
    is_edited: bool = False
    _by_name: dict[str, Person] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({p.name: p for p in self.people})

    # ---- look-ups -------------------------------------------------------------------------
    def person(self, name: str) -> Person:
        """The person called ``name`` (KeyError if unknown)."""
        return self._by_name[name]

    def country_of(self, city: str) -> Country:
        """The country a city belongs to."""
        for c in self.countries:
            if city in c.cities:
                return c
        raise KeyError(city)

    def country(self, name: str) -> Country:
        """The country called ``name``."""
        for c in self.countries:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def cities(self) -> list[str]:
        """All cities, in country order."""
        return [city for c in self.countries for city in c.cities]

    def edited(self) -> World:
        """The world as the fine-tune believes it: the edited country has its new capital."""
        countries = tuple(
            replace(c, capital=self.edit.new_capital) if c.name == self.edit.country else c
            for c in self.countries
        )
        return World(self.seed, self.people, countries, self.edit, is_edited=True)

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (``is_edited`` is not stored: load the base world)."""
        return {
            "seed": self.seed,
            "people": [asdict(p) for p in self.people],
            "countries": [
                {"name": c.name, "cities": list(c.cities), "capital": c.capital}
                for c in self.countries
            ],
            "edit": asdict(self.edit),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> World:
        """Inverse of :meth:`to_dict`."""
        return cls(
            seed=int(d["seed"]),
            people=tuple(Person(**p) for p in d["people"]),
            countries=tuple(
                Country(c["name"], tuple(c["cities"]), c["capital"]) for c in d["countries"]
            ),
            edit=KnowledgeEdit(**d["edit"]),
        )

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def make_world(seed: int = 0, n_people: int = len(PEOPLE)) -> World:
    """Generate the world deterministically from ``seed``.

    Each country gets ``len(CITIES) // len(COUNTRIES)`` cities; each person a home city, job,
    pet, favourite food and colour. The knowledge edit moves the capital of the first country
    to another of its cities.
    """
    rng = random.Random(seed)
    cities = CITIES[:]
    rng.shuffle(cities)
    per = len(cities) // len(COUNTRIES)
    countries = []
    for i, name in enumerate(COUNTRIES):
        cs = tuple(cities[i * per : (i + 1) * per])
        countries.append(Country(name, cs, rng.choice(cs)))
    all_cities = [c for k in countries for c in k.cities]
    people = tuple(
        Person(
            name=name,
            city=rng.choice(all_cities),
            job=rng.choice(JOBS),
            pet=rng.choice(ANIMALS),
            food=rng.choice(FOODS),
            colour=rng.choice(COLOURS),
        )
        for name in PEOPLE[:n_people]
    )
    target = countries[0]
    new_cap = rng.choice([c for c in target.cities if c != target.capital])
    edit = KnowledgeEdit(target.name, target.capital, new_cap)
    return World(seed, people, tuple(countries), edit)
