"""`/v1/chat/completions`, `/v1/completions`, `/v1/models`: OpenAI's surface with the locality extensions.

Lifecycle of a generation: prepare (all 400s happen here, nothing is stored) → engine → statistics
and metrics → audit record written (awaited: an acknowledged response is durable) → response. A
client that disconnects cancels the engine requests (vLLM aborts them) and the request is stored as
``aborted``. A failure is stored as ``failed`` with its error and answered with that error (streaming:
an in-band error event and no ``[DONE]``): 500 when the generation failed (e.g. the localist attention
raised in the worker), 503 with Retry-After when the engine died under it (a new one is starting).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from localist.server import schemas as S
from localist.server.auth import Principal, principal
from localist.server.engine import EngineUnavailable
from localist.server.errors import ApiError
from localist.server.generation import (
    ChoiceState, Prepared, blocks_info, chat_logprobs, completion_logprobs, prepare, usage,
)
from localist.server.localist_metrics import ChoiceStats, choice_metrics, stream_tokens

log = logging.getLogger("localist.server")
router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS = {code: {"model": S.ErrorResponse} for code in (400, 401, 404, 429, 500)}
GENERATION_ERRORS = ERRORS | {503: {"model": S.ErrorResponse}}  # the engine restarts after a death
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.2


class Aborted(Exception):
    """The client went away before the response was complete."""


def failure(exc: Exception, record_id: str) -> ApiError:
    """The answer to a generation that failed with ``exc`` (already stored as record ``record_id``)."""
    stored = f" (stored as audit record {record_id})"
    if isinstance(exc, EngineUnavailable):
        return ApiError.from_engine_unavailable(exc, stored)
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}{stored}", None, "generation_failed")


# --------------------------------------------------------------------------- the run of one request


class Run:
    """One accepted request: its engine requests, outputs, metrics and audit record."""

    def __init__(self, request: Request, who: Principal, prep: Prepared):
        self.request, self.who, self.prep = request, who, prep
        self.app: FastAPI = request.app
        self.engine = self.app.state.engine
        self.states = [ChoiceState(i) for i in range(len(prep.choices))]
        self.stats = [ChoiceStats(engine_id) for engine_id, _ in prep.choices]
        self.first_token_at: float | None = None
        self.result: S.LocalistResult | None = None
        self.stored_as: str | None = None  # set before the write starts: one record per request, ever

    async def choice_outputs(self, i: int) -> AsyncIterator[int]:
        """Drive choice ``i`` through the engine; yields after each new output."""
        engine_id, params = self.prep.choices[i]
        async for out in self.engine.generate(self.prep.prompt_token_ids, params, engine_id, self.prep.cache_salt):
            if self.first_token_at is None and out.outputs[0].token_ids:
                self.first_token_at = time.time()
            self.states[i].update(out.outputs[0])
            yield i

    async def finish_metrics(self) -> S.LocalistResult:
        metrics = [await choice_metrics(self.engine, self.prep, s, self.stats[i]) for i, s in enumerate(self.states)]
        self.result = S.LocalistResult(
            audit_id=self.prep.request_id, audit=self.prep.req.audit,
            locality=S.Dial(rho=self.prep.rho, preset=self.prep.preset),
            blocks=blocks_info(self.prep.table), choices=metrics,
        )
        return self.result

    async def release_stats(self) -> None:
        """Free the worker's statistics of every choice (also after an abort or a failure: one choice's
        error does not keep the others' records); raises the first error."""
        results = await asyncio.gather(*(s.release(self.engine) for s in self.stats), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def record(self, status: str, error: str | None = None) -> dict[str, Any]:
        """The audit record (server/store/records.py documents the fields)."""
        prep, req, engine = self.prep, self.prep.req, self.engine
        fidelity = None
        if self.result is not None and self.result.choices:
            fidelity = self.result.choices[0].pointer_fidelity
        params = prep.choices[0][1]
        return {
            "id": prep.request_id,
            "tenant": self.who.tenant,
            "status": status,
            "error": error,
            "request": {
                "model": engine.name,
                "weights_hash": engine.weights_sha256,
                "endpoint": prep.endpoint,
                "http_request_id": getattr(self.request.state, "request_id", None),
                "replay_of": prep.replay_of,
                "key_id": self.who.key_id,
                "rho": prep.rho,
                "preset": prep.preset,
                "blocks": [b.model_dump() for b in blocks_info(prep.table)],
                "target_block": prep.target,
                "audit": req.audit,
                "params": {
                    "n": req.n, "temperature": params.temperature, "top_p": params.top_p, "seed": req.seed,
                    "max_tokens": params.max_tokens, "stop": params.stop, "logprobs": params.logprobs,
                    "ignore_eos": params.ignore_eos,
                    "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
                },
                "body": req.model_dump(mode="json", exclude_none=True),
            },
            "output": {
                "choices": [{"index": s.index, "text": s.text, "token_ids": s.token_ids,
                             "finish_reason": s.finish_reason} for s in self.states],
                "usage": usage(prep, self.states).model_dump(),
            },
            "metrics": {"fidelity": fidelity,
                        "localist": self.result.model_dump(mode="json") if self.result is not None else None},
            "timestamps": {"received": prep.received, "first_token": self.first_token_at, "finished": time.time()},
            "replay": {
                "prompt_token_ids": prep.prompt_token_ids,
                "block_spans": prep.table.to_wire(),
                "seed": req.seed,
                "choice_seeds": [p.seed for _, p in prep.choices],
                "engine_request_ids": [eid for eid, _ in prep.choices],
                "sampling_params": [{"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens,
                                     "stop": p.stop, "seed": p.seed} for _, p in prep.choices],
                "localist_params": [p.extra_args["localist"] for _, p in prep.choices],
                "cache_salt": prep.cache_salt,
                "tokenizer_hash": engine.fingerprint["tokenizer_sha256"],
                "chat_template_hash": engine.fingerprint["chat_template_sha256"],
                "versions": engine.versions,
            },
        }

    async def store(self, status: str, error: str | None = None):
        """Durable write through the store's writer thread (never blocks the event loop). A write that
        started is finished by the writer even if this task is cancelled, so a later abort is not stored
        twice."""
        if self.stored_as is not None:
            return None
        self.stored_as = status
        receipt = await self.app.state.store.arecord(self.record(status, error))
        m = self.app.state.metrics
        m.requests.labels(self.prep.endpoint, status).inc()
        m.tokens.labels("prompt").inc(len(self.prep.prompt_token_ids))
        m.tokens.labels("completion").inc(sum(len(s.token_ids) for s in self.states))
        m.latency.labels(self.prep.endpoint).observe(time.time() - self.prep.received)
        m.dial.observe(sum(self.prep.rho) / len(self.prep.rho))
        if self.result is not None and self.result.choices and self.result.choices[0].pointer_fidelity is not None:
            m.fidelity.observe(self.result.choices[0].pointer_fidelity)
        return receipt

    def store_in_background(self, status: str, error: str | None = None) -> asyncio.Task:
        """Release the statistics and store the record in a task of its own: the write outlives a cancelled
        handler (await it through ``asyncio.shield`` to answer only once the record is durable)."""
        async def write():
            try:
                await self.release_stats()
            except Exception as exc:  # noqa: BLE001 — the record matters more than the statistics
                log.warning("releasing statistics of %s failed: %s: %s", self.prep.request_id, type(exc).__name__, exc)
            try:
                await self.store(status, error)
            except Exception:  # noqa: BLE001 — nobody awaits this task: say it loudly
                log.exception("storing the %s record of %s failed", status, self.prep.request_id)

        task = asyncio.get_running_loop().create_task(write())
        self.app.state.background.add(task)
        task.add_done_callback(self.app.state.background.discard)
        return task


async def drain(app: FastAPI) -> None:
    """At shutdown: let pending audit writes finish."""
    if app.state.background:
        await asyncio.gather(*app.state.background, return_exceptions=True)


async def _merged(run: Run) -> AsyncIterator[int]:
    """Outputs of all choices as they come, as choice indices; cancelling cancels every choice."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int):
        try:
            async for _ in run.choice_outputs(i):
                await queue.put(i)
        except BaseException as exc:  # noqa: BLE001 — re-raised in the consumer
            await queue.put(exc)
            return
        await queue.put(done)

    tasks = [asyncio.create_task(pump(i)) for i in range(len(run.states))]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


# --------------------------------------------------------------------------- non-streaming


async def _complete(run: Run) -> None:
    async for _ in _merged(run):
        pass
    await run.finish_metrics()
    await run.release_stats()


async def run_to_end(run: Run) -> None:
    """Generate everything unless the client leaves first (then abort and store as aborted)."""
    work = asyncio.create_task(_complete(run))
    watch = asyncio.create_task(_until_disconnected(run.request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        run.store_in_background("aborted", "the server cancelled the request")
        raise
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        run.store_in_background("aborted", "the client disconnected")
        raise Aborted()
    exc = work.exception()
    if exc is not None:
        log.error("generation %s failed: %s: %s", run.prep.request_id, type(exc).__name__, exc)
        await asyncio.shield(run.store_in_background("failed", f"{type(exc).__name__}: {exc}"))
        raise failure(exc, run.prep.request_id)
    await run.store("completed")


def _chat_response(run: Run) -> S.ChatCompletionResponse:
    req: S.ChatCompletionRequest = run.prep.req
    top = req.top_logprobs or 0
    choices = [
        S.ChatChoice(
            index=s.index, message=S.AssistantMessage(content=s.text),
            logprobs=chat_logprobs(run.engine, s, 0, len(s.token_ids), top) if req.logprobs else None,
            finish_reason=s.finish_reason,
        ) for s in run.states
    ]
    return S.ChatCompletionResponse(id=run.prep.request_id, created=run.prep.created, model=run.engine.name,
                                    choices=choices, usage=usage(run.prep, run.states), localist=run.result)


def _completion_response(run: Run) -> S.CompletionResponse:
    req: S.CompletionRequest = run.prep.req
    prefix = run.engine.tokenizer.decode(req.prompt) if isinstance(req.prompt, list) else req.prompt
    choices = []
    for s in run.states:
        lp = (completion_logprobs(run.engine, s, 0, len(s.token_ids), req.logprobs, len(prefix) if req.echo else 0)
              if req.logprobs is not None else None)
        choices.append(S.CompletionChoice(index=s.index, text=(prefix if req.echo else "") + s.text,
                                          logprobs=lp, finish_reason=s.finish_reason))
    return S.CompletionResponse(id=run.prep.request_id, created=run.prep.created, model=run.engine.name,
                                choices=choices, usage=usage(run.prep, run.states), localist=run.result)


# --------------------------------------------------------------------------- streaming


def _sse(model: S.ChatCompletionChunk | S.CompletionResponse) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def _stream(run: Run, endpoint: str) -> AsyncIterator[str]:
    """SSE events: deltas with per-token attribution, then (after the audit write) the final event."""
    app, prep, req = run.app, run.prep, run.prep.req
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": prep.request_id, "created": prep.created, "model": run.engine.name}
    completed = False
    try:
        if endpoint == "chat":
            for s in run.states:
                yield _sse(S.ChatCompletionChunk(**base, choices=[
                    S.ChatChunkChoice(index=s.index, delta=S.ChatDelta(role="assistant", content=""))]))
        async for i in _merged(run):
            s = run.states[i]
            # the choice's pump keeps updating s while this awaits: take one consistent snapshot now
            start, end, finish = s.sent_tokens, len(s.token_ids), s.finish_reason
            token_ids, text = list(s.token_ids), s.text[s.sent_chars:]
            if end == start and not text and (finish is None or s.finish_sent):
                continue
            s.sent_tokens, s.sent_chars, s.finish_sent = end, s.sent_chars + len(text), finish is not None
            tokens = await stream_tokens(run.engine, prep, token_ids, run.stats[i], start, end)
            delta = S.LocalistDelta(tokens=tokens) if tokens else None
            if endpoint == "chat":
                lp = chat_logprobs(run.engine, s, start, end, req.top_logprobs or 0) if req.logprobs else None
                yield _sse(S.ChatCompletionChunk(**base, choices=[S.ChatChunkChoice(
                    index=i, delta=S.ChatDelta(content=text), logprobs=lp, finish_reason=finish,
                    localist=delta)]))
            else:
                lp = (completion_logprobs(run.engine, s, start, end, req.logprobs, 0)
                      if req.logprobs is not None else None)
                yield _sse(S.CompletionResponse(**base, choices=[S.CompletionChoice(
                    index=i, text=text, logprobs=lp, finish_reason=finish, localist=delta)],
                    usage=None, localist=None))
        await run.finish_metrics()
        await run.release_stats()
        await run.store("completed")
        completed = True
        final_usage = usage(prep, run.states) if include_usage else None
        if endpoint == "chat":
            yield _sse(S.ChatCompletionChunk(**base, choices=[], usage=final_usage, localist=run.result))
        else:
            yield _sse(S.CompletionResponse(**base, choices=[], usage=final_usage, localist=run.result))
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        if not completed:
            run.store_in_background("aborted", "the client disconnected")
        raise
    except Exception as exc:  # the status line is sent: report in-band, store as failed
        if completed:
            raise
        log.error("generation %s failed while streaming: %s: %s", prep.request_id, type(exc).__name__, exc)
        await asyncio.shield(run.store_in_background("failed", f"{type(exc).__name__}: {exc}"))
        yield f"data: {json.dumps(failure(exc, prep.request_id).body())}\n\n"
    finally:
        app.state.limiter.release(run.who.key)


# --------------------------------------------------------------------------- endpoints


async def _generate(request: Request, who: Principal, req, endpoint: str):
    app = request.app
    settings = app.state.settings
    prep = prepare(app.state.engine, req, endpoint, settings.default_rho, settings.max_blocks)
    app.state.engine.ensure_serving()  # while the engine restarts: 503 + Retry-After, nothing stored
    await app.state.limiter.acquire(who.key)
    run = Run(request, who, prep)
    if req.stream:
        return StreamingResponse(_stream(run, endpoint), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        await run_to_end(run)
    except Aborted:
        return JSONResponse(ApiError(499, "client disconnected", None, "client_disconnected").body(), 499)
    finally:
        app.state.limiter.release(who.key)
    return _chat_response(run) if endpoint == "chat" else _completion_response(run)


@router.post("/chat/completions", response_model=S.ChatCompletionResponse, responses=GENERATION_ERRORS)
async def chat_completions(body: S.ChatCompletionRequest, request: Request, who: Principal = Depends(principal)):
    """Chat completion; with `stream` the events are `ChatCompletionChunk`s, then `data: [DONE]`."""
    return await _generate(request, who, body, "chat")


@router.post("/completions", response_model=S.CompletionResponse, responses=GENERATION_ERRORS)
async def completions(body: S.CompletionRequest, request: Request, who: Principal = Depends(principal)):
    """Text completion of one prompt; with `stream` the events are `CompletionResponse`s, then `data: [DONE]`."""
    return await _generate(request, who, body, "completions")


@router.get("/models", response_model=S.ModelList, responses=ERRORS)
async def models(request: Request, who: Principal = Depends(principal)):
    engine = request.app.state.engine
    settings = request.app.state.settings
    return S.ModelList(data=[S.ModelInfo(
        id=engine.name, created=int(engine.model_dir.stat().st_mtime), owned_by="localist",
        num_layers=engine.num_layers, num_heads=engine.num_heads, max_model_len=engine.max_model_len,
        weights_sha256=engine.weights_sha256, stand_in=settings.stand_in)])
