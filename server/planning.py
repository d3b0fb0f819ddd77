"""From an OpenAI-shaped request to a :class:`Plan`: block table, dial, target and engine requests, resolved once.

Planning does every check that can fail before anything reaches the engine (blocks, dial, target,
context length, stop strings), so a bad request is a 400 naming its field and nothing is generated
or stored half-way. A request with ``n`` choices becomes ``n`` engine requests, each with its own
localist id, so that each choice's attention statistics can be fetched on their own. A replay plans
a stored request again from its record.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from localist.clients import contract as C
from localist.model.blocks import (
    MAX_BLOCKS, PRESETS, BlockError, BlockTable, LocalistParams, Piece, Span, resolve_rho, split_text,
    table_from_chat, table_from_pieces, table_from_token_spans, with_dial_scope,
)
from localist.server import wire
from localist.server.engine import Engine, EngineRequest, Sampling
from localist.server.exceptions import Conflict, InvalidRequest, UnknownModel

RESERVED_KINDS = ("sink", "response")
# blocks: "auto": (table, spec, max_blocks) → the segmented table and its decisions
Segment = Callable[[BlockTable, C.SegmentationSpec, int], tuple[BlockTable, C.Segmentation]]
MAX_STOP = 4


@dataclass
class Plan:
    """A validated request, ready for the engine."""

    endpoint: str  # chat | completions | replay
    request_id: str
    created: int
    req: C.ChatCompletionRequest | C.CompletionRequest
    table: BlockTable
    rho: list[float]
    preset: str | None
    dial_scope: str  # the scope used: the request's or the model's default (already applied to ``table``)
    target: int | None
    choices: list[EngineRequest]
    cache_salt: str | None
    received: float = field(default_factory=time.time)
    replay_of: str | None = None
    rules: list[C.InjectedRule] = field(default_factory=list)  # the injected rule versions (server/rules.py)
    anchors: list[C.AnchorCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    provenance_differences: list[C.ProvenanceDifference] | None = None  # replay: the record's vs the server's
    segmentation: C.Segmentation | None = None  # blocks: "auto" (server/segmentation.py)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.table.token_ids


# --------------------------------------------------------------------------- blocks


def _check_specs(blocks: list[C.BlockSpec], endpoint: str) -> None:
    seen: dict[str, int] = {}
    for i, b in enumerate(blocks):
        where = f"blocks[{i}]"
        if b.label in seen:
            raise BlockError(f"{where}.label", f"duplicate label {b.label!r} (also blocks[{seen[b.label]}])")
        seen[b.label] = i
        if b.kind in RESERVED_KINDS:
            raise BlockError(f"{where}.kind", f"kind {b.kind!r} is reserved for the server's own blocks")
        is_span = b.start is not None or b.end is not None
        if b.text is not None and (is_span or b.message is not None):
            raise BlockError(where, "give either `text` (a block to place) or `start`/`end` (a span), not both")
        if b.text is None and not is_span:
            raise BlockError(where, "give `text` (a block to place) or `start` and `end` (a span)")
        if b.text is not None and not b.text:
            raise BlockError(f"{where}.text", f"block {b.label!r} is empty")
        if is_span and (b.start is None or b.end is None):
            raise BlockError(f"{where}.{'end' if b.end is None else 'start'}", "a span needs both `start` and `end`")
        if is_span and b.end <= b.start:
            raise BlockError(where, f"span [{b.start}, {b.end}) is empty")
        if endpoint == "chat" and is_span and b.message is None:
            raise BlockError(f"{where}.message", "a span in a chat request names the message holding it")
        if endpoint == "completions" and b.message is not None:
            raise BlockError(f"{where}.message", "completions have no messages: a span is inside the prompt")


def _check_spans(spans: list[tuple[int, C.BlockSpec]], length: int, what: str) -> None:
    """Out of range and overlap, named by the request's own block index."""
    pos, prev = 0, None
    for i, b in sorted(spans, key=lambda item: item[1].start):
        if b.end > length:
            raise BlockError(f"blocks[{i}].end", f"span [{b.start}, {b.end}) falls outside {what} (length {length})")
        if b.start < pos:
            raise BlockError(f"blocks[{i}]", f"span [{b.start}, {b.end}) overlaps blocks[{prev}]")
        pos, prev = b.end, i


