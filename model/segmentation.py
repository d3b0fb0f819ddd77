"""Block recruitment for unmarked text (docs/theory.md §6), scored by the localist model on given weights.

A message or document sent without blocks is one block. :meth:`Segmenter.segment` splits it greedily
(``model/recruitment.py:greedy_split``) at sentence or paragraph ends (``split_points``, ``unit``): a split is accepted only when the prompt's NLL in nats under the model at the dial
ρ_seg drops by more than ``split_cost`` = ln(#candidate points) + ln B' (+ a stated extra). At ρ = 0 the
layout does not change attention (§2), so every gain is exactly 0: segmentation needs ρ_seg > 0.

The gain is the exact criterion: the NLL of every prompt token (positions 1…T−1, summed in float64)
under the reference localist model (``model/reference.py``: docs/theory.md §2 in float32 on the
checkpoint's own weights), for the current layout and for the layout with the split.

Cost. One forward pass over T tokens costs O(L·H·T²) for attention (the reference materialises the
scores) plus O(T) for the rest. Exact greedy runs a forward per candidate split point per round: with K
points and R rounds (accepted splits + the final rejected one), R·(K + 1) forwards, O(R·K·L·H·T²).
For a 2 000-token document with ~100 sentence ends that is too slow on a CPU (bench/results), so by
default a round first ranks the candidates by a **window proxy** — the same criterion on the
2W + 1 tokens around each point (the sink, W tokens before it, W after, under the current layout
clipped to the window: O(K·L·H·W²)) — and then computes the exact gain of only the ``shortlist``
best-ranked points (O(shortlist·L·H·T²)). Every gain recorded and every acceptance is the exact
criterion; the proxy only decides which points get scored, and the cost still pays ln K for naming one
of all K. With K ≤ shortlist the search is exact greedy (tests compare the two).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from localist.model.blocks import MAX_BLOCKS, Block, BlockTable
from localist.model.recruitment import Decision, greedy_split, split_block

DEFAULT_RHO = 0.9  # recruit_rho of training (docs/theory.md §6)
DEFAULT_SHORTLIST = 4
DEFAULT_WINDOW = 64
MEMORY_BYTES = 1.5e9  # attention scores in flight per forward batch (the reference keeps ~6 [B, H, T, T] tensors)


@dataclass
class Segmentation:
    """What :meth:`Segmenter.segment` did: the new table, every round's decision, and what it cost."""

    table: BlockTable
    decisions: list[Decision]
    seconds: float
    sequences: int  # sequences run through the model (windows included)
    tokens: int  # tokens run through the model


