"""Semantic blocks of a sequence (docs/theory.md §1) and the per-request localist parameters.

A :class:`BlockTable` covers the prompt with contiguous labelled token spans: block 0 is the pinned
``sink`` (the first token), the last block is the ``response`` (it holds the chat template's
generation prompt, if any, and every generated token). Each block's text is tokenised on its own and
the pieces concatenated: BPE merges across character boundaries, so mapping character spans onto a
tokenisation of the joined text could not be exact (the result can differ from tokenising the
joined text, by design).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

MAX_BLOCKS = 64
EVIDENCE_KINDS = frozenset({"rule", "document"})
AUDIT_LEVELS = ("summary", "per_token", "per_layer")
PRESETS = {"distributed": 0.0, "balanced": 0.5, "localist": 0.9}
DIAL_SCOPES = ("all", "evidence")  # docs/theory.md §2 "Dial scope"


class BlockError(ValueError):
    """Invalid block layout or localist parameter; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Block:
    id: int
    label: str
    kind: str
    start: int
    end: int
    pinned: bool = False
    evidence: bool = False

    @property
    def candidate(self) -> bool:
        """Whether a pointer may legitimately point here (docs/theory.md §1)."""
        return (self.kind in EVIDENCE_KINDS or self.evidence) and not self.pinned


@dataclass(frozen=True)
class Piece:
    """A text with the block it belongs to, before tokenisation."""

    text: str
    label: str
    kind: str
    pinned: bool = False
    evidence: bool = False


@dataclass
class BlockTable:
    blocks: list[Block]
    token_ids: list[int] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def response_id(self) -> int:
        return self.blocks[-1].id

    def block_ids(self) -> list[int]:
        """Block id of every prompt token."""
        ids: list[int] = []
        for b in self.blocks:
            ids.extend([b.id] * (b.end - b.start))
        return ids

    def pinned(self) -> list[bool]:
        return [b.pinned for b in self.blocks]

    def candidates(self) -> list[bool]:
        return [b.candidate for b in self.blocks]

    def index(self, label: str) -> int:
        for b in self.blocks:
            if b.label == label:
                return b.id
        raise KeyError(label)

    def to_wire(self) -> list[list[Any]]:
        """Compact, JSON-able spans ``[start, end, kind, pinned, evidence, label]``."""
        return [[b.start, b.end, b.kind, int(b.pinned), int(b.evidence), b.label] for b in self.blocks]

    @classmethod
    def from_wire(cls, spans: Sequence[Sequence[Any]], token_ids: Sequence[int] = ()) -> BlockTable:
        blocks = [
            Block(i, str(s[5]) if len(s) > 5 else f"b{i}", str(s[2]), int(s[0]), int(s[1]), bool(s[3]), bool(s[4]))
            for i, s in enumerate(spans)
        ]
        table = cls(blocks, list(token_ids))
        table.validate(len(token_ids) if token_ids else blocks[-1].end if blocks else 0)
        return table

    def validate(self, num_tokens: int, max_blocks: int = MAX_BLOCKS) -> None:
        """Check the invariants every consumer relies on."""
        if not self.blocks:
            raise BlockError("blocks", "a block table needs at least the sink and the response block")
        if len(self.blocks) > max_blocks:
            raise BlockError("blocks", f"{len(self.blocks)} blocks exceed the limit of {max_blocks}")
        if self.blocks[0].kind != "sink" or self.blocks[0].start != 0 or self.blocks[0].end != 1:
            raise BlockError("blocks[0]", "block 0 must be the one-token sink")
        if self.blocks[-1].kind != "response":
            raise BlockError(f"blocks[{len(self.blocks) - 1}]", "the last block must be the response")
        pos = 0
        for i, b in enumerate(self.blocks):
            if b.id != i:
                raise BlockError(f"blocks[{i}].id", f"expected id {i}, got {b.id}")
            if b.start != pos:
                raise BlockError(f"blocks[{i}].start", f"blocks must be contiguous: expected {pos}, got {b.start}")
            if b.end < b.start or (b.end == b.start and b.kind != "response"):
                raise BlockError(f"blocks[{i}]", f"empty block {b.label!r}")
            pos = b.end
        if pos != num_tokens:
            raise BlockError("blocks", f"blocks cover {pos} tokens but the prompt has {num_tokens}")


