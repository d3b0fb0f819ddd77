"""The hand-written cases (tests/data/handwritten_cases.jsonl) as examples.

One JSON object a line: ``id``, ``domain``, ``title``, ``outcomes`` (three words: favourable,
escalated, adverse), ``rules`` (a list of ``{"label", "text"}``), ``question``, ``expected_outcome``
(one of the outcomes, or "no rule applies") and ``expected_rule`` (a rule's label, or null). They
are written by hand, never by the generator, and never used to choose a model or a setting.
"""
from __future__ import annotations

import json
from pathlib import Path

from localist.model.rulebooks.answers import NO_RULE
from localist.model.rulebooks.generator import Example, RuleBlock

HANDWRITTEN = Path(__file__).resolve().parents[2] / "tests" / "data" / "handwritten_cases.jsonl"
FIELDS = ("id", "domain", "title", "outcomes", "rules", "question", "expected_outcome", "expected_rule")


def load(path: str | Path = HANDWRITTEN) -> list[Example]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        raw = json.loads(line)
        missing = [f for f in FIELDS if f not in raw]
        if missing:
            raise ValueError(f"{path}:{n}: missing {', '.join(missing)}")
        rules = tuple(RuleBlock(r["label"], r["text"]) for r in raw["rules"])
        outcome, target = raw["expected_outcome"], raw["expected_rule"]
        if len(raw["outcomes"]) != 3 or (outcome != NO_RULE and outcome not in raw["outcomes"]):
            raise ValueError(f"{path}:{n}: expected_outcome {outcome!r} is not one of {raw['outcomes']}")
        if (outcome == NO_RULE) != (target is None) or (target is not None and target not in {r.label for r in rules}):
            raise ValueError(f"{path}:{n}: expected_rule {target!r} does not fit expected_outcome {outcome!r}")
        out.append(Example(raw["id"], "handwritten", raw["domain"], raw["title"], tuple(raw["outcomes"]), rules,
                           raw["question"], outcome, target))
    return out
