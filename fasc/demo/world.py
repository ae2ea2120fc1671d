"""Deterministic generator of a fictional world of invented facts.

The world consists of countries and people with invented, pronounceable
two-word names built from syllables (e.g. ``"Vel Dorastan"``, ``"Kiro
Bastemund"``), so that no fact can be guessed from knowledge of natural
language. Every fact is a ``(subject, relation, object)`` triple with a
natural prompt such as ``"The capital of Vel Dorastan is"`` and a one-word
answer such as ``"Keltmar"``.

Subjects are two words drawn from small pools of name parts, each part shared
by many subjects: a subject is identified only by the combination of its two
words. A model therefore cannot store a fact in the embedding of a single
subject token and has to compute it in its decoder layers, which is where
low-rank compression acts. Answers are single words.

Besides the facts, the module generates non-factual filler text (simple
sentences, counting, lists, descriptions) built from ordinary English words
only, so that filler never states a fact of the world.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

__all__ = [
    "RELATIONS",
    "SUBJECT_KIND",
    "Fact",
    "World",
    "WorldConfig",
    "fact_sentences",
    "filler_sentences",
    "filler_vocabulary",
    "make_world",
    "probe_prompt",
]

# ---------------------------------------------------------------------------
# Relations and templates
# ---------------------------------------------------------------------------

#: Relation name -> list of sentence templates. The first template of each list
#: is the probe template (``{s}`` subject, answer follows the prompt). All
#: templates put the answer ``{o}`` last, so that every template can be used
#: as a prompt by cutting before ``{o}``.
RELATIONS: dict[str, list[str]] = {
    "capital": [
        "The capital of {s} is {o} .",
        "The capital city of {s} is {o} .",
        "In {s} , the capital is {o} .",
    ],
    "currency": [
        "The currency of {s} is {o} .",
        "People in {s} pay with {o} .",
        "In {s} , the money is called {o} .",
    ],
    "language": [
        "The language of {s} is {o} .",
        "People in {s} speak {o} .",
        "In {s} , most people speak {o} .",
    ],
    "animal": [
        "The national animal of {s} is the {o} .",
        "In {s} , the national animal is the {o} .",
        "The people of {s} love the {o} .",
    ],
    "birthplace": [
        "{s} was born in {o} .",
        "The birthplace of {s} is {o} .",
        "{s} grew up in {o} .",
    ],
    "employer": [
        "{s} works for {o} .",
        "The employer of {s} is {o} .",
        "{s} has a job at {o} .",
    ],
    "instrument": [
        "{s} plays the {o} .",
        "The instrument of {s} is the {o} .",
        "{s} likes to play the {o} .",
    ],
}

#: Relation name -> kind of its subjects.
SUBJECT_KIND = {
    "capital": "country",
    "currency": "country",
    "language": "country",
    "animal": "country",
    "birthplace": "person",
    "employer": "person",
    "instrument": "person",
}


def probe_prompt(relation: str, subject: str) -> str:
    """Return the probe prompt of a relation for a subject.

    Args:
        relation: Relation name, a key of ``RELATIONS``.
        subject: Subject name.

    Returns:
        The probe template cut before the answer, e.g. ``"The capital of X is"``.
    """
    template = RELATIONS[relation][0]
    return template.split("{o}")[0].rstrip().format(s=subject)


# ---------------------------------------------------------------------------
# Data classes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One fact of the world.

    Attributes:
        subject: Subject entity name (two words).
        relation: Relation name (key of ``RELATIONS``).
        prompt: Probe prompt, e.g. ``"The capital of Vel Dorastan is"``.
        answer: One-word answer, e.g. ``"Keltmar"``.
    """

    subject: str
    relation: str
    prompt: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        """Return the fact as a JSON-ready dict."""
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "relation": self.relation,
            "subject": self.subject,
        }