def with_dial_scope(table: BlockTable, scope: str) -> BlockTable:
    """The table as the dial sees it (docs/theory.md §2 "Dial scope"): ``all`` as built; ``evidence`` pins
    every block that is not a candidate, so the dial only reshuffles the candidates' base mass."""
    if scope not in DIAL_SCOPES:
        raise BlockError("dial_scope", f"must be one of {', '.join(DIAL_SCOPES)}, got {scope!r}")
    if scope == "all":
        return table
    return BlockTable([b if b.candidate else replace(b, pinned=True) for b in table.blocks], table.token_ids)


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _added_tokens(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer itself puts before and after ``text`` when it adds its special tokens."""
    bare = _tokenize(tokenizer, text)
    full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise ValueError(f"the tokenizer changes the tokens of {text[:40]!r} when it adds its special tokens; "
                     "blocks cannot be tokenised one by one with it")


def table_from_pieces(
    tokenizer, pieces: Sequence[Piece], response_text: str = "", max_blocks: int = MAX_BLOCKS,
    add_special_tokens: bool = True,
) -> BlockTable:
    """Tokenise each piece on its own and concatenate; add the sink and the response block.

    With ``add_special_tokens`` the prompt carries exactly the special tokens the tokenizer adds to
    a text by default (a BOS for some tokenizers, nothing for others), as vLLM's completions endpoint
    tokenises a prompt; nothing else is added. The sink is the prompt's own first token.
    """
    before, after = _added_tokens(tokenizer, pieces[0].text) if add_special_tokens and pieces else ([], [])
    token_ids: list[int] = []
    blocks: list[Block] = []
    for k, piece in enumerate(pieces):
        ids = (before if k == 0 else []) + _tokenize(tokenizer, piece.text) + (after if k == len(pieces) - 1 else [])
        if not blocks and ids:
            token_ids.append(ids.pop(0))
            blocks.append(Block(0, "sink", "sink", 0, 1, pinned=True))
        if not ids:
            continue
        start = len(token_ids)
        token_ids.extend(ids)
        blocks.append(Block(len(blocks), piece.label, piece.kind, start, len(token_ids), piece.pinned, piece.evidence))
    if not blocks:
        raise BlockError("messages", "the prompt is empty")
    start = len(token_ids)
    token_ids.extend(_tokenize(tokenizer, response_text) if response_text else [])
    blocks.append(Block(len(blocks), "response", "response", start, len(token_ids)))
    table = BlockTable(blocks, token_ids)
    table.validate(len(token_ids), max_blocks)
    return table


@dataclass(frozen=True)
class Span:
    """A labelled character span [start, end) inside a text (builder (c))."""

    start: int
    end: int
    label: str
    kind: str = "document"
    pinned: bool = False
    evidence: bool = False


def split_text(text: str, spans: Sequence[Span], label: str, kind: str, field_name: str = "spans") -> list[Piece]:
    """Cut ``text`` into pieces at the spans; the text around them stays with (label, kind).

    Text between spans gets its own block (``label.N``) so that every block stays contiguous.
    """
    ordered = sorted(enumerate(spans), key=lambda item: item[1].start)
    pieces: list[Piece] = []
    pos, gap = 0, 0
    for i, span in ordered:
        where = f"{field_name}[{i}]"
        if not (0 <= span.start <= len(text) and 0 <= span.end <= len(text)):
            raise BlockError(where, f"span [{span.start}, {span.end}) falls outside the text (length {len(text)})")
        if span.end <= span.start:
            raise BlockError(where, f"span [{span.start}, {span.end}) is empty")
        if span.start < pos:
            raise BlockError(where, f"span [{span.start}, {span.end}) overlaps the previous span")
        if span.start > pos:
            pieces.append(Piece(text[pos:span.start], label if gap == 0 else f"{label}.{gap}", kind))
            gap += 1
        pieces.append(Piece(text[span.start:span.end], span.label, span.kind, span.pinned, span.evidence))
        pos = span.end
    if pos < len(text):
        pieces.append(Piece(text[pos:], label if gap == 0 else f"{label}.{gap}", kind))
    return pieces


def table_from_texts(tokenizer, texts: Sequence[Piece], max_blocks: int = MAX_BLOCKS) -> BlockTable:
    """Builder (b): an explicit list of labelled texts (rules, documents, the question)."""
    labels = [p.label for p in texts]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise BlockError(f"blocks[{i}].label", f"duplicate label {label!r}")
        if not texts[i].text:
            raise BlockError(f"blocks[{i}].text", f"block {label!r} is empty")
    return table_from_pieces(tokenizer, texts, max_blocks=max_blocks)


def table_from_spans(tokenizer, text: str, spans: Sequence[Span], max_blocks: int = MAX_BLOCKS) -> BlockTable:
    """Builder (c): labelled character spans inside one text; the rest is kind ``text``."""
    return table_from_pieces(tokenizer, split_text(text, spans, "text", "text"), max_blocks=max_blocks)


def table_from_chat(
    tokenizer,
    messages: Sequence[dict[str, Any]],
    spans: dict[int, Sequence[Span]] | None = None,
    add_generation_prompt: bool = True,
    max_blocks: int = MAX_BLOCKS,
) -> BlockTable:
    """Builder (a): one block per chat message, template tokens going to the message they introduce.

    Message k's text is the difference between the template rendered for messages[:k+1] and for
    messages[:k]; the generation prompt is the response block's. ``spans`` maps a message index to
    character spans inside that message's content (rules and documents placed in it).
    """
    spans = spans or {}
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        list(msgs), tokenize=False, add_generation_prompt=gen
    )
    pieces: list[Piece] = []
    previous = ""
    for k, message in enumerate(messages):
        current = render(messages[: k + 1])
        if not current.startswith(previous):
            raise BlockError(f"messages[{k}]", "the chat template does not render messages as a growing prefix")
        segment = current[len(previous):]
        role = str(message.get("role", "user"))
        label = str(message.get("name") or f"{role}-{k}")
        content = message.get("content") or ""
        if k in spans:
            offset = segment.find(content) if content else -1
            if offset < 0:
                raise BlockError(f"messages[{k}].content", "content not found verbatim in the rendered template")
            shifted = [replace(s, start=s.start + offset, end=s.end + offset) for s in spans[k]]
            for i, s in enumerate(spans[k]):
                if not (0 <= s.start and s.end <= len(content)):
                    raise BlockError(f"messages[{k}].spans[{i}]", f"span [{s.start}, {s.end}) falls outside the content")
            pieces.extend(split_text(segment, shifted, label, role, f"messages[{k}].spans"))
        else:
            pieces.append(Piece(segment, label, role))
        previous = current
    response_text = render(messages, True)[len(previous):] if add_generation_prompt else ""
    return table_from_pieces(tokenizer, pieces, response_text, max_blocks, add_special_tokens=False)


def table_from_token_spans(spans: Sequence[Sequence[Any]], num_tokens: int, max_blocks: int = MAX_BLOCKS,
                           field_name: str = "localist.blocks") -> BlockTable:
    """A table over a prompt of ``num_tokens`` tokens from bare token spans ``[start, end, kind?, pinned?,
    evidence?, label?]``: the sink is added, gaps become ``text`` blocks and the response block closes it."""
    blocks = [Block(0, "sink", "sink", 0, 1, pinned=True)]
    pos = 1
    for i, s in enumerate(sorted(spans, key=lambda s: int(s[0]))):
        start, end = int(s[0]), int(s[1])
        where = f"{field_name}[{i}]"
        if start < 1 or end > num_tokens:
            raise BlockError(where, f"span [{start}, {end}) falls outside tokens [1, {num_tokens})")
        if end <= start:
            raise BlockError(where, f"span [{start}, {end}) is empty")
        if start < pos:
            raise BlockError(where, f"span [{start}, {end}) overlaps the previous span")
        if start > pos:
            blocks.append(Block(len(blocks), f"text-{len(blocks)}", "text", pos, start))
        kind = str(s[2]) if len(s) > 2 else "document"
        label = str(s[5]) if len(s) > 5 else f"{kind}-{len(blocks)}"
        pinned = bool(s[3]) if len(s) > 3 else False
        evidence = bool(s[4]) if len(s) > 4 else False
        blocks.append(Block(len(blocks), label, kind, start, end, pinned, evidence))
        pos = end
    if pos < num_tokens:
        blocks.append(Block(len(blocks), f"text-{len(blocks)}", "text", pos, num_tokens))
    blocks.append(Block(len(blocks), "response", "response", num_tokens, num_tokens))
    table = BlockTable(blocks)
    table.validate(num_tokens, max_blocks)
    return table


def resolve_rho(locality: Any, num_layers: int, field_name: str = "locality") -> list[float]:
    """The dial for every layer from a number, a per-layer list or a preset name (docs/theory.md §8)."""
    if locality is None:
        return [0.0] * num_layers
    if isinstance(locality, str):
        if locality not in PRESETS:
            raise BlockError(field_name, f"unknown preset {locality!r}; choose one of {sorted(PRESETS)}")
        return [PRESETS[locality]] * num_layers
    values = locality if isinstance(locality, (list, tuple)) else [locality]
    if isinstance(locality, (list, tuple)) and len(values) != num_layers:
        raise BlockError(field_name, f"per-layer dial needs {num_layers} values (one per layer), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        where = f"{field_name}[{i}]" if isinstance(locality, (list, tuple)) else field_name
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BlockError(where, f"must be a number in [0, 1], got {v!r}")
        if not 0.0 <= float(v) <= 1.0:  # also rejects NaN
            raise BlockError(where, f"must lie in [0, 1], got {v!r}")
        out.append(float(v))
    return out * num_layers if not isinstance(locality, (list, tuple)) else out


@dataclass
class LocalistParams:
    """What one request tells the engine: its dial, its blocks, its target and audit level.

    ``to_json()`` is the string carried in ``SamplingParams.extra_args["localist"]`` (and, under plain
    ``vllm serve``, in ``vllm_xargs``): vLLM's channel for per-request data takes no nested objects.
    """

    rho: list[float]
    blocks: list[list[Any]]
    request_id: str
    target: int | None = None
    audit: str = "summary"

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.request_id, "rho": self.rho, "blocks": self.blocks, "target": self.target, "audit": self.audit},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, num_layers: int) -> LocalistParams:
        try:
            raw = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise BlockError("localist", f"not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise BlockError("localist", "must be a JSON object")
        rho = resolve_rho(raw.get("rho"), num_layers, "localist.rho")
        blocks = raw.get("blocks") or []
        if not isinstance(blocks, list) or not all(isinstance(s, list) and len(s) >= 2 for s in blocks):
            raise BlockError("localist.blocks", "must be a list of [start, end, kind?, pinned?, evidence?, label?]")
        audit = raw.get("audit") or "summary"
        if audit not in AUDIT_LEVELS:
            raise BlockError("localist.audit", f"must be one of {list(AUDIT_LEVELS)}")
        target = raw.get("target")
        if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
            raise BlockError("localist.target", "must be a block index")
        return cls(rho, blocks, str(raw.get("id") or ""), target, audit)

    def table(self, num_tokens: int, max_blocks: int = MAX_BLOCKS) -> BlockTable:
        """Resolve the spans against a prompt of ``num_tokens`` tokens.

        A full table (sink first, response last) is taken as is; bare token spans (plain
        ``vllm serve``) are completed: the sink is added, gaps become ``text`` blocks and the rest
        of the prompt up to the end goes to the response block only if it is not covered.
        """
        spans = self.blocks
        if spans and len(spans[0]) > 2 and spans[0][2] == "sink":
            table = BlockTable.from_wire(spans)
            table.validate(num_tokens, max_blocks)
            self._check_target(table)
            return table
        return self._complete(num_tokens, max_blocks)

    def _complete(self, num_tokens: int, max_blocks: int) -> BlockTable:
        table = table_from_token_spans(self.blocks, num_tokens, max_blocks)
        self._check_target(table)
        return table

    def _check_target(self, table: BlockTable) -> None:
        if self.target is not None and not (0 <= self.target < table.num_blocks and table.blocks[self.target].candidate):
            raise BlockError("localist.target", f"block {self.target} is not a candidate block of this request")
