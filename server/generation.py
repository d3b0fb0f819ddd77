"""From an OpenAI-shaped request to engine inputs, and from engine outputs back to the wire.

Preparation does every check that can fail before anything reaches the engine (blocks, dial,
target, context length), so a bad request is a 400 naming its field and nothing is generated or
stored half-way. A request with ``n`` choices becomes ``n`` engine requests, each with its own
localist id, so that each choice's attention statistics can be fetched on their own.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from vllm import SamplingParams

from localist.model.blocks import (
    MAX_BLOCKS, PRESETS, BlockError, BlockTable, LocalistParams, Piece, Span, resolve_rho, split_text,
    table_from_chat, table_from_pieces,
)
from localist.model.vllm_engine import cache_salt
from localist.server import schemas as S
from localist.server.engine import Engine
from localist.server.errors import ApiError

RESERVED_KINDS = ("sink", "response")
MAX_STOP = 4


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    endpoint: str
    request_id: str
    created: int
    req: S.ChatCompletionRequest | S.CompletionRequest
    table: BlockTable
    rho: list[float]
    preset: str | None
    target: int | None
    choices: list[tuple[str, SamplingParams]]  # (engine request id, params) per choice
    cache_salt: str | None
    received: float = field(default_factory=time.time)
    replay_of: str | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.table.token_ids


@dataclass
class ChoiceState:
    """What one choice has produced so far (vLLM outputs are cumulative)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    sent_tokens: int = 0
    sent_chars: int = 0
    finish_sent: bool = False

    def update(self, completion) -> None:
        self.token_ids = list(completion.token_ids)
        self.text = completion.text
        self.logprobs = list(completion.logprobs or [])
        self.finish_reason = completion.finish_reason


# --------------------------------------------------------------------------- blocks


def _content(message: S.ChatMessage) -> str:
    return message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)


def _check_specs(blocks: list[S.BlockSpec], endpoint: str) -> None:
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


def _check_spans(spans: list[tuple[int, S.BlockSpec]], length: int, what: str) -> None:
    """Out of range and overlap, named by the request's own block index."""
    pos, prev = 0, None
    for i, b in sorted(spans, key=lambda item: item[1].start):
        if b.end > length:
            raise BlockError(f"blocks[{i}].end", f"span [{b.start}, {b.end}) falls outside {what} (length {length})")
        if b.start < pos:
            raise BlockError(f"blocks[{i}]", f"span [{b.start}, {b.end}) overlaps blocks[{prev}]")
        pos, prev = b.end, i


def _span(b: S.BlockSpec, shift: int = 0) -> Span:
    return Span(b.start + shift, b.end + shift, b.label, b.kind, b.pinned, b.evidence)


def _placed_text(placed: list[S.BlockSpec]) -> tuple[str, list[Span]]:
    """The placed blocks joined into one text, one line each; each span takes its newline along."""
    text, spans = "", []
    for b in placed:
        start = len(text)
        text += b.text + "\n"
        spans.append(Span(start, len(text), b.label, b.kind, b.pinned, b.evidence))
    return text, spans


def chat_table(engine: Engine, req: S.ChatCompletionRequest, max_blocks: int) -> BlockTable:
    """One block per message; placed blocks go into one system message before the conversation."""
    blocks = req.blocks or []
    _check_specs(blocks, "chat")
    messages = [{"role": m.role, "content": _content(m), **({"name": m.name} if m.name else {})} for m in req.messages]
    spans: dict[int, list[Span]] = {}
    by_message: dict[int, list[tuple[int, S.BlockSpec]]] = {}
    for i, b in enumerate(blocks):
        if b.text is None:
            if b.message >= len(messages):
                raise BlockError(f"blocks[{i}].message", f"there are only {len(messages)} messages")
            by_message.setdefault(b.message, []).append((i, b))
    for k, items in by_message.items():
        _check_spans(items, len(messages[k]["content"]), f"messages[{k}].content")
    placed = [b for b in blocks if b.text is not None]
    shift = 0
    if placed:
        text, placed_spans = _placed_text(placed)
        messages.insert(0, {"role": "system", "content": text, "name": "blocks"})
        spans[0] = placed_spans
        shift = 1
    for k, items in by_message.items():
        spans[k + shift] = [_span(b) for _, b in items]
    return table_from_chat(engine.tokenizer, messages, spans, add_generation_prompt=True, max_blocks=max_blocks)


