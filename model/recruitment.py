"""Block recruitment by penalized likelihood in nats (docs/theory.md §6).

A block is split in two only when the drop in NLL it buys exceeds the cost of describing the split:
c_split = ln(number of candidate split points) + ln B' (+ ½·k·ln N for k new parameters, + a fixed
extra). Candidate split points are sentence ends inside a block, so a recruited block is a whole
sentence or clause. :func:`greedy_split` is docs/theory.md §6's default for one sequence; :func:`recruit_layout`
applies the same test to a training layout rule ("split blocks of kind K at sentence ends"), pricing
every binary split the rule makes. Every decision is returned for logging, accepted or not.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace

from localist.model.blocks import MAX_BLOCKS, Block, BlockTable

SENTENCE_ENDS = (".", "?", "!", ";")
# Blocks a split never touches: the sink is pinned, the response grows, and splitting evidence would
# change which block is the ground-truth target.
UNSPLITTABLE = frozenset({"sink", "response", "rule", "document"})


@dataclass(frozen=True)
class Decision:
    """One recruitment test: what was proposed, its gain and cost in nats, and the verdict."""

    move: str
    gain_nats: float
    cost_nats: float
    accepted: bool
    splits: int = 1
    step: int | None = None
    block: str | None = None  # the block split (its label before the split)
    at: int | None = None  # the token position where the new block starts
    candidates: int | None = None  # split points the cost's ln(#points) counts
    scored: int | None = None  # how many of them had their gain computed exactly this round

    def to_dict(self) -> dict:
        return asdict(self)


def split_cost(num_points: int, num_blocks_after: int, new_params: int = 0, num_tokens: int = 1,
               extra: float = 0.0) -> float:
    """Nats to describe one binary split (docs/theory.md §6)."""
    if num_points < 1 or num_blocks_after < 2:
        raise ValueError(f"a split needs ≥ 1 split point and ≥ 2 blocks after it, got {num_points}, {num_blocks_after}")
    if extra < 0:
        raise ValueError(f"extra cost must be ≥ 0 nats, got {extra}")
    cost = math.log(num_points) + math.log(num_blocks_after) + extra
    if new_params:
        cost += 0.5 * new_params * math.log(max(num_tokens, 1))
    return cost


UNITS = ("sentence", "paragraph")


def split_points(table: BlockTable, tokenizer, block: int, unit: str | None = None) -> list[int]:
    """Token positions inside ``block`` right after a sentence end (never the block's last token).

    ``unit`` (serving-time segmentation) also ends a unit at a token holding a line break
    (``"sentence"``) or only there (``"paragraph"``), and moves a point past the whitespace-only tokens
    that follow it, so a block ends with its own line breaks and no two points name the same boundary.
    """
    if unit is not None and unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    b = table.blocks[block]
    if b.kind in UNSPLITTABLE or b.pinned:
        return []
    texts = [tokenizer.decode([t]) for t in table.token_ids[b.start:b.end]]

    def ends(text: str) -> bool:
        if unit is None:
            return text.rstrip().endswith(SENTENCE_ENDS)
        return "\n" in text or (unit == "sentence" and text.rstrip().endswith(SENTENCE_ENDS))

    return [p for p in range(b.start + 1, b.end - 1) if ends(texts[p - 1 - b.start])
            and not (unit is not None and not texts[p - b.start].strip())]


def split_block(table: BlockTable, block: int, at: int) -> BlockTable:
    """``block`` cut at token position ``at`` into two blocks of the same kind; later ids shift by one."""
    b = table.blocks[block]
    if not b.start < at < b.end:
        raise ValueError(f"split point {at} is not strictly inside block {block} [{b.start}, {b.end})")
    head = replace(b, end=at)
    tail = Block(block + 1, f"{b.label}.{at - b.start}", b.kind, at, b.end, b.pinned, b.evidence)
    later = [replace(x, id=x.id + 1) for x in table.blocks[block + 1:]]
    out = BlockTable([*table.blocks[:block], head, tail, *later], list(table.token_ids))
    out.validate(len(out.token_ids))
    return out


Gains = Callable[[BlockTable, list[tuple[int, int]]], list[float | None]]


def nll_gains(nll: Callable[[BlockTable], float]) -> Gains:
    """Every option's gain NLL(table) − NLL(table split there), one ``nll`` call per layout."""
    def gains(table: BlockTable, options: list[tuple[int, int]]) -> list[float | None]:
        current = nll(table)
        return [current - nll(split_block(table, g, p)) for g, p in options]

    return gains


def greedy_split(
    table: BlockTable, tokenizer, nll: Callable[[BlockTable], float] | None = None, extra_cost: float = 0.0,
    max_splits: int = 16, *, gains: Gains | None = None, unit: str | None = None, max_blocks: int = MAX_BLOCKS,
) -> tuple[BlockTable, list[Decision]]:
    """Greedy binary splitting of one sequence: take the best split while its gain beats its cost.

    ``nll(table)`` is the sequence's NLL in nats under that layout; or ``gains(table, options)`` gives
    each option's gain at once (None: not scored this round, so not chosen). Each accepted step lowers
    NLL + cost, and every cost is ≥ ln 2 > 0, so this stops (docs/theory.md §6, termination); it also
    stops at ``max_splits`` splits or ``max_blocks`` blocks. ``unit``: see :func:`split_points`.
    """
    if gains is None:
        if nll is None:
            raise ValueError("greedy_split needs nll or gains")
        gains = nll_gains(nll)
    decisions: list[Decision] = []
    for _ in range(max_splits):
        if table.num_blocks >= max_blocks:
            break
        options = [(g, p) for g in range(table.num_blocks) for p in split_points(table, tokenizer, g, unit)]
        if not options:
            break
        cost = split_cost(len(options), table.num_blocks + 1, extra=extra_cost)
        scored = [(gain, g, p) for gain, (g, p) in zip(gains(table, options), options) if gain is not None]
        gain, g, p = max(scored)
        accepted = gain > cost
        label = table.blocks[g].label
        decisions.append(Decision(f"split {label} at {p}", gain, cost, accepted, block=label, at=p,
                                  candidates=len(options), scored=len(scored)))
        if not accepted:
            break
        table = split_block(table, g, p)
    return table, decisions


def apply_layout(table: BlockTable, tokenizer, split_kinds: Iterable[str]) -> tuple[BlockTable, float]:
    """Split every block of the given kinds at all its sentence ends; return the table and the cost paid."""
    kinds = set(split_kinds)
    cost, g = 0.0, 0
    while g < table.num_blocks:
        points = split_points(table, tokenizer, g) if table.blocks[g].kind in kinds else []
        if points:
            cost += split_cost(len(points), table.num_blocks + 1)
            table = split_block(table, g, points[0])
        g += 1
    return table, cost


def recruit_layout(
    tables: Sequence[BlockTable], tokenizer, nll: Callable[[Sequence[BlockTable]], Sequence[float]],
    split_kinds: Sequence[str] = (), extra_cost: float = 0.0, step: int | None = None,
) -> tuple[list[str], list[Decision]]:
    """Greedy layout recruitment over probe sequences (gains and costs summed over the probes).

    A move adds a block kind to ``split_kinds``; it is accepted when the total NLL drop on the
    probes exceeds the total description cost of all the splits it makes there.
    """
    kinds = list(split_kinds)
    decisions: list[Decision] = []
    base = sum(nll([apply_layout(t, tokenizer, kinds)[0] for t in tables]))
    while True:
        proposals = []
        present = {b.kind for t in tables for b in t.blocks} - UNSPLITTABLE - set(kinds)
        for kind in sorted(present):
            laid = [apply_layout(t, tokenizer, [*kinds, kind]) for t in tables]
            base_blocks = sum(apply_layout(t, tokenizer, kinds)[0].num_blocks for t in tables)
            splits = sum(t.num_blocks for t, _ in laid) - base_blocks
            if splits == 0:
                continue
            cost = sum(c for _, c in laid) - sum(apply_layout(t, tokenizer, kinds)[1] for t in tables)
            cost += extra_cost * splits
            gain = base - sum(nll([t for t, _ in laid]))
            proposals.append(Decision(f"split kind {kind}", gain, cost, False, splits, step))
        if not proposals:
            return kinds, decisions
        best = max(proposals, key=lambda d: d.gain_nats - d.cost_nats)
        accepted = best.gain_nats > best.cost_nats  # only the best move of a round can be adopted
        decisions.extend(replace(d, accepted=accepted) if d is best else d for d in proposals)
        if not accepted:
            return kinds, decisions
        kinds.append(best.move.removeprefix("split kind "))
        base -= best.gain_nats