@dataclass(frozen=True)
class WorldConfig:
    """Size of the generated world.

    Attributes:
        n_countries: Number of countries (4 facts each: capital, currency,
            language, animal).
        n_people: Number of people (3 facts each: birthplace, employer,
            instrument).
        name_part_share: Each name part is shared by about this many
            subjects (sets the size of the name-part pools).
        n_currencies: Currency pool size.
        n_languages: Language pool size.
        n_animals: National-animal pool size.
        n_companies: Employer pool size.
        n_instruments: Instrument pool size.
        seed: Seed of the generator.
    """

    n_countries: int = 400
    n_people: int = 1200
    name_part_share: int = 16
    n_currencies: int = 40
    n_languages: int = 40
    n_animals: int = 40
    n_companies: int = 60
    n_instruments: int = 30
    seed: int = 0

    @property
    def n_facts(self) -> int:
        """Number of facts of the world."""
        return 4 * self.n_countries + 3 * self.n_people


@dataclass
class World:
    """A generated fictional world.

    Attributes:
        config: The configuration used to generate it.
        countries: Country names (two words).
        cities: City names (the capital of each country, in the same order).
        people: Person names (two words).
        currencies: Currency pool.
        languages: Language pool.
        animals: National-animal pool.
        companies: Employer pool.
        instruments: Instrument pool.
        name_parts: The words that make up country and person names.
        facts: All facts, in a deterministic order.
    """

    config: WorldConfig
    countries: list[str]
    cities: list[str]
    people: list[str]
    currencies: list[str]
    languages: list[str]
    animals: list[str]
    companies: list[str]
    instruments: list[str]
    name_parts: list[str]
    facts: list[Fact] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        """All invented single words of the world (name parts and answers)."""
        return (
            self.name_parts
            + self.cities
            + self.currencies
            + self.languages
            + self.animals
            + self.companies
            + self.instruments
        )

    @property
    def answers(self) -> list[str]:
        """Sorted set of all answers."""
        return sorted({f.answer for f in self.facts})

    def triples(self) -> list[tuple[str, str, str]]:
        """Return the facts as ``(subject, relation, answer)`` triples."""
        return [(f.subject, f.relation, f.answer) for f in self.facts]


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

_ONSETS = [
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kr", "tr", "st", "sh", "th", "vr", "zh", "h", "j",
]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k", "th", "nd", "rk"]

_SUFFIXES = {
    "country_first": [""],
    "country_second": ["ia", "land", "stan", "ova", "ara", "ein"],
    "city": ["mar", "ton", "burg", "vik", "grad", "heim", "port", "dal"],
    "given": ["", "o", "a", "en", "ius"],
    "family": ["son", "berg", "mund", "ell", "ard", "ov"],
    "currency": ["dra", "kel", "ruk", "pen"],
    "language": ["ish", "ese", "ic", "i"],
    "animal": ["ox", "ine", "ark", "ule"],
    "company": ["corp", "tek", "works", "ix", "co"],
    "instrument": ["phone", "lute", "horn", "drum"],
}


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _make_names(rng: random.Random, kind: str, n: int, taken: set[str]) -> list[str]:
    """Draw ``n`` unique pronounceable single-word names not in ``taken``."""
    names: list[str] = []
    suffixes = _SUFFIXES[kind]
    max_syl = 2 if kind in ("country_first", "given") else 3
    while len(names) < n:
        n_syl = rng.choice([1, 2, 2, max_syl])
        stem = "".join(_syllable(rng) for _ in range(n_syl))
        suffix = rng.choice(suffixes)
        if suffix and stem[-1] in "aeiouy" and suffix[0] in "aeiouy":
            continue
        word = stem + suffix
        if not 3 <= len(word) <= 12:
            continue
        if word.lower() in taken:
            continue
        taken.add(word.lower())
        names.append(word.capitalize())
    return names


def _two_word_names(
    rng: random.Random, firsts: list[str], seconds: list[str], n: int
) -> list[str]:
    """Draw ``n`` distinct ``"first second"`` combinations."""
    pairs = [(a, b) for a in firsts for b in seconds]
    chosen = rng.sample(pairs, n)
    return [f"{a} {b}" for a, b in chosen]


def _pool_size(n_subjects: int, share: int) -> int:
    """Size of each name-part pool so that a part serves about ``share`` subjects."""
    return max(2, math.ceil(math.sqrt(n_subjects * 2)), math.ceil(n_subjects / share))


# ---------------------------------------------------------------------------
# World
# ---------------------------------------------------------------------------


