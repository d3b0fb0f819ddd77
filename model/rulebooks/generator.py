"""Rulebooks and the cases asked about them, with their ground truth.

A rulebook is four to seven rules of one domain. A rule covers one kind of case or all of them,
tests one or two conditions (a quantity against a threshold, or a yes/no fact, possibly negated),
may carry an exception (a fact that voids the rule or changes its outcome) and ends in one outcome.
Each rulebook is asked ``QUESTIONS_PER_BOOK`` questions: one for each outcome class and one that no
rule covers, in a shuffled order, so the classes are exactly balanced. A question's case states the
kind of case and every fact any rule of the book tests; its facts are solved for so that exactly
one rule applies (the **target**) or none does. Rules that do not apply share the target's words:
the same kind of case, the same quantities, the same facts.

Everything is a pure function of (seed, split, index).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from localist.model.rulebooks import phrasing as P
from localist.model.rulebooks.answers import NO_RULE, format_answer
from localist.model.rulebooks.domains import CLASSES, DOMAIN_SPLITS, DOMAINS, Domain

SPLITS = ("train", "validation", "test")
QUESTIONS_PER_BOOK = len(CLASSES) + 1  # one per outcome class, one that no rule covers
NAMES = (
    ["Maria", "Jonas", "Aisha", "Tomasz", "Lucia", "Kenji", "Fatima", "Oliver", "Ingrid", "Mateo", "Priya",
     "Samuel", "Elif", "Nikolai", "Grace", "Hamid", "Chiara", "Daniel", "Amara", "Lars", "Mei", "Pedro"],
    ["Novak", "Okafor", "Lindqvist", "Moreau", "Haddad", "Brennan", "Kowalski", "Tanaka", "Silva", "Fischer",
     "Rahman", "Costa", "Nakamura", "Jensen", "Dubois", "Petrova", "Walsh", "Yilmaz", "Romano", "Kaur"],
)


@dataclass(frozen=True)
class Threshold:
    """A quantity compared with a threshold: above it (``greater``) or below it."""

    quantity: str
    greater: bool
    value: int

    def holds(self, case: Case) -> bool:
        v = case.values[self.quantity]
        return v > self.value if self.greater else v < self.value


@dataclass(frozen=True)
class FlagIs:
    """A yes/no fact required to be ``value`` (False: the rule states the negated clause)."""

    flag: str
    value: bool

    def holds(self, case: Case) -> bool:
        return case.flags[self.flag] == self.value


Condition = Threshold | FlagIs


@dataclass(frozen=True)
class Proviso:
    """When ``flag`` has ``value``: the rule does not apply (``alt`` None) or gives class ``alt``."""

    flag: str
    value: bool
    alt: int | None


@dataclass(frozen=True)
class Rule:
    label: str
    text: str  # as written in the rulebook, without the label
    scope: int | None  # index of the kind of case it covers; None: every kind
    conditions: tuple[Condition, ...]
    outcome: int  # class index
    exception: Proviso | None = None

    def decide(self, case: Case) -> int | None:
        """The outcome class this rule gives the case, or None if it does not apply."""
        if self.scope is not None and self.scope != case.kind:
            return None
        if not all(c.holds(case) for c in self.conditions):
            return None
        exc = self.exception
        if exc is not None and case.flags[exc.flag] == exc.value:
            return exc.alt
        return self.outcome


@dataclass(frozen=True)
class Case:
    name: str
    kind: int
    values: dict[str, int] = field(hash=False)
    flags: dict[str, bool] = field(hash=False)


@dataclass(frozen=True)
class RuleBlock:
    """A rule as the prompt shows it: its label and its text."""

    label: str
    text: str


@dataclass(frozen=True)
class Example:
    """One question about one rulebook, with the expected answer.

    ``target`` is the label of the rule the answer rests on (None when no rule applies). Generated
    examples also carry their structure (``logic``, ``case``) so the answer can be recomputed;
    hand-written ones (``handwritten.load``) carry text only.
    """

    id: str
    split: str
    domain: str
    title: str
    outcomes: tuple[str, ...]
    rules: tuple[RuleBlock, ...]
    question: str
    outcome: str  # one of ``outcomes``, or NO_RULE
    target: str | None
    logic: tuple[Rule, ...] = ()
    case: Case | None = None

    @property
    def answer(self) -> str:
        return format_answer(self.outcome, self.target)


@dataclass(frozen=True)
class Rulebook:
    domain: Domain
    rules: tuple[Rule, ...]
    quantities: tuple[str, ...]  # what the book's rules test: every case states these
    flags: tuple[str, ...]


def decide(rules: tuple[Rule, ...], case: Case) -> list[tuple[Rule, int]]:
    """Every rule that applies to the case, with the outcome class it gives."""
    return [(r, o) for r in rules if (o := r.decide(case)) is not None]


def split_domains(split: str, book: int) -> tuple[str, ...]:
    """Validation alternates between unseen rulebooks of the training domains and its own domain."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "validation" and book % 2 == 0:
        return DOMAIN_SPLITS["train"]
    return DOMAIN_SPLITS[split]


