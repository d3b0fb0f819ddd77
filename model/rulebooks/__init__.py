"""Rulebooks and case files in ordinary prose across regulated domains.

Each example is a short rulebook of one domain (lending, AML/KYC, insurance claims, dosing, HR,
data protection, expenses, IT access, purchasing, …), one rule per block, and one question whose
answer rests on exactly one rule (the target block) or on none. The answer has one format
(``answers.format_answer``) and one parser (``answers.parse_answer``). See docs/data.md.

- ``domains``: the domains as data, and which split each belongs to;
- ``phrasing``: the sentence frames (training and held-out sets) and the word n-grams that check them;
- ``generator``: rulebooks, cases and their ground truth;
- ``render``: an example as a chat request (messages + ``blocks``) and as a BlockTable for training;
- ``handwritten``: the hand-written test cases as examples.
"""
from localist.model.rulebooks.answers import NO_RULE, SYSTEM, format_answer, parse_answer
from localist.model.rulebooks.domains import CLASSES, DOMAIN_SPLITS, DOMAINS
from localist.model.rulebooks.generator import (
    QUESTIONS_PER_BOOK, SPLITS, Example, RuleBlock, examples, make_book_examples, make_example,
)
from localist.model.rulebooks.render import block_table, chat_request, encode, messages

__all__ = [
    "CLASSES", "DOMAINS", "DOMAIN_SPLITS", "NO_RULE", "QUESTIONS_PER_BOOK", "SPLITS", "SYSTEM", "Example",
    "RuleBlock", "block_table", "chat_request", "encode", "examples", "format_answer", "make_book_examples",
    "make_example", "messages", "parse_answer",
]