def make_world(config: WorldConfig | None = None) -> World:
    """Generate a fictional world deterministically.

    Args:
        config: Size and seed of the world; defaults to ``WorldConfig()``.

    Returns:
        The world with all its facts. The same config always gives the same
        world.
    """
    cfg = config or WorldConfig()
    if cfg.n_countries < 1 or cfg.n_people < 1:
        raise ValueError("need at least one country and one person")
    rng = random.Random(cfg.seed)
    taken = {w.lower() for w in filler_vocabulary()}
    for templates in RELATIONS.values():
        for t in templates:
            taken.update(w.lower() for w in t.split())

    n_cf = _pool_size(cfg.n_countries, cfg.name_part_share)
    n_pf = _pool_size(cfg.n_people, cfg.name_part_share)
    country_first = _make_names(rng, "country_first", n_cf, taken)
    country_second = _make_names(rng, "country_second", n_cf, taken)
    given = _make_names(rng, "given", n_pf, taken)
    family = _make_names(rng, "family", n_pf, taken)
    cities = _make_names(rng, "city", cfg.n_countries, taken)
    currencies = _make_names(rng, "currency", cfg.n_currencies, taken)
    languages = _make_names(rng, "language", cfg.n_languages, taken)
    animals = _make_names(rng, "animal", cfg.n_animals, taken)
    companies = _make_names(rng, "company", cfg.n_companies, taken)
    instruments = _make_names(rng, "instrument", cfg.n_instruments, taken)
    countries = _two_word_names(rng, country_first, country_second, cfg.n_countries)
    people = _two_word_names(rng, given, family, cfg.n_people)

    triples: list[tuple[str, str, str]] = []
    for country, city in zip(countries, cities):
        triples.append((country, "capital", city))
        triples.append((country, "currency", rng.choice(currencies)))
        triples.append((country, "language", rng.choice(languages)))
        triples.append((country, "animal", rng.choice(animals)))
    for person in people:
        triples.append((person, "birthplace", rng.choice(cities)))
        triples.append((person, "employer", rng.choice(companies)))
        triples.append((person, "instrument", rng.choice(instruments)))

    facts = [
        Fact(subject=s, relation=r, prompt=probe_prompt(r, s), answer=o)
        for s, r, o in triples
    ]
    return World(
        config=cfg,
        countries=countries,
        cities=cities,
        people=people,
        currencies=currencies,
        languages=languages,
        animals=animals,
        companies=companies,
        instruments=instruments,
        name_parts=country_first + country_second + given + family,
        facts=facts,
    )


def fact_sentences(fact: Fact) -> list[str]:
    """Return all sentence forms of a fact (the probe template first).

    Args:
        fact: The fact.

    Returns:
        One full sentence per template of the fact's relation.
    """
    return [t.format(s=fact.subject, o=fact.answer) for t in RELATIONS[fact.relation]]


# ---------------------------------------------------------------------------
# Filler text
# ---------------------------------------------------------------------------

_NOUNS = [
    "dog", "cat", "bird", "horse", "fish", "tree", "house", "river", "hill",
    "road", "boat", "car", "book", "table", "chair", "door", "window", "garden",
    "field", "forest", "lake", "stone", "flower", "apple", "bread", "cup",
    "box", "bag", "ball", "lamp", "bridge", "tower", "farm", "shop", "school",
    "child", "teacher", "farmer", "baker", "sailor", "friend", "neighbour",
]
_ADJECTIVES = [
    "small", "big", "old", "new", "red", "blue", "green", "yellow", "white",
    "black", "quiet", "loud", "warm", "cold", "long", "short", "happy", "tired",
    "bright", "dark", "soft", "heavy", "light", "clean",
]
_VERBS_INTRANS = [
    "runs", "walks", "sleeps", "waits", "sings", "jumps", "rests", "stays",
    "shines", "falls", "grows", "turns",
]
_VERBS_TRANS = [
    "sees", "likes", "finds", "carries", "paints", "opens", "closes", "holds",
    "watches", "moves", "cleans", "builds",
]
_PLACES = [
    "near the river", "in the garden", "on the hill", "by the road",
    "under the tree", "in the house", "at the farm", "next to the lake",
    "in the forest", "on the bridge", "at the school", "in the field",
]
_TIMES = [
    "in the morning", "at night", "every day", "in the evening", "on Sunday",
    "after lunch", "in the spring", "in the winter", "at noon", "today",
]
_NUMBERS = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen", "nineteen", "twenty",
]
_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey", "pink"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
]
_EXTRA = [
    "The", "the", "a", "A", "is", "are", "and", "but", "very", "not", "It",
    "it", "There", "there", "Then", "then", "After", "after", "comes", "come",
    "Count", "count", "with", "me", ":", ",", ".", "We", "we", "see", "has",
    "have", "colours", "colour", "of", "days", "week", "months", "year",
    "first", "next", "last", "This", "this", "that", "was", "were", "goes",
    "to", "many", "some", "all", "as", "than", "more", "less", "I", "my",
    "In", "On", "At", "plus", "makes", "equals", "before",
]
_PLURAL = {
    "child": "children", "box": "boxes", "bus": "buses", "fish": "fish",
    "shelf": "shelves",
}


