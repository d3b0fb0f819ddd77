"""`/v1/chat/completions`, `/v1/completions`, `/v1/models`: OpenAI's surface with the locality extensions.

HTTP only: the request service (``localist.server.service``) plans, runs, measures and stores; this
module takes the caller's limits, watches for a caller that leaves, and writes OpenAI's response
objects and server-sent events. A stream that fails after its status line was sent ends with an
in-band error event and no ``[DONE]``; so does one whose audit record the store could not take (the
final ``localist`` event and ``[DONE]`` come only after the record is durable).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from localist.clients import contract as C
from localist.server import wire
from localist.server.auth import Principal, principal
from localist.server.errors import api_error
from localist.server.exceptions import GenerationFailed
from localist.server.service import GenerationService, Run
from localist.server.store import StoreUnavailable

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS = {code: {"model": C.ErrorResponse} for code in (400, 401, 404, 429, 500)}
GENERATION_ERRORS = ERRORS | {503: {"model": C.ErrorResponse}}  # the engine restarts after a death
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.2


async def caller_gone(request: Request) -> None:
    """Completes when the HTTP caller has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def _service(request: Request) -> GenerationService:
    return request.app.state.service


# --------------------------------------------------------------------------- response objects


def _chat_response(run: Run, service: GenerationService) -> C.ChatCompletionResponse:
    req: C.ChatCompletionRequest = run.plan.req
    top, text_of = req.top_logprobs or 0, service.engine.token_text
    choices = [
        C.ChatChoice(index=c.index, message=C.AssistantMessage(content=c.output.text),
                     logprobs=wire.chat_logprobs(c.output, 0, len(c.output.token_ids), top, text_of)
                     if req.logprobs else None,
                     finish_reason=c.output.finish_reason)
        for c in run.choices
    ]
    return C.ChatCompletionResponse(id=run.plan.request_id, created=run.plan.created, model=service.engine.name,
                                    choices=choices, usage=wire.usage(len(run.plan.prompt_token_ids), run.outputs),
                                    localist=run.result)


def _completion_response(run: Run, service: GenerationService) -> C.CompletionResponse:
    req: C.CompletionRequest = run.plan.req
    text_of = service.engine.token_text
    prefix = service.engine.tokenizer.decode(req.prompt) if isinstance(req.prompt, list) else req.prompt
    choices = []
    for c in run.choices:
        lp = (wire.completion_logprobs(c.output, 0, len(c.output.token_ids), req.logprobs,
                                       len(prefix) if req.echo else 0, text_of)
              if req.logprobs is not None else None)
        choices.append(C.CompletionChoice(index=c.index, text=(prefix if req.echo else "") + c.output.text,
                                          logprobs=lp, finish_reason=c.output.finish_reason))
    return C.CompletionResponse(id=run.plan.request_id, created=run.plan.created, model=service.engine.name,
                                choices=choices, usage=wire.usage(len(run.plan.prompt_token_ids), run.outputs),
                                localist=run.result)


# --------------------------------------------------------------------------- streaming


def _sse(model: C.ChatCompletionChunk | C.CompletionResponse) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def _events(service: GenerationService, run: Run, request: Request, who: Principal) -> AsyncIterator[str]:
    """SSE events: deltas with per-token attribution, then (after the audit write) the final event."""
    plan, req = run.plan, run.plan.req
    chat = plan.endpoint == "chat"
    base = {"id": plan.request_id, "created": plan.created, "model": service.engine.name}
    text_of = service.engine.token_text
    try:
        if chat:
            for c in run.choices:
                yield _sse(C.ChatCompletionChunk(**base, choices=[
                    C.ChatChunkChoice(index=c.index, delta=C.ChatDelta(role="assistant", content=""))]))
        async with contextlib.aclosing(service.stream(run)) as deltas:
            async for d in deltas:
                output = run.choices[d.choice].output
                localist = C.LocalistDelta(tokens=d.tokens) if d.tokens else None
                if chat:
                    lp = wire.chat_logprobs(output, d.start, d.end, req.top_logprobs or 0, text_of) if req.logprobs else None
                    yield _sse(C.ChatCompletionChunk(**base, choices=[C.ChatChunkChoice(
                        index=d.choice, delta=C.ChatDelta(content=d.text), logprobs=lp, finish_reason=d.finish_reason,
                        localist=localist)]))
                else:
                    lp = (wire.completion_logprobs(output, d.start, d.end, req.logprobs, 0, text_of)
                          if req.logprobs is not None else None)
                    yield _sse(C.CompletionResponse(**base, choices=[C.CompletionChoice(
                        index=d.choice, text=d.text, logprobs=lp, finish_reason=d.finish_reason, localist=localist)],
                        usage=None, localist=None))
        usage = (wire.usage(len(plan.prompt_token_ids), run.outputs)
                 if req.stream_options and req.stream_options.include_usage else None)
        final = C.ChatCompletionChunk if chat else C.CompletionResponse
        yield _sse(final(**base, choices=[], usage=usage, localist=run.result))
        yield "data: [DONE]\n\n"
    except (GenerationFailed, StoreUnavailable) as exc:  # the status line is sent: report in-band
        yield f"data: {json.dumps(api_error(exc).body())}\n\n"
    finally:
        request.app.state.limiter.release(who.key)


# --------------------------------------------------------------------------- endpoints


async def _generate(request: Request, who: Principal, req, endpoint: str):
    service = _service(request)
    plan = await request.app.state.rules.plan(req, endpoint, who)  # the request's rules placed first
    await request.app.state.limiter.acquire(who.key)
    run = service.start(plan, who, getattr(request.state, "request_id", None))
    if req.stream:
        return StreamingResponse(_events(service, run, request, who), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        await service.complete(run, caller_gone(request))
    finally:
        request.app.state.limiter.release(who.key)
    return _chat_response(run, service) if endpoint == "chat" else _completion_response(run, service)


@router.post("/chat/completions", response_model=C.ChatCompletionResponse, responses=GENERATION_ERRORS)
async def chat_completions(body: C.ChatCompletionRequest, request: Request, who: Principal = Depends(principal)):
    """Chat completion; with `stream` the events are `ChatCompletionChunk`s, then `data: [DONE]`."""
    return await _generate(request, who, body, "chat")


@router.post("/completions", response_model=C.CompletionResponse, responses=GENERATION_ERRORS)
async def completions(body: C.CompletionRequest, request: Request, who: Principal = Depends(principal)):
    """Text completion of one prompt; with `stream` the events are `CompletionResponse`s, then `data: [DONE]`."""
    return await _generate(request, who, body, "completions")


@router.get("/models", response_model=C.ModelList, responses=ERRORS)
async def models(request: Request, who: Principal = Depends(principal)):
    engine = request.app.state.engine
    return C.ModelList(data=[C.ModelInfo(
        id=engine.name, created=int(engine.model_dir.stat().st_mtime), owned_by="localist",
        num_layers=engine.num_layers, num_heads=engine.num_heads, max_model_len=engine.max_model_len,
        weights_sha256=engine.weights_sha256, stand_in=request.app.state.settings.stand_in,
        dial_scope=engine.default_dial_scope, provenance=wire.provenance(engine))])
