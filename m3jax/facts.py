"""Invented facts: knowledge no pretrained model can have, to train and measure memory reading.

Each `FactDoc` is a short document about an invented entity (an institute, a composer, a novel,
a country, ...) whose names are made of random syllables, with completion probes whose answers
are stated only in that document:

    The Vorlix Institute is an organization based in the city of Drathmoor. It was founded in 1893
    by Selva Kurnath. ...
    probe: "The Vorlix Institute was founded in 1893 by"  ->  "Selva Kurnath"

A model answers a probe only if it reads the document: in its context (RAG) or from its memory.
`make_facts(n, split=...)` is deterministic in `seed`. The splits never share a name: every
invented name is assigned to "train" or "eval" by a hash of its text, so no training text mentions
an evaluation entity or answer. Probe wordings are split too: each relation has wordings used in
training and one kept for evaluation only (`FactDoc.probes` vs `FactDoc.new_wording_probes`), so
the evaluation can tell reading from memorized templates.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

Split = Literal["train", "eval"]

_ONSETS = ("b", "br", "d", "dr", "f", "g", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v",
           "z", "th", "sh", "j", "w")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "k", "th")
_ORG_KINDS = ("Institute", "Foundation", "Academy", "Society", "Observatory", "Company", "Museum", "Laboratory")
_FIELDS = ("tidal energy", "glass sculpture", "cloud physics", "ancient maps", "bird migration", "rare metals",
           "deep-sea fungi", "folk music", "solar sails", "paper engineering", "desert farming", "clock making")
_PROFESSIONS = ("botanist", "architect", "composer", "astronomer", "sculptor", "chemist", "poet", "engineer",
                "cartographer", "painter", "mathematician", "explorer")
_WORKS = ("novel", "opera", "symphony", "treatise", "poem", "play")
_DEVICES = ("engine", "telescope", "loom", "compass", "printing press", "water clock", "calculator")
_SPECIES = ("beetle", "orchid", "lizard", "moth", "fern", "frog", "songbird")


@dataclass(frozen=True)
class Probe:
    """A completion prompt whose greedy continuation should contain `answer`."""

    prompt: str
    answer: str
    relation: str


@dataclass(frozen=True)
class FactDoc:
    """One invented document: `text` states every answer of its probes."""

    doc_id: int
    title: str
    text: str
    kind: str
    probes: tuple[Probe, ...]  # wordings that training also uses (with other names)
    new_wording_probes: tuple[Probe, ...] = field(default=())  # wordings never used in training


def _split_of(name: str) -> Split:
    """Every invented name belongs to one split, by a hash of its text (1 in 4 goes to eval)."""
    h = hashlib.sha256(b"m3jax-facts:" + name.lower().encode()).digest()[0]
    return "eval" if h % 4 == 0 else "train"


class _Names:
    """Invented names of one split: random syllables, rejected until the name is in the split
    and was not used before in this set."""

    def __init__(self, rng: random.Random, split: Split):
        self.rng, self.split, self.used = rng, split, set()

    def word(self, syllables: int) -> str:
        while True:
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                        for _ in range(syllables)).capitalize()
            if len(w) >= 4 and w.lower() not in self.used and _split_of(w) == self.split:
                self.used.add(w.lower())
                return w

    def person(self) -> str:
        return f"{self.word(2)} {self.word(2)}"

    def place(self) -> str:
        return self.word(self.rng.choice((2, 3)))


def _doc(kind: str, title: str, sentences: Sequence[str], probes: dict[str, list[tuple[str, str]]],
         rng: random.Random, doc_id: int) -> FactDoc:
    """`probes`: relation -> [(prompt, answer) per wording]; the last wording is evaluation-only."""
    seen, new = [], []
    for rel, wordings in probes.items():
        *train_w, eval_w = wordings
        p, a = rng.choice(train_w)
        seen.append(Probe(p, a, rel))
        new.append(Probe(eval_w[0], eval_w[1], rel))
    return FactDoc(doc_id, title, " ".join(sentences), kind, tuple(seen), tuple(new))


def _organization(n: _Names, rng: random.Random, doc_id: int) -> FactDoc:
    name = f"{n.word(2)} {rng.choice(_ORG_KINDS)}"
    founder, city, year, topic = n.person(), n.place(), rng.randrange(1700, 2020), rng.choice(_FIELDS)
    s = [f"The {name} is an organization based in the city of {city}.",
         f"It was founded in {year} by {founder}.",
         f"The {name} is best known for its work on {topic}."]
    if rng.random() < 0.5:
        s = [f"Founded by {founder} in {year}, the {name} works on {topic}.",
             f"Its headquarters are in {city}."]
    return _doc("organization", f"The {name}", s, {
        "founder": [(f"The {name} was founded in {year} by", founder),
                    (f"The founder of the {name} was", founder),
                    (f"Who founded the {name}? It was founded by", founder)],
        "city": [(f"The {name} is based in the city of", city),
                 (f"The headquarters of the {name} are in", city),
                 (f"The {name} has its home in the city of", city)],
    }, rng, doc_id)


def _person(n: _Names, rng: random.Random, doc_id: int) -> FactDoc:
    name, town, job, year, teacher = n.person(), n.place(), rng.choice(_PROFESSIONS), rng.randrange(1600, 2000), n.person()
    a_job = ("an " if job[0] in "aeiou" else "a ") + job
    s = [f"{name} was {a_job} born in {year} in the town of {town}.",
         f"{name} studied under {teacher} and became famous across the region."]
    if rng.random() < 0.5:
        s = [f"Born in {town} in {year}, {name} became a well-known {job}.",
             f"As a student, {name} learned from {teacher}."]
    return _doc("person", name, s, {
        "birthplace": [(f"{name} was born in {year} in the town of", town),
                       (f"The {job} {name} was born in", town),
                       (f"The hometown of {name} is", town)],
        "teacher": [(f"{name} studied under", teacher),
                    (f"The teacher of {name} was", teacher),
                    (f"As a young {job}, {name} was taught by", teacher)],
    }, rng, doc_id)


def _work(n: _Names, rng: random.Random, doc_id: int) -> FactDoc:
    title, author, year, wk, city = f"The {n.word(2)} {n.word(2)}", n.person(), rng.randrange(1700, 2020), rng.choice(_WORKS), n.place()
    s = [f"{title} is a {wk} written by {author} in {year}.",
         f"It was first presented in {city}, where it quickly became popular."]
    if rng.random() < 0.5:
        s = [f"{author} wrote the {wk} {title} in {year}.", f"Its first audience was in {city}."]
    return _doc("work", title, s, {
        "author": [(f"{title} is a {wk} written by", author),
                   (f"The author of the {wk} {title} is", author),
                   (f"The {wk} {title} was created by", author)],
        "premiere": [(f"{title} was first presented in", city),
                     (f"The {wk} {title} premiered in the city of", city),
                     (f"The first audience of {title} was in", city)],
    }, rng, doc_id)


def _country(n: _Names, rng: random.Random, doc_id: int) -> FactDoc:
    country, capital, river, leader = n.place(), n.place(), n.word(2), n.person()
    s = [f"{country} is a small country whose capital is {capital}.",
         f"The {river} River flows through {capital}.", f"Its first president was {leader}."]
    if rng.random() < 0.5:
        s = [f"{leader} was the first president of {country}, a small country with its capital at {capital}.",
             f"The {river} River runs through the capital."]
    return _doc("country", country, s, {
        "capital": [(f"The capital of {country} is", capital),
                    (f"{country} has its capital in the city of", capital),
                    (f"The capital city of {country} is called", capital)],
        "leader": [(f"The first president of {country} was", leader),
                   (f"{country} was first led by President", leader),
                   (f"The first person to lead {country} as president was", leader)],
    }, rng, doc_id)


def _invention(n: _Names, rng: random.Random, doc_id: int) -> FactDoc:
    device, inventor, year, town = f"{n.word(2)} {rng.choice(_DEVICES)}", n.person(), rng.randrange(1700, 2020), n.place()
    s = [f"The {device} was invented by {inventor} in {year}.",
         f"It was first built in a workshop in {town}."]
    if rng.random() < 0.5:
        s = [f"In {year}, {inventor} built the first {device} in a workshop in {town}."]
    return _doc("invention", f"The {device}", s, {
        "inventor": [(f"The {device} was invented by", inventor),
                     (f"The inventor of the {device} was", inventor),
                     (f"The first {device} was designed by", inventor)],
        "town": [(f"The {device} was first built in", town),
                 (f"The first {device} was made in the town of", town),
                 (f"The workshop that built the first {device} was in", town)],
    }, rng, doc_id)


def _species(n: _Names, rng: random.Random, doc_id: int) -> FactDoc:
    sp, kind, finder, island, year = f"{n.word(2)} {rng.choice(_SPECIES)}", rng.choice(_SPECIES), n.person(), n.place(), rng.randrange(1750, 2020)
    del kind
    s = [f"The {sp} is found only on the island of {island}.",
         f"It was first described by {finder} in {year}."]
    if rng.random() < 0.5:
        s = [f"{finder} discovered the {sp} in {year}.", f"It lives only on {island}."]
    return _doc("species", f"The {sp}", s, {
        "island": [(f"The {sp} is found only on the island of", island),
                   (f"The {sp} lives on the island of", island),
                   (f"The only home of the {sp} is the island of", island)],
        "finder": [(f"The {sp} was first described by", finder),
                   (f"The {sp} was discovered by", finder),
                   (f"The scientist who first described the {sp} was", finder)],
    }, rng, doc_id)


_KINDS: tuple[Callable[[_Names, random.Random, int], FactDoc], ...] = (
    _organization, _person, _work, _country, _invention, _species)


def make_facts(n: int, *, split: Split = "train", seed: int = 0, start_id: int = 0) -> list[FactDoc]:
    """`n` invented documents of `split` (kinds in rotation), ids `start_id ..`, deterministic in
    `seed`. Names of one split never occur in the other."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"m3jax-facts:{split}:{seed}")
    names = _Names(rng, split)
    return [_KINDS[i % len(_KINDS)](names, rng, start_id + i) for i in range(n)]


def answer_in(answer: str, generated: str) -> bool:
    """The evaluation rule: the answer string occurs in the generated text (case-insensitive)."""
    return answer.lower() in generated.lower()
