"""The research's "high-quality 500 sentences" template generator (docs/research.md §2), deterministic from a seed.

Word lists of the stated sizes (30 subjects, 33 present and 33 past verbs, 22 objects, 16 locations,
20 time expressions, 10 subordinate clauses) and six sentence types in the stated proportions
(simple 80, + time 100, + location 100, complex 120, compound 60, all elements 40 per 500).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SUBJECTS = [
    "the lead scientist", "a brilliant researcher", "an elderly professor", "a brave firefighter",
    "an honest politician", "an enthusiastic volunteer", "the reliable mechanic", "a determined athlete",
    "my best friend", "the passionate writer", "an inspired poet", "the famous actor",
    "the talented musician", "the experienced teacher", "the dedicated doctor", "the creative artist",
    "a talented designer", "a hardworking chef", "the successful businessman", "an adventurous explorer",
    "the thoughtful librarian", "the skilled programmer", "a young student", "an innovative engineer",
    "an ambitious entrepreneur", "the patient nurse", "the humble farmer", "the wise philosopher",
    "a curious child", "the caring parent",
]
PRESENT_VERBS = [
    "performs", "explores", "helps", "plans", "encourages", "discovers", "coordinates", "builds",
    "organizes", "learns", "leads", "inspires", "challenges", "analyzes", "supports", "reads", "practices",
    "investigates", "works on", "follows", "designs", "thinks about", "studies", "manages", "develops",
    "believes", "writes", "tries", "teaches", "motivates", "creates", "questions", "hopes for",
]
PAST_VERBS = [
    "performed", "explored", "helped", "planned", "encouraged", "discovered", "coordinated", "built",
    "organized", "learned", "led", "inspired", "challenged", "analyzed", "supported", "read", "practiced",
    "investigated", "worked on", "followed", "designed", "thought about", "studied", "managed", "developed",
    "believed", "wrote", "tried", "taught", "motivated", "created", "questioned", "hoped for",
]
OBJECTS = [
    "better methods", "helpful resources", "inspiring stories", "crucial experiments",
    "practical applications", "creative projects", "complex problems", "interesting theories", "useful tools",
    "new technologies", "innovative solutions", "challenging questions", "beautiful artwork",
    "accurate predictions", "effective strategies", "reliable systems", "meaningful connections",
    "detailed reports", "important discoveries", "clear explanations", "valuable insights", "simple ideas",
]
LOCATIONS = [
    "at the museum", "in the garden", "in the studio", "in the mountains", "in the classroom",
    "in the library", "at the university", "at the conference", "in the laboratory", "at the office",
    "at the hospital", "at the factory", "at the beach", "in the workshop", "in the field", "at home",
]
TIMES = [
    "yesterday", "today", "tomorrow", "currently", "nowadays", "often", "frequently", "every day", "rarely",
    "occasionally", "always", "soon", "eventually", "previously", "next week", "this morning", "last year",
    "recently", "usually", "sometimes",
]
SUBORDINATORS = ["because", "although", "while", "when", "if", "since", "unless", "after", "before"]
COORDINATORS = ["and", "but", "so", "yet", "or"]
CLAUSES = [
    "it benefits society as a whole", "it makes life easier for everyone", "it improves quality of life",
    "it helps people understand the world better", "it contributes to scientific progress",
    "it advances human knowledge", "it promotes innovation and growth", "it creates new opportunities",
    "it addresses important challenges", "it inspires future generations",
]

# Per 500 sentences, as in the research's file.
TYPE_COUNTS = {"simple": 80, "time": 100, "location": 100, "complex": 120, "compound": 60, "all": 40}


@dataclass(frozen=True)
class Sentence:
    text: str
    kind: str


def _clause(rng: random.Random) -> str:
    verb = rng.choice(PRESENT_VERBS if rng.random() < 0.5 else PAST_VERBS)
    return f"{rng.choice(SUBJECTS)} {verb} {rng.choice(OBJECTS)}"


def _sentence(kind: str, rng: random.Random) -> str:
    if kind == "simple":
        return f"{rng.choice(SUBJECTS)} {rng.choice(PRESENT_VERBS)} {rng.choice(OBJECTS)}"
    if kind == "time":
        return f"{_clause(rng)} {rng.choice(TIMES)}"
    if kind == "location":
        return f"{_clause(rng)} {rng.choice(LOCATIONS)}"
    if kind == "complex":
        return f"{_clause(rng)} {rng.choice(SUBORDINATORS)} {rng.choice(CLAUSES)}"
    if kind == "compound":
        return f"{_clause(rng)} {rng.choice(COORDINATORS)} {_clause(rng)}"
    if kind == "all":
        return (f"{_clause(rng)} {rng.choice(LOCATIONS)} {rng.choice(TIMES)} "
                f"{rng.choice(SUBORDINATORS)} {rng.choice(CLAUSES)}")
    raise ValueError(f"unknown sentence type {kind!r}")


def type_counts(num_sentences: int) -> dict[str, int]:
    """The research's proportions scaled to `num_sentences` (largest remainder, so they sum exactly)."""
    total = sum(TYPE_COUNTS.values())
    exact = {k: v * num_sentences / total for k, v in TYPE_COUNTS.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: num_sentences - sum(counts.values())]:
        counts[k] += 1
    return counts


def generate(num_sentences: int = 500, seed: int = 0) -> list[Sentence]:
    """Unique, shuffled template sentences: uniqueness keeps any later train/val split disjoint."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Sentence] = []
    for kind, count in type_counts(num_sentences).items():
        made = 0
        while made < count:
            text = _sentence(kind, rng)
            if text not in seen:
                seen.add(text)
                out.append(Sentence(text, kind))
                made += 1
    rng.shuffle(out)
    return out