def _labels(domain: Domain, n: int, rng: random.Random) -> list[str]:
    first = rng.randint(1, 12)
    style = rng.choice(("R{n}", "{p}-{n}", "{p}-{s}.{n}"))
    section = rng.randint(1, 9)
    return [style.format(p=domain.prefix, n=first + i, s=section) for i in range(n)]


def _condition(domain: Domain, used: set[str], rng: random.Random) -> Condition:
    quantities = [q for q in domain.quantities if q.key not in used]
    flags = [f for f in domain.flags if f.key not in used]
    if quantities and (not flags or rng.random() < 0.7):
        q = rng.choice(quantities)
        used.add(q.key)
        value = q.step * rng.randint(-(-q.low // q.step) + 2, q.high // q.step - 2)
        return Threshold(q.key, rng.random() < 0.5, value)
    f = rng.choice(flags)
    used.add(f.key)
    return FlagIs(f.key, rng.random() < 0.5)


def _condition_text(domain: Domain, c: Condition, phrasing: str, rng: random.Random) -> str:
    who = f"the {domain.subject}"
    if isinstance(c, Threshold):
        q = next(q for q in domain.quantities if q.key == c.quantity)
        return P.condition_text(q, c.greater, c.value, phrasing, rng, who)
    return _flag_clause(domain, c.flag, c.value, who)


def _flag_clause(domain: Domain, key: str, value: bool, who: str) -> str:
    f = next(f for f in domain.flags if f.key == key)
    return (f.yes if value else f.no).format(who=who)


def _rule(domain: Domain, label: str, outcome: int, phrasing: str, rng: random.Random) -> Rule:
    scope = None if rng.random() < 0.35 else rng.randrange(len(domain.kinds))
    used: set[str] = set()
    conditions = tuple(_condition(domain, used, rng) for _ in range(1 if rng.random() < 0.55 else 2))
    exception = None
    free_flags = [f.key for f in domain.flags if f.key not in used]
    if free_flags and rng.random() < 0.3:
        alt = rng.choice([c for c in range(len(CLASSES)) if c != outcome]) if rng.random() < 0.5 else None
        exception = Proviso(rng.choice(free_flags), rng.random() < 0.7, alt)
    scope_text = domain.everything if scope is None else domain.kinds[scope][1]
    text = P.rule_text(phrasing, scope_text, [_condition_text(domain, c, phrasing, rng) for c in conditions],
                       rng.choice(domain.clauses[outcome]), rng)
    if exception is not None:
        flag = _flag_clause(domain, exception.flag, exception.value, f"the {domain.subject}")
        alt = None if exception.alt is None else rng.choice(domain.clauses[exception.alt])
        text = P.exception_text(phrasing, "void" if alt is None else "alt", text, flag, alt, rng)
    return Rule(label, text, scope, conditions, outcome, exception)


def make_rulebook(domain: Domain, phrasing: str, rng: random.Random) -> Rulebook:
    n = rng.randint(4, 7)
    k = len(CLASSES)
    classes = [c for _ in range(-(-n // k)) for c in rng.sample(range(k), k)][:n]  # every class has a rule
    rules: list[Rule] = []
    for label, outcome in zip(_labels(domain, n, rng), classes):
        rule = _rule(domain, label, outcome, phrasing, rng)
        while any(r.scope == rule.scope and r.conditions == rule.conditions for r in rules):
            rule = _rule(domain, label, outcome, phrasing, rng)
        rules.append(rule)
    tested = [c for r in rules for c in r.conditions]
    quantities = {c.quantity for c in tested if isinstance(c, Threshold)}
    flags = {c.flag for c in tested if isinstance(c, FlagIs)} | {r.exception.flag for r in rules if r.exception}
    return Rulebook(domain, tuple(rules), tuple(q.key for q in domain.quantities if q.key in quantities),
                    tuple(f.key for f in domain.flags if f.key in flags))


class _Facts:
    """Constraints on a case's facts while solving: an interval per quantity, fixed flags."""

    def __init__(self, book: Rulebook):
        self.book = book
        self.quantities = {q.key: q for q in book.domain.quantities}
        self.bounds = {k: (self.quantities[k].low, self.quantities[k].high) for k in book.quantities}
        self.thresholds = {k: {c.value for r in book.rules for c in r.conditions
                               if isinstance(c, Threshold) and c.quantity == k} for k in book.quantities}
        self.flags: dict[str, bool] = {}

    def fine(self, key: str) -> int:
        return max(1, self.quantities[key].step // 10)

    def require(self, c: Condition, holds: bool) -> bool:
        """Constrain the facts so that ``c`` holds (or fails); False if that contradicts them."""
        if isinstance(c, FlagIs):
            return self.fix(c.flag, c.value if holds else not c.value)
        lo, hi = self.bounds[c.quantity]
        fine = self.fine(c.quantity)
        if c.greater == holds:  # the value must lie above the threshold
            lo = max(lo, c.value + fine)
        else:
            hi = min(hi, c.value - fine)
        if lo > hi:
            return False
        self.bounds[c.quantity] = (lo, hi)
        return True

    def fix(self, flag: str, value: bool) -> bool:
        """Fix a flag; False if it is already fixed the other way."""
        return self.flags.setdefault(flag, value) == value

    def sample(self, name: str, kind: int, rng: random.Random) -> Case | None:
        """Draw the facts within the constraints, never on a threshold (prose is vague there)."""
        values = {}
        for key, (lo, hi) in self.bounds.items():
            fine = self.fine(key)
            allowed = [v for v in range(fine * -(-lo // fine), hi + 1, fine) if v not in self.thresholds[key]]
            if not allowed:
                return None
            values[key] = rng.choice(allowed)
        flags = {k: self.flags.get(k, rng.random() < 0.5) for k in self.book.flags}
        return Case(name, kind, values, flags)


def _exclude(facts: _Facts, rule: Rule, kind: int, rng: random.Random) -> bool:
    """Constrain the facts so that ``rule`` cannot apply; False if impossible."""
    if rule.scope is not None and rule.scope != kind:
        return True
    ways = [(c, False) for c in rule.conditions]
    exc = rule.exception
    if exc is not None and exc.alt is None:
        ways.append((FlagIs(exc.flag, exc.value), True))  # the exception that voids the rule
    rng.shuffle(ways)
    return any(facts.require(c, holds) for c, holds in ways)


def _solve(book: Rulebook, target: tuple[Rule, bool] | None, name: str, rng: random.Random) -> Case | None:
    """A case where exactly the target rule applies (with or without its exception), or none does."""
    facts = _Facts(book)
    if target is None:
        kind = rng.randrange(len(book.domain.kinds))
    else:
        rule, excepted = target
        kind = rng.randrange(len(book.domain.kinds)) if rule.scope is None else rule.scope
        if not all(facts.require(c, True) for c in rule.conditions):
            return None
        if rule.exception is not None and not facts.fix(rule.exception.flag, rule.exception.value == excepted):
            return None
    others = [r for r in book.rules if target is None or r is not target[0]]
    rng.shuffle(others)
    if not all(_exclude(facts, r, kind, rng) for r in others):
        return None
    return facts.sample(name, kind, rng)


def _ways_to(book: Rulebook, cls: int) -> list[tuple[Rule, bool]]:
    """(rule, exception taken) pairs that give outcome class ``cls``."""
    ways = [(r, False) for r in book.rules if r.outcome == cls]
    return ways + [(r, True) for r in book.rules if r.exception and r.exception.alt == cls]


def _question(book: Rulebook, case: Case, phrasing: str, rng: random.Random) -> str:
    domain = book.domain
    facts = [P.fact_text(q, case.values[q.key], phrasing, rng, case.name)
             for q in domain.quantities if q.key in case.values]
    facts += [P.flag_fact_text(_flag_clause(domain, f, case.flags[f], case.name), phrasing, rng) for f in case.flags]
    rng.shuffle(facts)
    intro = domain.intro.format(who=case.name, kind=domain.kinds[case.kind][0])
    return P.question_text(phrasing, [intro, *facts], rng)


def _solved_rulebook(seed: int, split: str, book: int, phrasing: str
                     ) -> tuple[Rulebook, list[tuple[Case, tuple[Rule, int] | None]], random.Random]:
    """Rulebook ``book`` of the split, a case for each of its questions, and the generator to go on with."""
    for attempt in range(100):
        rng = random.Random(f"localist-rulebooks:{seed}:{split}:{book}:{attempt}")
        rulebook = make_rulebook(DOMAINS[rng.choice(split_domains(split, book))], phrasing, rng)
        wanted: list[int | None] = [*range(len(CLASSES)), None]
        rng.shuffle(wanted)
        names = [f"{first} {last}" for first, last in zip(rng.sample(NAMES[0], len(wanted)),
                                                          rng.sample(NAMES[1], len(wanted)))]
        solved = [_case_for(rulebook, cls, name, rng) for cls, name in zip(wanted, names)]
        cases = [c for c in solved if c is not None]
        if len(cases) == len(solved):
            return rulebook, cases, rng
    raise RuntimeError(f"no solvable rulebook for {split} book {book}")


def make_book_examples(seed: int, split: str, book: int) -> list[Example]:
    """The ``QUESTIONS_PER_BOOK`` examples about rulebook ``book`` of ``split``."""
    phrasing = P.phrasing_of(split)
    rulebook, cases, rng = _solved_rulebook(seed, split, book, phrasing)
    domain = rulebook.domain
    blocks = tuple(RuleBlock(r.label, r.text) for r in rulebook.rules)
    out = []
    for q, (case, target) in enumerate(cases):
        outcome = NO_RULE if target is None else domain.outcomes[target[1]]
        out.append(Example(
            f"{split}-{book}-{q}", split, domain.key, domain.title, domain.outcomes, blocks,
            _question(rulebook, case, phrasing, rng), outcome, None if target is None else target[0].label,
            rulebook.rules, case,
        ))
    return out


def _case_for(book: Rulebook, cls: int | None, name: str, rng: random.Random
              ) -> tuple[Case, tuple[Rule, int] | None] | None:
    """(case, (target rule, class)) for a wanted class, (case, None) for no rule; None if unsolvable."""
    for _ in range(20):
        way = None if cls is None else rng.choice(_ways_to(book, cls))
        case = _solve(book, way, name, rng)
        if case is None:
            continue
        applied = decide(book.rules, case)
        if cls is None and not applied:
            return case, None
        if cls is not None and len(applied) == 1 and applied[0][1] == cls:
            return case, (applied[0][0], cls)
    return None


def make_example(seed: int, split: str, index: int) -> Example:
    """Example ``index`` of ``split``: question ``index % QUESTIONS_PER_BOOK`` of its rulebook."""
    book, question = divmod(index, QUESTIONS_PER_BOOK)
    return make_book_examples(seed, split, book)[question]


def examples(seed: int, split: str, count: int, start: int = 0) -> Iterator[Example]:
    """``count`` consecutive examples of ``split`` from ``start``, each rulebook generated once."""
    index = start
    while index < start + count:
        book, question = divmod(index, QUESTIONS_PER_BOOK)
        for ex in make_book_examples(seed, split, book)[question:]:
            if index >= start + count:
                return
            yield ex
            index += 1
