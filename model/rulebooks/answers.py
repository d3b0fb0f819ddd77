"""The one answer format of the rulebook task, and its parser.

An answer first names the rule it rests on, then states that rule's outcome — ``Rule: KYC-2.
Outcome: refer.`` — or says that no rule covers the case — ``Rule: none. Outcome: no rule applies.``
The rule comes first because finding it is the decision: the outcome then reads off the rule just
named, and the queries that write the label are the ones that must point at the rule (training's
pointer term, model/finetune.py).
"""
from __future__ import annotations

import re

NO_RULE = "no rule applies"
NO_LABEL = "none"  # the label an answer names when no rule applies

SYSTEM = (
    "You are a compliance assistant. Decide the case in the question using only the labelled rules "
    "given. Answer in one line: \"Rule: <rule label>. Outcome: <outcome>.\", where the outcome is one "
    "of the possible outcomes listed. If no rule covers the case, answer \"Rule: none. Outcome: no rule applies.\""
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
        return f"Rule: {NO_LABEL}. Outcome: {NO_RULE}."
    if not label or label.lower() == NO_LABEL:
        raise ValueError(f"outcome {outcome!r} needs the label of the rule it rests on")
    return f"Rule: {label}. Outcome: {outcome}."


def parse_answer(text: str) -> tuple[str | None, str | None]:
    """(outcome, rule label) from an answer; anything after the answer is ignored.

    The outcome is lower-cased (``NO_RULE`` when the answer says no rule applies); an answer without
    an ``Outcome:`` gives (None, None). The label is the first ``Rule:`` of the text, before or
    after the outcome; ``Rule: none`` and a no-rule answer name no rule.
    """
    found = _OUTCOME.search(text)
    if found is None:
        return None, None
    outcome = found.group(1).lower()
    if outcome == NO_RULE:
        return NO_RULE, None
    rule = _RULE.search(text)
    label = rule.group(1) if rule else None
    return outcome, None if label is None or label.lower() == NO_LABEL else label