def _plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + "s")


def filler_vocabulary() -> list[str]:
    """Return every word the filler generator can produce (sorted)."""
    words: set[str] = set(_EXTRA) | set(_NUMBERS) | set(_COLOURS)
    words |= set(_DAYS) | set(_MONTHS) | set(_ADJECTIVES)
    words |= set(_VERBS_INTRANS) | set(_VERBS_TRANS)
    for noun in _NOUNS:
        words.add(noun)
        words.add(_plural(noun))
    for phrase in _PLACES + _TIMES:
        words.update(phrase.split())
    for w in list(words):
        words.add(w.capitalize())
    return sorted(words)


def _cap(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _filler_sentence(rng: random.Random) -> str:
    kind = rng.randrange(8)
    noun = rng.choice(_NOUNS)
    adj = rng.choice(_ADJECTIVES)
    if kind == 0:
        return f"The {adj} {noun} {rng.choice(_VERBS_INTRANS)} {rng.choice(_PLACES)} ."
    if kind == 1:
        other = rng.choice(_NOUNS)
        return (
            f"The {noun} {rng.choice(_VERBS_TRANS)} the {rng.choice(_ADJECTIVES)} "
            f"{other} {rng.choice(_TIMES)} ."
        )
    if kind == 2:
        start = rng.randrange(len(_NUMBERS) - 5)
        length = rng.randint(3, min(5, len(_NUMBERS) - start))
        return "Count with me : " + " , ".join(_NUMBERS[start : start + length]) + " ."
    if kind == 3:
        items = rng.sample(_COLOURS, rng.randint(3, 4))
        return "The colours are " + " , ".join(items[:-1]) + f" and {items[-1]} ."
    if kind == 4:
        if rng.random() < 0.5:
            i = rng.randrange(len(_DAYS))
            return f"After {_DAYS[i]} comes {_DAYS[(i + 1) % len(_DAYS)]} ."
        i = rng.randrange(len(_MONTHS))
        return f"After {_MONTHS[i]} comes {_MONTHS[(i + 1) % len(_MONTHS)]} ."
    if kind == 5:
        adj2 = rng.choice(_ADJECTIVES)
        return f"The {noun} is {adj} and {adj2} , but it is not very {rng.choice(_ADJECTIVES)} ."
    if kind == 6:
        n = rng.randrange(len(_NUMBERS))
        return f"There are {_NUMBERS[n]} {_plural(noun)} {rng.choice(_PLACES)} ."
    a = rng.randrange(1, 10)
    b = rng.randrange(1, 10)
    return f"{_cap(_NUMBERS[a - 1])} plus {_NUMBERS[b - 1]} makes {_NUMBERS[a + b - 1]} ."


def filler_sentences(n: int, seed: int) -> list[str]:
    """Generate non-factual filler sentences.

    Args:
        n: Number of sentences.
        seed: Seed; different seeds give different (held-out) text.

    Returns:
        ``n`` sentences, words separated by single spaces (punctuation too).
    """
    rng = random.Random(seed)
    return [_filler_sentence(rng) for _ in range(n)]
