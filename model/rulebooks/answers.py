"""The one answer format of the rulebook task, and its parser.

An answer states the outcome and names the rule it rests on — ``Outcome: refer. Rule: KYC-2.`` —
or says that no rule covers the case — ``Outcome: no rule applies.``
"""
from __future__ import annotations

import re

NO_RULE = "no rule applies"

SYSTEM = (
    "You are a compliance assistant. Decide the case in the question using only the labelled rules "
    "given. Answer in one line: \"Outcome: <outcome>. Rule: <rule label>.\", where the outcome is one "
    "of the possible outcomes listed. If no rule covers the case, answer \"Outcome: no rule applies.\""
)

# A label: letters and digits, optionally joined by "-" or "." ("R3", "KYC-2", "HR-4.1"); a full
# stop that ends the sentence is not part of it.
_LABEL = r"[A-Za-z][A-Za-z0-9]*(?:[-.][A-Za-z0-9]+)*"
_OUTCOME = re.compile(r"outcome\s*:\s*(no rule applies|[a-z]+(?:[ -][a-z]+)*?)\s*(?:[.;,\n]|$)", re.IGNORECASE)
_RULE = re.compile(rf"rule\s*:\s*\[?({_LABEL})", re.IGNORECASE)


def header(title: str, outcomes: tuple[str, ...] | list[str]) -> str:
    """The rulebook's first line: its title and the outcomes an answer may give."""
    return f"{title}. Possible outcomes: {', '.join(outcomes)}."


def format_answer(outcome: str, label: str | None) -> str:
    if outcome == NO_RULE:
        if label is not None:
            raise ValueError(f"an answer that no rule applies names no rule, got {label!r}")
        return f"Outcome: {NO_RULE}."
    if not label:
        raise ValueError(f"outcome {outcome!r} needs the label of the rule it rests on")
    return f"Outcome: {outcome}. Rule: {label}."


def parse_answer(text: str) -> tuple[str | None, str | None]:
    """(outcome, rule label) from an answer; anything after the answer is ignored.

    The outcome is lower-cased (``NO_RULE`` when the answer says no rule applies); an answer without
    an ``Outcome:`` gives (None, None). The label is looked for only after the outcome, and never
    for a no-rule answer.
    """
    found = _OUTCOME.search(text)
    if found is None:
        return None, None
    outcome = found.group(1).lower()
    if outcome == NO_RULE:
        return NO_RULE, None
    rule = _RULE.search(text, found.end())
    return outcome, rule.group(1) if rule else None
