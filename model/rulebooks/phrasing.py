"""How rules, facts and questions are worded: sentence frames, comparison words, number formats.

Every frame exists in exactly one phrasing set, ``train`` (training and validation) or ``test``:
the test split is written only with test frames, so held-out wording is measured on held-out
domains. ``templates(split)`` lists every string the generator writes for a split; the leakage
test compares them by word 8-grams (``word_ngrams``).
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable

from localist.model.rulebooks.domains import DOMAIN_SPLITS, DOMAINS, Domain, Quantity

# A rule: {scope} is a plural noun phrase ("car loans"), {cond} one or two conditions (joined by
# the phrasing's joiner), {outcome} the clause stating the decision; capitalised slots start a sentence.
RULE_FRAMES: dict[str, tuple[str, ...]] = {
    "train": (
        "For {scope}: if {cond}, {outcome}.",
        "If {cond}, {outcome}. This rule covers {scope}.",
        "{Outcome} when {cond} (applies to {scope}).",
        "Scope: {scope}. Where {cond}, {outcome}.",
        "For {scope}, {outcome} whenever {cond}.",
        "In the case of {scope}, {outcome} if {cond}.",
        "Applies to {scope}. When {cond}, {outcome}.",
        "{Scope}: {outcome} where {cond}.",
        "Where {cond}, {outcome}; this covers {scope}.",
    ),
    "test": (
        "Provided that {cond}, {outcome}; this provision concerns {scope}.",
        "This provision governs {scope}: in any situation in which {cond}, {outcome}.",
        "{Outcome} as soon as it is established that {cond}, with regard to {scope}.",
    ),
}
# How a rule joins two conditions.
JOINERS: dict[str, str] = {"train": " and ", "test": " and, at the same time, "}
# Exceptions wrap a whole rule ({rule}: its text without the final full stop). "void": the rule
# does not apply when {flag} holds; "alt": it applies with another outcome, {alt}.
EXCEPTION_FRAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "void": ("{rule}, unless {flag}.", "{rule}. This does not apply if {flag}.",
                 "{rule}. Exception: the rule does not apply when {flag}."),
        "alt": ("{rule}. However, if {flag}, {alt} instead.", "{rule}. Exception: if {flag}, {alt}."),
    },
    "test": {
        "void": ("{rule}. The provision is set aside entirely in every case where {flag}.",),
        "alt": ("{rule}. By way of derogation, where {flag}, the following applies in its place: {alt}.",),
    },
}
# The question block: {facts} is the case, a few sentences.
QUESTION_FRAMES: dict[str, tuple[str, ...]] = {
    "train": (
        "Case: {facts} Which rule applies, and what is the outcome?",
        "{facts} Decide the case and name the rule it rests on.",
        "New case. {facts} What is the outcome, and under which rule?",
        "Please decide: {facts} Give the outcome and the rule.",
    ),
    "test": (
        "The following matter needs a decision. {facts} Which provision settles it, and with what result?",
        "Consider these facts. {facts} Tell me the result and the provision that produces it.",
    ),
}
# One fact of the case: a quantity ({Noun} with the person's name for {who}), an age, or a flag.
FACT_FRAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "value": ("{Noun} is {value}.", "{Noun}: {value}."),
        "age": ("{Noun} is {value} years old.", "{Noun} is aged {value}."),
        "flag": ("{Flag}.", "Note: {flag}."),
    },
    "test": {
        "value": ("According to the file, {noun} amounts to {value}.",),
        "age": ("The recorded age of {noun} is {value} years.",),
        "flag": ("It has been confirmed that {flag}.",),
    },
}
# How a condition compares a quantity with its threshold, per quantity kind: (the words for
# "greater than", the words for "less than"). The negated forms ("is not less than") are exact here
# because a case value never equals a threshold.
_GREATER, _LESS = ("exceeds", "goes beyond"), ("falls short of", "does not reach")
COMPARISONS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "train": {
        "money": (("is more than", "is above", "is over", "is not less than"),
                  ("is less than", "is below", "is under", "is not more than")),
        "age": (("is older than", "is over", "is not younger than"), ("is younger than", "is under", "is not older than")),
        "duration": (("is longer than", "is more than", "is over"),
                     ("is shorter than", "is less than", "is under", "is not longer than")),
        "count": (("is more than", "is above", "is not fewer than"), ("is fewer than", "is below", "is not more than")),
        "percent": (("is above", "is higher than", "is not below"), ("is below", "is lower than", "is not above")),
        "measure": (("is more than", "is above", "is over"), ("is less than", "is below", "is under", "is not more than")),
        "score": (("is above", "is higher than", "is not below"), ("is below", "is lower than", "is not above")),
    },
    "test": {
        **dict.fromkeys(("money", "duration", "count", "percent", "measure", "score"), (_GREATER, _LESS)),
        "age": (("is past the age of",), ("has not yet reached the age of",)),
    },
}
SINGULAR_UNITS = {"days": "day", "months": "month", "years": "year", "hours": "hour", "metres": "metre",
                  "square metres": "square metre", "degrees Celsius": "degree Celsius"}

PHRASINGS = ("train", "test")


def phrasing_of(split: str) -> str:
    """Validation is worded like training; only the test split uses the held-out frames."""
    return "test" if split == "test" else "train"


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def format_value(q: Quantity, value: int, rng: random.Random) -> str:
    """A quantity's value as prose: "12,500 EUR" or "EUR 12,500", "45%", "30 days", "640"."""
    if q.kind == "money":
        return rng.choice((f"{value:,} {q.unit}", f"{q.unit} {value:,}"))
    if q.kind == "percent":
        return rng.choice((f"{value}%", f"{value} percent"))
    if q.unit:
        unit = SINGULAR_UNITS.get(q.unit, q.unit) if value == 1 else q.unit
        return f"{value:,} {unit}"
    return f"{value:,}"


