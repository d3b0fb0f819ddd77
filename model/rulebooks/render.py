"""An example as a chat: for the server's API (messages and ``blocks`` spans) and for training
(a BlockTable and the answer's tokens).

The system message is the instruction (``answers.SYSTEM``); the user message holds the rulebook's
header line, one line per rule (``[label] text``) and the question. Each rule line is a block of
kind ``rule`` labelled with the rule's label; the question is a block of kind ``question``; the
header and the chat template's own tokens fall into the surrounding blocks as the product's chat
builder places them. The server and training build the same table from the same spans.
"""
from __future__ import annotations

from typing import Any

from localist.model.blocks import BlockTable, Span, table_from_chat
from localist.model.data import Encoded
from localist.model.rulebooks.answers import SYSTEM, header
from localist.model.rulebooks.generator import Example

QUESTION_LABEL = "question"
USER_MESSAGE = 1  # index of the message holding the rules and the question


def rule_line(label: str, text: str) -> str:
    """A rule as the prompt shows it: its label as an anchor, then its text."""
    return f"[{label}] {text}"


def user_content(example: Example) -> str:
    rules = "".join(rule_line(r.label, r.text) + "\n" for r in example.rules)
    return f"{header(example.title, example.outcomes)}\n{rules}{example.question}"


def messages(example: Example) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_content(example)}]


def spans(example: Example) -> list[Span]:
    """Character spans inside the user message: each rule line (its newline included), the question."""
    pos = len(header(example.title, example.outcomes)) + 1
    out = []
    for r in example.rules:
        end = pos + len(rule_line(r.label, r.text)) + 1
        out.append(Span(pos, end, r.label, "rule"))
        pos = end
    out.append(Span(pos, pos + len(example.question), QUESTION_LABEL, "question"))
    return out


def chat_request(example: Example) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(messages, blocks) as a chat completion request takes them (docs/server.md, ``blocks``).

    Send ``target_block=example.target`` with them for pointer fidelity against the ground truth
    (leave it out when no rule applies)."""
    blocks = [{"label": s.label, "kind": s.kind, "message": USER_MESSAGE, "start": s.start, "end": s.end}
              for s in spans(example)]
    return messages(example), blocks


def block_table(example: Example, tokenizer) -> BlockTable:
    """The prompt's blocks, built by the product's chat builder as the server builds them."""
    return table_from_chat(tokenizer, messages(example), spans={USER_MESSAGE: spans(example)})


def encode(example: Example, tokenizer) -> Encoded:
    """Prompt blocks, the answer's tokens (EOS included) and the target block for training.

    ``target_block`` is -1 when no rule applies (the answer rests on no block). ``lookup`` is the
    answer token holding the cited label's first character; ``copies`` pair each answer token of
    the label with the same token in the target rule's anchor, where the tokenizer produced one.
    ``pointing`` are the answer tokens that cannot be written without finding the target rule:
    every token up to the label's last (their queries have not yet seen the label they are to
    write, so matching it is no shortcut) and the outcome's first.
    """
    table = block_table(example, tokenizer)
    answer = example.answer
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if example.target is None:
        return Encoded(table, ids + [tokenizer.eos_token_id], -1)
    target = table.index(example.target)
    start = answer.rindex(example.target)
    end = start + len(example.target)
    label_tokens = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
    block = table.blocks[target]
    rule_tokens = table.token_ids[block.start:block.end]
    copies, after = [], -1
    for k in label_tokens:
        source = next((j for j, t in enumerate(rule_tokens) if t == ids[k] and j > after), None)
        if source is not None:
            copies.append((k, block.start + source))
            after = source
    outcome_at = answer.rindex(example.outcome)
    outcome_token = next(k for k, (a, b) in enumerate(offsets) if a <= outcome_at < b)
    pointing = [*range(label_tokens[-1] + 1), outcome_token]
    return Encoded(table, ids + [tokenizer.eos_token_id], target, label_tokens[0], copies, pointing)