def _span(b: C.BlockSpec, shift: int = 0) -> Span:
    return Span(b.start + shift, b.end + shift, b.label, b.kind, b.pinned, b.evidence)


def _placed_text(placed: list[C.BlockSpec]) -> tuple[str, list[Span]]:
    """The placed blocks joined into one text, one line each; each span takes its newline along."""
    text, spans = "", []
    for b in placed:
        start = len(text)
        text += b.text + "\n"
        spans.append(Span(start, len(text), b.label, b.kind, b.pinned, b.evidence))
    return text, spans


def chat_table(engine: Engine, req: C.ChatCompletionRequest, max_blocks: int,
               rule_blocks: list[C.BlockSpec] = ()) -> BlockTable:
    """One block per message; placed blocks (injected rules first) go into one system message before the
    conversation."""
    blocks = req.block_specs()
    _check_specs(blocks, "chat")
    if len(req.messages) + 2 > max_blocks:  # a block per message, the sink and the response, at least
        raise BlockError("messages", f"{len(req.messages)} messages make at least {len(req.messages) + 2} blocks "
                         f"(one per message, the sink, the response), over the limit of {max_blocks}")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
    spans: dict[int, list[Span]] = {}
    by_message: dict[int, list[tuple[int, C.BlockSpec]]] = {}
    for i, b in enumerate(blocks):
        if b.text is None:
            if b.message >= len(messages):
                raise BlockError(f"blocks[{i}].message", f"there are only {len(messages)} messages")
            by_message.setdefault(b.message, []).append((i, b))
    for k, items in by_message.items():
        _check_spans(items, len(messages[k]["content"]), f"messages[{k}].content")
    placed = [*rule_blocks, *(b for b in blocks if b.text is not None)]
    shift = 0
    if placed:
        text, placed_spans = _placed_text(placed)
        messages.insert(0, {"role": "system", "content": text, "name": "blocks"})
        spans[0] = placed_spans
        shift = 1
    for k, items in by_message.items():
        spans[k + shift] = [_span(b) for _, b in items]
    return table_from_chat(engine.tokenizer, messages, spans, add_generation_prompt=True, max_blocks=max_blocks)


def completion_table(engine: Engine, req: C.CompletionRequest, max_blocks: int,
                     rule_blocks: list[C.BlockSpec] = ()) -> BlockTable:
    """Placed blocks (injected rules first) before the prompt, spans inside it; a token-id prompt takes
    token spans."""
    blocks = req.block_specs()
    _check_specs(blocks, "completions")
    if isinstance(req.prompt, list):
        if not req.prompt:
            raise BlockError("prompt", "the prompt is empty")
        vocab = len(engine.tokenizer)
        for j, t in enumerate(req.prompt):
            if not 0 <= t < vocab:
                raise BlockError(f"prompt[{j}]", f"token id {t} outside the vocabulary [0, {vocab})")
        if any(b.text is not None for b in blocks):
            raise BlockError("blocks", "a token-id prompt takes token spans (`start`/`end`), not texts")
        if rule_blocks:
            raise BlockError("rules", "a token-id prompt takes no injected rules (they are texts)")
        _check_spans(list(enumerate(blocks)), len(req.prompt), "the prompt's tokens")
        for i, b in enumerate(blocks):
            if b.start < 1:
                raise BlockError(f"blocks[{i}].start", "token 0 is the sink block; spans start at token 1")
        spans = [[b.start, b.end, b.kind, int(b.pinned), int(b.evidence), b.label] for b in blocks]
        table = table_from_token_spans(spans, len(req.prompt), max_blocks, "blocks")
        table.token_ids = list(req.prompt)
        return table
    if not req.prompt:
        raise BlockError("prompt", "the prompt is empty")
    spans = [(i, b) for i, b in enumerate(blocks) if b.text is None]
    _check_spans(spans, len(req.prompt), "the prompt")
    pieces = [Piece(b.text, b.label, b.kind, b.pinned, b.evidence)
              for b in [*rule_blocks, *blocks] if b.text is not None]
    pieces += split_text(req.prompt, [_span(b) for _, b in spans], "prompt", "user", "blocks")
    return table_from_pieces(engine.tokenizer, pieces, max_blocks=max_blocks)