def condition_text(q: Quantity, greater: bool, threshold: int, phrasing: str, rng: random.Random, who: str) -> str:
    """ "the loan amount is more than 50,000 EUR", "the applicant is younger than 21"."""
    words = rng.choice(COMPARISONS[phrasing][q.kind][0 if greater else 1])
    value = str(threshold) if q.kind == "age" else format_value(q, threshold, rng)
    return f"{q.noun.format(who=who)} {words} {value}"


def fact_text(q: Quantity, value: int, phrasing: str, rng: random.Random, who: str) -> str:
    frame = rng.choice(FACT_FRAMES[phrasing]["age" if q.kind == "age" else "value"])
    noun = q.noun.format(who=who)
    shown = str(value) if q.kind == "age" else format_value(q, value, rng)
    return frame.format(noun=noun, Noun=capitalise(noun), value=shown)


def flag_fact_text(clause: str, phrasing: str, rng: random.Random) -> str:
    return rng.choice(FACT_FRAMES[phrasing]["flag"]).format(flag=clause, Flag=capitalise(clause))


def rule_text(phrasing: str, scope: str, conditions: list[str], outcome: str, rng: random.Random) -> str:
    frame = rng.choice(RULE_FRAMES[phrasing])
    return frame.format(scope=scope, Scope=capitalise(scope), cond=JOINERS[phrasing].join(conditions),
                        outcome=outcome, Outcome=capitalise(outcome))


def exception_text(phrasing: str, effect: str, rule: str, flag: str, alt: str | None, rng: random.Random) -> str:
    frame = rng.choice(EXCEPTION_FRAMES[phrasing][effect])
    return frame.format(rule=rule.removesuffix("."), flag=flag, alt=alt)


def question_text(phrasing: str, facts: list[str], rng: random.Random) -> str:
    return rng.choice(QUESTION_FRAMES[phrasing]).format(facts=" ".join(facts))


def domain_texts(domain: Domain) -> list[str]:
    """Every string a domain contributes to the generated text."""
    texts = [domain.title, domain.intro, domain.everything, *domain.outcomes]
    texts += [t for kind in domain.kinds for t in kind]
    texts += [q.noun for q in domain.quantities]
    texts += [t for f in domain.flags for t in (f.yes, f.no)]
    texts += [c for clauses in domain.clauses for c in clauses]
    return texts


def phrasing_texts(phrasing: str) -> list[str]:
    """Every frame of one phrasing set."""
    texts = [*RULE_FRAMES[phrasing], *QUESTION_FRAMES[phrasing], JOINERS[phrasing]]
    texts += [w for greater, less in COMPARISONS[phrasing].values() for w in (*greater, *less)]
    texts += [f for frames in EXCEPTION_FRAMES[phrasing].values() for f in frames]
    texts += [f for frames in FACT_FRAMES[phrasing].values() for f in frames]
    return texts


def templates(split: str) -> list[str]:
    """The split-specific strings examples of ``split`` are written from: its domains and frames.

    The system prompt, the rulebook header and the answer format are shared by every split."""
    texts = phrasing_texts(phrasing_of(split))
    for key in DOMAIN_SPLITS[split]:
        texts += domain_texts(DOMAINS[key])
    return texts


_WORD = re.compile(r"[a-z0-9]+")
_SLOT = re.compile(r"\{[^{}]*\}")


def word_ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams of a text (words: runs of letters and digits)."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def template_ngrams(texts: Iterable[str], n: int = 8) -> set[tuple[str, ...]]:
    """Word n-grams of templates' literal text: a slot ({cond}, {who}) breaks a run of words."""
    grams: set[tuple[str, ...]] = set()
    for text in texts:
        for literal in _SLOT.split(text):
            grams |= word_ngrams(literal, n)
    return grams