class Segmenter:
    """Greedy block recruitment under a localist model at the dial ``rho`` (> 0)."""

    def __init__(self, lm, rho: float = DEFAULT_RHO, shortlist: int | None = DEFAULT_SHORTLIST,
                 window: int = DEFAULT_WINDOW, unit: str = "sentence"):
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {rho}")
        if shortlist is not None and shortlist < 1:
            raise ValueError(f"shortlist must be ≥ 1 (or None for exact greedy), got {shortlist}")
        self.lm, self.rho, self.shortlist, self.window, self.unit = lm, rho, shortlist, window, unit
        self.sequences = self.tokens = 0

    # -- NLL ----------------------------------------------------------------------------------------

    def _rows(self, length: int) -> int:
        heads = self.lm.model.config.num_attention_heads
        return max(1, min(32, int(MEMORY_BYTES // (6 * 4 * heads * length * length))))

    def nll(self, tables: list[BlockTable]) -> list[float]:
        """Each table's NLL in nats: −Σ ln p(x_{t+1} | x_≤t) over its tokens, at ρ_seg on every layer."""
        out: list[float] = []
        rows = self._rows(max(len(t.token_ids) for t in tables))
        for k in range(0, len(tables), rows):
            chunk = tables[k:k + rows]
            logits, _ = self.lm.forward(chunk, [[self.rho] * self.lm.num_layers] * len(chunk))
            for r, t in enumerate(chunk):
                ids = torch.tensor(t.token_ids)
                logp = torch.log_softmax(logits[r, : len(ids) - 1], -1).gather(1, ids[1:, None])
                out.append(-float(logp.double().sum()))
            self.sequences += len(chunk)
            self.tokens += sum(len(t.token_ids) for t in chunk)
        return out

    def exact_gains(self, table: BlockTable, options: list[tuple[int, int]]) -> list[float]:
        """NLL(table) − NLL(table split at each option), every term a full forward."""
        current = self.nll([table])[0]
        return [current - v for v in self.nll([split_block(table, g, p) for g, p in options])]

    def proxy_gains(self, table: BlockTable, options: list[tuple[int, int]]) -> list[float]:
        """The same difference on the window of ``window`` tokens either side of each point."""
        pairs = []
        for g, p in options:
            a, b = max(1, p - self.window), min(len(table.token_ids), p + self.window)
            pairs += [clip(table, a, b), clip(split_block(table, g, p), a, b)]
        values = self.nll(pairs)
        return [values[2 * i] - values[2 * i + 1] for i in range(len(options))]

    def gains(self, table: BlockTable, options: list[tuple[int, int]]) -> list[float | None]:
        """Exact gains of every option, or (more options than ``shortlist``) of the proxy's best ones."""
        if self.shortlist is None or len(options) <= self.shortlist:
            return list(self.exact_gains(table, options))
        proxy = self.proxy_gains(table, options)
        best = sorted(range(len(options)), key=lambda i: -proxy[i])[: self.shortlist]
        out: list[float | None] = [None] * len(options)
        for i, gain in zip(best, self.exact_gains(table, [options[i] for i in best])):
            out[i] = gain
        return out

    # -- the search -----------------------------------------------------------------------------

    def segment(self, table: BlockTable, extra_cost: float = 0.0, max_splits: int = 16,
                max_blocks: int = MAX_BLOCKS) -> Segmentation:
        began, sequences, tokens = time.monotonic(), self.sequences, self.tokens
        with torch.inference_mode():
            new, decisions = greedy_split(table, self.lm.tokenizer, extra_cost=extra_cost, max_splits=max_splits,
                                          gains=self.gains, unit=self.unit, max_blocks=max_blocks)
        return Segmentation(new, decisions, time.monotonic() - began, self.sequences - sequences,
                            self.tokens - tokens)


def clip(table: BlockTable, a: int, b: int) -> BlockTable:
    """The table's sink followed by its tokens [a, b), each block clipped to the window (0 < a < b)."""
    blocks = [Block(0, "sink", "sink", 0, 1, pinned=True)]
    for blk in table.blocks[1:-1]:
        s, e = max(blk.start, a), min(blk.end, b)
        if s < e:
            blocks.append(Block(len(blocks), blk.label, blk.kind, 1 + s - a, 1 + e - a, blk.pinned, blk.evidence))
    resp = table.blocks[-1]
    s, e = max(resp.start, a), min(resp.end, b)
    start = 1 + s - a if s < e else 1 + b - a
    blocks.append(Block(len(blocks), "response", "response", start, max(start, 1 + e - a)))
    out = BlockTable(blocks, [table.token_ids[0], *table.token_ids[a:b]])
    out.validate(len(out.token_ids), len(blocks))
    return out


# --------------------------------------------------------------------------- planted segments (evaluation)


def planted_document(seed: int, segments: int = 3, paragraphs: int = 3) -> tuple[str, list[int]]:
    """A document of ``segments`` topics, ``paragraphs`` paragraphs each (two sentences a paragraph), and
    the character offsets where topics 2… start (the planted boundaries).

    A topic is one domain's rules (``model/data.py:DOMAINS``) or a set of person files; consecutive
    topics differ. Paragraphs are separated by a blank line.
    """
    from localist.model import data as D

    rng = random.Random(f"localist-segments:{seed}")
    topics = [*sorted(D.DOMAINS), "files"]
    chosen: list[str] = []
    for _ in range(segments):
        chosen.append(rng.choice([t for t in topics if not chosen or t != chosen[-1]]))
    text, bounds = "", []
    for k, topic in enumerate(chosen):
        if k:
            bounds.append(len(text))
        for _ in range(paragraphs):
            text += " ".join(_sentence(D, topic, rng) for _ in range(2)) + "\n\n"
    return text.rstrip("\n") + "\n", bounds


def _sentence(D, topic: str, rng: random.Random) -> str:
    label = f"{'D' if topic == 'files' else 'R'}{rng.randint(1, 99)}"
    if topic == "files":
        names = rng.sample(D.FIELDS, 3)
        return D.DOC_TEMPLATES[rng.choice(D.TRAIN_DOC_TEMPLATES)].format(
            id=label, name=f"{rng.choice(D.FIRST)} {rng.choice(D.LAST)}",
            **{f"f{i + 1}": n for i, n in enumerate(names)}, **{f"F{i + 1}": n.capitalize() for i, n in enumerate(names)},
            **{f"v{i + 1}": rng.randint(10, 99) for i in range(3)})
    area, (qty, unit), entities, above, below = D.DOMAINS[topic]
    return D.RULE_TEMPLATES[rng.choice(D.TRAIN_RULE_TEMPLATES)].format(
        id=label, area=area, entity=rng.choice(entities), qty=qty, unit=unit, thr=rng.randint(15, 90),
        above=rng.choice(above), below=rng.choice(below))


def paragraph_starts(text: str) -> list[int]:
    """Character offsets where paragraphs 2… start: the baseline that splits at every paragraph."""
    out, pos = [], text.find("\n\n")
    while pos >= 0:
        start = pos + 2
        while start < len(text) and text[start] == "\n":
            start += 1
        if start < len(text.rstrip()):
            out.append(start)
        pos = text.find("\n\n", start)
    return out


def boundary_f1(predicted: list[int], planted: list[int], tolerance: int = 2) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of predicted boundary offsets; a prediction
    matches an unmatched planted boundary within ``tolerance`` characters (the blank line between)."""
    left, tp = list(planted), 0
    for p in predicted:
        hit = next((b for b in left if abs(b - p) <= tolerance), None)
        if hit is not None:
            left.remove(hit)
            tp += 1
    return tp, len(predicted) - tp, len(left)


def f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def block_offsets(table: BlockTable, tokenizer) -> list[int]:
    """For a prompt that is one text (sink, its blocks, response): the character offsets in that text
    where blocks 2… start, what :func:`boundary_f1` compares with the planted boundaries."""
    return [len(tokenizer.decode(table.token_ids[:b.start], skip_special_tokens=True)) for b in table.blocks[2:-1]]