def completion_table(engine: Engine, req: S.CompletionRequest, max_blocks: int) -> BlockTable:
    """Placed blocks before the prompt, spans inside it; a token-id prompt takes token spans."""
    blocks = req.blocks or []
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
        _check_spans(list(enumerate(blocks)), len(req.prompt), "the prompt's tokens")
        for i, b in enumerate(blocks):
            if b.start < 1:
                raise BlockError(f"blocks[{i}].start", "token 0 is the sink block; spans start at token 1")
        wire = [[b.start, b.end, b.kind, int(b.pinned), int(b.evidence), b.label] for b in blocks]
        table = LocalistParams([0.0], wire, "").table(len(req.prompt), max_blocks)
        table.token_ids = list(req.prompt)
        return table
    if not req.prompt:
        raise BlockError("prompt", "the prompt is empty")
    spans = [(i, b) for i, b in enumerate(blocks) if b.text is None]
    _check_spans(spans, len(req.prompt), "the prompt")
    pieces = [Piece(b.text, b.label, b.kind, b.pinned, b.evidence) for b in blocks if b.text is not None]
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


# --------------------------------------------------------------------------- preparation


def _stop(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", "stop", "invalid_value")
    for i, s in enumerate(stops):
        if not s:
            raise ApiError(400, f"stop[{i}]: a stop string must not be empty", f"stop[{i}]", "invalid_value")
    return stops


def prepare(engine: Engine, req: S.ChatCompletionRequest | S.CompletionRequest, endpoint: str,
            default_rho: float = 0.0, max_blocks: int = MAX_BLOCKS) -> Prepared:
    """Validate everything and build the engine requests; raises ApiError/BlockError (→ 400/404)."""
    if req.model != engine.name:
        raise ApiError(404, f"model: the model {req.model!r} does not exist; this server serves {engine.name!r}",
                       "model", "model_not_found")
    table = chat_table(engine, req, max_blocks) if endpoint == "chat" else completion_table(engine, req, max_blocks)
    locality = req.locality if req.locality is not None else default_rho
    rho = resolve_rho(locality, engine.num_layers)
    preset = req.locality if isinstance(req.locality, str) and req.locality in PRESETS else None
    target = resolve_target(table, req.target_block)

    prompt_len = len(table.token_ids)
    prompt_field = "messages" if endpoint == "chat" else "prompt"
    if prompt_len >= engine.max_model_len:
        raise ApiError(400, f"{prompt_field}: the prompt has {prompt_len} tokens; the context holds "
                       f"{engine.max_model_len}", prompt_field, "context_length_exceeded")
    if endpoint == "chat":
        max_tokens = req.max_completion_tokens or req.max_tokens
        max_field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    else:
        max_tokens, max_field = req.max_tokens, "max_tokens"
    room = engine.max_model_len - prompt_len
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise ApiError(400, f"{max_field}: {max_tokens} tokens after a prompt of {prompt_len} exceed the context "
                       f"of {engine.max_model_len} (at most {room})", max_field, "context_length_exceeded")
    if endpoint == "chat":
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: requires logprobs = true", "top_logprobs", "invalid_value")
    else:
        logprobs = req.logprobs
    stop = _stop(req.stop)

    sampling = [dict(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else req.seed + i,
        stop=stop, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=req.ignore_eos,
    ) for i in range(req.n)]
    request_id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
    return _prepared(endpoint, request_id, req, table, rho, preset, target, sampling)


def _prepared(endpoint: str, request_id: str, req, table: BlockTable, rho: list[float], preset: str | None,
              target: int | None, sampling: list[dict[str, Any]], replay_of: str | None = None) -> Prepared:
    """One engine request per choice, each carrying its own localist id (its statistics are fetched by it)."""
    choices, params = [], []
    for i, kwargs in enumerate(sampling):
        engine_id = f"{request_id}-{i}"
        lp = LocalistParams(rho, table.to_wire(), engine_id, target, req.audit)
        params.append(lp)
        choices.append((engine_id, SamplingParams(n=1, extra_args={"localist": lp.to_json()}, **kwargs)))
    return Prepared(endpoint, request_id, int(time.time()), req, table, rho, preset, target, choices,
                    cache_salt(params[0]), replay_of=replay_of)


def prepare_replay(engine: Engine, record: dict[str, Any]) -> Prepared:
    """Re-run a stored request exactly: its prompt token ids, block table, per-layer dial, target and the
    sampling parameters (seeds included) of every choice. Refuses (409) when the served weights, tokenizer
    or chat template differ from the record's."""
    request, replay = record.get("request"), record.get("replay")
    if request is None or replay is None:
        raise ApiError(409, f"record {record['id']!r} has no replay data (its payload was erased)", "id",
                       "not_replayable")
    for stored, current, what in ((request.get("weights_hash"), engine.weights_sha256, "weights"),
                                  (replay.get("tokenizer_hash"), engine.fingerprint["tokenizer_sha256"], "tokenizer"),
                                  (replay.get("chat_template_hash"), engine.fingerprint["chat_template_sha256"],
                                   "chat template")):
        if stored != current:
            raise ApiError(409, f"the served model's {what} differ from the record's ({str(stored)[:12]}… vs "
                           f"{current[:12]}…): replay needs the same model", "id", "model_mismatch")
    table = BlockTable.from_wire(replay["block_spans"], replay["prompt_token_ids"])
    params = request.get("params") or {}
    sampling = [dict(temperature=p["temperature"], top_p=p["top_p"], seed=p["seed"], stop=p["stop"],
                     max_tokens=p["max_tokens"], presence_penalty=params.get("presence_penalty", 0.0),
                     frequency_penalty=params.get("frequency_penalty", 0.0), logprobs=params.get("logprobs"),
                     ignore_eos=params.get("ignore_eos", False)) for p in replay["sampling_params"]]
    req = S.CompletionRequest(model=engine.name, prompt=list(table.token_ids), n=len(sampling),
                              seed=request["params"].get("seed"), audit=request.get("audit", "summary"),
                              max_tokens=sampling[0]["max_tokens"])
    request_id = "replay-" + uuid.uuid4().hex
    return _prepared("replay", request_id, req, table, list(request["rho"]), request.get("preset"),
                     request.get("target_block"), sampling, replay_of=record["id"])


# --------------------------------------------------------------------------- outputs


def usage(prep: Prepared, states: list[ChoiceState]) -> S.Usage:
    prompt = len(prep.prompt_token_ids)
    completion = sum(len(s.token_ids) for s in states)
    return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _decoded(engine: Engine, token_id: int, lp) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else engine.tokenizer.decode([token_id])


def chat_logprobs(engine: Engine, state: ChoiceState, start: int, end: int, top: int) -> S.ChatLogprobs:
    content = []
    for pos in range(start, end):
        tid = state.token_ids[pos]
        entry = state.logprobs[pos]
        chosen = entry.get(tid)
        tops = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        tok = _decoded(engine, tid, chosen)
        content.append(S.TokenLogprob(
            token=tok, logprob=chosen.logprob if chosen else float("-inf"), bytes=_token_bytes(tok),
            top_logprobs=[S.TopLogprob(token=_decoded(engine, t, lp), logprob=lp.logprob,
                                       bytes=_token_bytes(_decoded(engine, t, lp))) for t, lp in tops[:top]],
        ))
    return S.ChatLogprobs(content=content)


def completion_logprobs(engine: Engine, state: ChoiceState, start: int, end: int, top: int,
                        offset: int) -> S.CompletionLogprobs:
    tokens, token_lps, tops, offsets = [], [], [], []
    for pos in range(start, end):
        tid = state.token_ids[pos]
        entry = state.logprobs[pos]
        chosen = entry.get(tid)
        tok = _decoded(engine, tid, chosen)
        tokens.append(tok)
        token_lps.append(chosen.logprob if chosen else None)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)[:top]
        tops.append({_decoded(engine, t, lp): lp.logprob for t, lp in ranked})
        offsets.append(offset)
        offset += len(tok)
    return S.CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops if top else None,
                                text_offset=offsets)


def blocks_info(table: BlockTable) -> list[S.BlockInfo]:
    return [S.BlockInfo(**b.to_dict()) for b in table.blocks]