def resolve_target(table: BlockTable, target: str | int | None) -> int | None:
    if target is None:
        return None
    if isinstance(target, int):
        if not 0 <= target < table.num_blocks:
            raise BlockError("target_block", f"block id {target} does not exist (blocks 0..{table.num_blocks - 1})")
        block = table.blocks[target]
    else:
        matches = [b for b in table.blocks if b.label == target]
        if not matches:
            labels = ", ".join(repr(b.label) for b in table.blocks)
            raise BlockError("target_block", f"unknown block {target!r}; blocks are {labels}")
        block = matches[0]
    if not block.candidate:
        raise BlockError("target_block", f"block {block.label!r} (kind {block.kind}) is not a candidate: "
                         "only rule/document blocks or blocks marked evidence can be pointed to")
    return block.id


# --------------------------------------------------------------------------- plans


def _stop(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP:
        raise InvalidRequest("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
    for i, s in enumerate(stops):
        if not s:
            raise InvalidRequest(f"stop[{i}]", "a stop string must not be empty")
    return stops


def _max_tokens(engine: Engine, req: C.ChatCompletionRequest | C.CompletionRequest, endpoint: str,
                prompt_len: int) -> int:
    """The generation budget: what the request asks (the context's room when it asks nothing)."""
    prompt_field = "messages" if endpoint == "chat" else "prompt"
    if prompt_len >= engine.max_model_len:
        raise InvalidRequest(prompt_field, f"the prompt has {prompt_len} tokens; the context holds "
                             f"{engine.max_model_len}", "context_length_exceeded")
    if endpoint == "chat":
        asked = req.max_completion_tokens or req.max_tokens
        field_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    else:
        asked, field_name = req.max_tokens, "max_tokens"
    room = engine.max_model_len - prompt_len
    if asked is None:
        return room
    if asked > room:
        raise InvalidRequest(field_name, f"{asked} tokens after a prompt of {prompt_len} exceed the context of "
                             f"{engine.max_model_len} (at most {room})", "context_length_exceeded")
    return asked


def _logprobs(req: C.ChatCompletionRequest | C.CompletionRequest, endpoint: str) -> int | None:
    if endpoint != "chat":
        return req.logprobs
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs", "requires logprobs = true")
    return (req.top_logprobs or 0) if req.logprobs else None


def plan(engine: Engine, req: C.ChatCompletionRequest | C.CompletionRequest, endpoint: str,
         default_rho: float = 0.0, max_blocks: int = MAX_BLOCKS, rule_blocks: list[C.BlockSpec] = (),
         segment: Segment | None = None) -> Plan:
    """Validate everything and build the engine requests; raises UnknownModel, BlockError or InvalidRequest.
    ``rule_blocks``: the request's ``rules`` resolved to placed blocks (``localist.server.rules``);
    ``segment``: what splits the table of a ``blocks: "auto"`` request (``localist.server.segmentation``).
    Segmentation sees every block free (dial scope `all`): under scope `evidence` the blocks it could
    split are pinned and every gain would be 0."""
    if req.model != engine.name:
        raise UnknownModel(f"model: the model {req.model!r} does not exist; this server serves {engine.name!r}")
    table = (chat_table(engine, req, max_blocks, rule_blocks) if endpoint == "chat"
             else completion_table(engine, req, max_blocks, rule_blocks))
    segmentation = None
    if req.blocks == "auto":
        if segment is None:
            raise InvalidRequest("blocks", "`auto` segmentation is not available on this path")
        if endpoint == "completions" and isinstance(req.prompt, list):
            raise InvalidRequest("blocks", "`auto` needs a text prompt: a token-id prompt has no sentence ends to split at")
        _max_tokens(engine, req, endpoint, len(table.token_ids))  # a prompt too long is refused before the search
        table, segmentation = segment(table, req.segmentation or C.SegmentationSpec(), max_blocks)
    elif req.segmentation is not None:
        raise InvalidRequest("segmentation", "only with `blocks: \"auto\"`")
    dial_scope = req.dial_scope or engine.default_dial_scope
    table = with_dial_scope(table, dial_scope)
    rho = resolve_rho(req.locality if req.locality is not None else default_rho, engine.num_layers)
    preset = req.locality if isinstance(req.locality, str) and req.locality in PRESETS else None
    target = resolve_target(table, req.target_block)
    max_tokens = _max_tokens(engine, req, endpoint, len(table.token_ids))
    logprobs, stop = _logprobs(req, endpoint), _stop(req.stop)
    sampling = [Sampling(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else req.seed + i,
        stop=stop, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=req.ignore_eos,
    ) for i in range(req.n)]
    request_id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
    out = _plan(engine, endpoint, request_id, req, table, rho, preset, dial_scope, target, sampling)
    out.segmentation = segmentation
    return out


def _plan(engine: Engine, endpoint: str, request_id: str, req, table: BlockTable, rho: list[float],
          preset: str | None, dial_scope: str, target: int | None, sampling: list[Sampling],
          replay_of: str | None = None) -> Plan:
    """One engine request per choice, each carrying its own localist id (its statistics are fetched by it)."""
    params = [LocalistParams(rho, table.to_wire(), f"{request_id}-{i}", target, req.audit) for i in range(len(sampling))]
    choices = [engine.request(p.request_id, s, p) for p, s in zip(params, sampling)]
    return Plan(endpoint, request_id, int(time.time()), req, table, rho, preset, dial_scope, target, choices,
                engine.cache_salt(params[0]), replay_of=replay_of)


def provenance_differences(recorded: C.Provenance | None, served: C.Provenance
                           ) -> list[C.ProvenanceDifference] | None:
    """The provenance fields in which a record and the server differ (None: the record has no provenance).
    ``checkpoint_files`` is left out: ``checkpoint_sha256`` covers it."""
    if recorded is None:
        return None
    names = [name for name in C.Provenance.model_fields if name != "checkpoint_files"]
    return [C.ProvenanceDifference(field=name, recorded=getattr(recorded, name), served=getattr(served, name))
            for name in names if getattr(recorded, name) != getattr(served, name)]


def plan_replay(engine: Engine, record: C.AuditRecord) -> Plan:
    """Re-run a stored request exactly: its prompt token ids, block table, per-layer dial, target and the
    sampling (seeds included) of every choice, in the record's dial scope (its block table holds the pins).
    The provenance fields that differ from the server's are found first and kept on the plan. Refused
    (Conflict, naming those fields too) when the served weights, tokenizer or chat template differ from
    the record's."""
    request, replay = record.request, record.replay
    if request is None or replay is None:
        raise Conflict(f"record {record.id!r} has no replay data (its payload was erased)", "id", "not_replayable")
    differences = provenance_differences(request.provenance, wire.provenance(engine))
    differing = "; provenance differs in " + ", ".join(
        f"{d.field} ({d.recorded} recorded, {d.served} served)" for d in differences) if differences else ""
    for stored, current, what in ((request.weights_hash, engine.weights_sha256, "weights"),
                                  (replay.tokenizer_hash, engine.fingerprint["tokenizer_sha256"], "tokenizer"),
                                  (replay.chat_template_hash, engine.fingerprint["chat_template_sha256"],
                                   "chat template")):
        if stored != current:
            raise Conflict(f"the served model's {what} differ from the record's ({stored[:12]}… vs {current[:12]}…): "
                           f"replay needs the same model{differing}", "id", "model_mismatch")
    table = BlockTable.from_wire(replay.block_spans, replay.prompt_token_ids)
    params = request.params
    sampling = [Sampling(temperature=p.temperature, top_p=p.top_p, presence_penalty=params.presence_penalty,
                         frequency_penalty=params.frequency_penalty, seed=p.seed, stop=p.stop, max_tokens=p.max_tokens,
                         logprobs=params.logprobs, ignore_eos=params.ignore_eos) for p in replay.sampling_params]
    dial_scope = request.dial_scope or "all"  # records written before the field existed all used `all`
    req = C.CompletionRequest(model=engine.name, prompt=list(table.token_ids), n=len(sampling), seed=params.seed,
                              audit=request.audit, max_tokens=sampling[0].max_tokens, dial_scope=dial_scope)
    plan = _plan(engine, "replay", "replay-" + uuid.uuid4().hex, req, table, list(request.rho), request.preset,
                 dial_scope, request.target_block, sampling, replay_of=record.id)
    plan.provenance_differences = differences
    return plan
