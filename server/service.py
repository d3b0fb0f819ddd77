"""The request service: one accepted generation, from its plan to its audit record.

Routers translate HTTP; this does the rest. A request is planned once (``planning``: block table,
dial, target and sampling; every 400 happens there and nothing is stored), its choices run through
the engine, their attention statistics are pulled and turned into metrics (``wire`` converts them),
the typed audit record is written (awaited: an acknowledged response is durable) and Prometheus
counts it. A caller that leaves cancels the engine requests (vLLM aborts them) and the request is
stored as ``aborted``; a failure is stored as ``failed`` with its error and raised as
:class:`GenerationFailed` naming the record.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from localist.clients import contract as C
from localist.model.metrics import metrics_for_table, response_layout, token_pointers
from localist.server import wire
from localist.server.attention_stats import ChoiceStats
from localist.server.auth import Principal
from localist.server.engine import Engine, EngineRequest, Generated
from localist.server.exceptions import ClientDisconnected, Conflict, GenerationFailed
from localist.server.observability import Prometheus
from localist.server.store import StoreUnavailable
from localist.server import planning
from localist.server.planning import Plan
from localist.server.segmentation import ServedSegmenter

log = logging.getLogger("localist.server")


@dataclass
class Choice:
    """One choice of a request: its engine request, what it produced so far, its statistics."""

    index: int
    request: EngineRequest
    stats: ChoiceStats
    output: Generated = field(default_factory=Generated)
    sent_tokens: int = 0  # how far a stream has sent it
    sent_chars: int = 0
    finish_sent: bool = False


@dataclass
class Delta:
    """A stream's piece of one choice: its new text, output tokens [start, end) with their attribution,
    and the finish reason once it finished."""

    choice: int
    text: str
    start: int
    end: int
    finish_reason: str | None
    tokens: list[C.TokenAttribution]


class Run:
    """One accepted request: its choices, its metrics and (once) its audit record."""

    def __init__(self, plan: Plan, caller: Principal, http_request_id: str | None):
        self.plan, self.caller, self.http_request_id = plan, caller, http_request_id
        self.choices = [Choice(i, r, ChoiceStats(r.engine_id)) for i, r in enumerate(plan.choices)]
        self.first_token_at: float | None = None
        self.result: C.LocalistResult | None = None
        self.stored_as: str | None = None  # set before the write starts: one record per request, ever

    @property
    def outputs(self) -> list[Generated]:
        return [c.output for c in self.choices]


class GenerationService:
    def __init__(self, engine: Engine, store, prometheus: Prometheus, default_rho: float, max_blocks: int):
        self.engine, self.store, self.prometheus = engine, store, prometheus
        self.default_rho, self.max_blocks = default_rho, max_blocks
        self.segmenter = ServedSegmenter(engine)
        self._background: set[asyncio.Task] = set()

    # -- planning -------------------------------------------------------------------------------

    async def plan(self, req: C.ChatCompletionRequest | C.CompletionRequest, endpoint: str,
                   rule_blocks: list[C.BlockSpec] = ()) -> Plan:
        """The request checked and planned (``rule_blocks``: its ``rules`` resolved by ``server/rules.py``);
        then the engine must be serving (503 otherwise)."""
        plan = (await asyncio.to_thread(planning.plan, self.engine, req, endpoint, self.default_rho, self.max_blocks,
                                        rule_blocks, self.segmenter) if req.blocks == "auto"  # seconds: off the loop
                else planning.plan(self.engine, req, endpoint, self.default_rho, self.max_blocks, rule_blocks))
        self.engine.ensure_serving()
        self.store.ensure_available()  # during an outage nothing could be recorded: 503 before any work
        return plan

    def plan_replay(self, record: C.AuditRecord) -> Plan:
        """A stored request planned again, exactly; only request records replay."""
        if record.kind != "request":
            raise Conflict(f"record {record.id!r} is a {record.kind} record, not a request", "id", "not_replayable")
        self.engine.ensure_serving()  # while the engine restarts: 503 + Retry-After, nothing stored
        self.store.ensure_available()
        plan = planning.plan_replay(self.engine, record)
        plan.rules = list(record.request.rules or [])  # the replay ran the same injected rule versions
        return plan

    # -- running --------------------------------------------------------------------------------

    async def _choice_outputs(self, run: Run, choice: Choice) -> AsyncIterator[None]:
        """Drive one choice through the engine; yields after each engine step."""
        async for out in self.engine.generate(run.plan.prompt_token_ids, choice.request, run.plan.cache_salt):
            if run.first_token_at is None and out.token_ids:
                run.first_token_at = time.time()
            choice.output = out
            yield

    async def _merged(self, run: Run) -> AsyncIterator[int]:
        """Every choice's steps as they come, as choice indices; closing it cancels every choice."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(choice: Choice):
            try:
                async for _ in self._choice_outputs(run, choice):
                    await queue.put(choice.index)
            except BaseException as exc:  # noqa: BLE001 — re-raised in the consumer
                await queue.put(exc)
                return
            await queue.put(done)

        tasks = [asyncio.create_task(pump(c)) for c in run.choices]
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

    def _metrics(self, run: Run, choice: Choice) -> C.ChoiceMetrics:
        token_ids = choice.output.token_ids
        m = metrics_for_table(choice.stats.tokens(0, len(token_ids)), run.plan.table, run.plan.target, run.plan.rho)
        return wire.choice_metrics(m, choice.index, run.plan.req.audit, token_ids, self.engine.token_text)

    async def _finish_metrics(self, run: Run) -> None:
        """Every choice's metrics at the request's audit level (tensor work: in a thread)."""
        choices = []
        for choice in run.choices:
            await choice.stats.pull(self.engine)
            choices.append(await asyncio.to_thread(self._metrics, run, choice))
        plan = run.plan
        run.result = C.LocalistResult(audit_id=plan.request_id, audit=plan.req.audit,
                                      locality=C.Dial(rho=plan.rho, preset=plan.preset, scope=plan.dial_scope),
                                      blocks=wire.block_infos(plan.table), choices=choices,
                                      rules=[C.RuleUse(**u.model_dump(exclude={"text"})) for u in plan.rules] or None,
                                      anchors=plan.anchors or None, warnings=plan.warnings or None)

    async def _release_stats(self, run: Run) -> None:
        """Free the workers' statistics of every choice (also after an abort or a failure: one choice's
        error does not keep the others' records); raises the first error."""
        results = await asyncio.gather(*(c.stats.release(self.engine) for c in run.choices), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _delta_tokens(self, run: Run, choice: Choice, token_ids: list[int], start: int, end: int
                      ) -> list[C.TokenAttribution]:
        """Attribution of output tokens [start, end). Pointer fidelity is against the request's
        ``target_block``; without one it is null (the default target, the response's top candidate
        block, is known only at the end: the final event carries it)."""
        candidates = response_layout(run.plan.table, end)[0][start:end]
        target = run.plan.target
        if target is not None and not bool(candidates[:, target].any()):
            target = None  # a query's own block is not its candidate
        attribution, fidelity = token_pointers(choice.stats.tokens(start, end), candidates, target)
        return wire.token_attributions(attribution, fidelity, token_ids, start)

    async def _stream_delta(self, run: Run, choice: Choice) -> Delta | None:
        """What a stream has not sent of ``choice`` yet (None: nothing new)."""
        out = choice.output  # the pump keeps updating the choice while this awaits: one snapshot now
        start, end, finish = choice.sent_tokens, len(out.token_ids), out.finish_reason
        token_ids, text = list(out.token_ids), out.text[choice.sent_chars:]
        if end == start and not text and (finish is None or choice.finish_sent):
            return None
        choice.sent_tokens, choice.sent_chars, choice.finish_sent = end, choice.sent_chars + len(text), finish is not None
        tokens: list[C.TokenAttribution] = []
        if end > start:
            await choice.stats.pull(self.engine)
            tokens = await asyncio.to_thread(self._delta_tokens, run, choice, token_ids, start, end)
        return Delta(choice.index, text, start, end, finish, tokens)

    # -- the audit record -------------------------------------------------------------------------

    def _record(self, run: Run, status: str, error: str | None) -> dict:
        """The audit record (its parts are the contract's ``Record*`` classes)."""
        plan, req, engine = run.plan, run.plan.req, self.engine
        first = run.choices[0].request.sampling
        result = run.result
        request = C.RecordRequest(
            model=engine.name, weights_hash=engine.weights_sha256, endpoint=plan.endpoint,
            http_request_id=run.http_request_id, replay_of=plan.replay_of, key_id=run.caller.key_id,
            rho=plan.rho, preset=plan.preset, blocks=wire.block_infos(plan.table), target_block=plan.target,
            audit=req.audit,
            params=C.RecordSampling(
                n=req.n, temperature=first.temperature, top_p=first.top_p, seed=req.seed, max_tokens=first.max_tokens,
                stop=first.stop, logprobs=first.logprobs, ignore_eos=first.ignore_eos,
                presence_penalty=first.presence_penalty, frequency_penalty=first.frequency_penalty),
            body=req.model_dump(mode="json", exclude_none=True), dial_scope=plan.dial_scope,
            rules=plan.rules or None,
            provenance=wire.provenance(engine), segmentation=plan.segmentation)
        output = C.RecordOutput(
            choices=[C.RecordChoice(index=c.index, text=c.output.text, token_ids=c.output.token_ids,
                                    finish_reason=c.output.finish_reason) for c in run.choices],
            usage=wire.usage(len(plan.prompt_token_ids), run.outputs))
        metrics = C.RecordMetrics(fidelity=result.choices[0].pointer_fidelity if result and result.choices else None,
                                  localist=result)
        timestamps = C.RecordTimestamps(received=plan.received, first_token=run.first_token_at, finished=time.time())
        replay = C.RecordReplay(
            prompt_token_ids=plan.prompt_token_ids, block_spans=plan.table.to_wire(), seed=req.seed,
            choice_seeds=[c.request.sampling.seed for c in run.choices],
            engine_request_ids=[c.request.engine_id for c in run.choices],
            sampling_params=[C.ReplaySampling(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                              stop=s.stop, seed=s.seed)
                             for s in (c.request.sampling for c in run.choices)],
            localist_params=[c.request.localist_json for c in run.choices], cache_salt=plan.cache_salt,
            tokenizer_hash=engine.fingerprint["tokenizer_sha256"],
            chat_template_hash=engine.fingerprint["chat_template_sha256"], versions=engine.versions)
        parts = {"request": request, "output": output, "metrics": metrics, "timestamps": timestamps, "replay": replay}
        return {"id": plan.request_id, "tenant": run.caller.tenant, "status": status, "error": error,
                **{name: part.model_dump(mode="json") for name, part in parts.items()}}

    async def _store(self, run: Run, status: str, error: str | None = None) -> None:
        """Durable write through the store's writer thread (never blocks the event loop). A write that
        started is finished by the writer even if this task is cancelled, so a later abort is not stored
        twice."""
        if run.stored_as is not None:
            return
        run.stored_as = status
        await self.store.arecord(self._record(run, status, error))
        plan, p = run.plan, self.prometheus
        p.requests.labels(plan.endpoint, status).inc()
        p.tokens.labels("prompt").inc(len(plan.prompt_token_ids))
        p.tokens.labels("completion").inc(sum(len(o.token_ids) for o in run.outputs))
        p.latency.labels(plan.endpoint).observe(time.time() - plan.received)
        p.dial.observe(sum(plan.rho) / len(plan.rho))
        if run.result is not None and run.result.choices and run.result.choices[0].pointer_fidelity is not None:
            p.fidelity.observe(run.result.choices[0].pointer_fidelity)

    def _store_in_background(self, run: Run, status: str, error: str | None = None) -> asyncio.Task:
        """Release the statistics and store the record in a task of its own: the write outlives a cancelled
        handler (await it through ``asyncio.shield`` to answer only once the record is durable)."""
        async def write() -> Exception | None:
            """Returns why the record was not stored (None: it is durable)."""
            try:
                await self._release_stats(run)
            except Exception as exc:  # noqa: BLE001 — the record matters more than the statistics
                log.warning("releasing statistics of %s failed: %s: %s", run.plan.request_id, type(exc).__name__, exc)
            try:
                await self._store(run, status, error)
            except StoreUnavailable as exc:  # an outage, logged once by the store: one line per record
                log.warning("the %s record of %s was not stored: %s", status, run.plan.request_id, exc)
                return exc
            except Exception as exc:  # noqa: BLE001 — most callers do not await this task: say it loudly
                log.exception("storing the %s record of %s failed", status, run.plan.request_id)
                return exc
            return None

        task = asyncio.get_running_loop().create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _failed(self, run: Run, exc: Exception) -> GenerationFailed | StoreUnavailable:
        """Store the request as failed (durable before the answer) and say so; when the store is down,
        say that instead (the failure is in the log, not in a record)."""
        # The traceback goes to the log (never to the client): a failure here is a defect to diagnose.
        log.error("generation %s failed: %s: %s", run.plan.request_id, type(exc).__name__, exc, exc_info=exc)
        not_stored = await asyncio.shield(self._store_in_background(run, "failed", f"{type(exc).__name__}: {exc}"))
        if isinstance(not_stored, StoreUnavailable):
            return not_stored
        return GenerationFailed(exc, run.plan.request_id)

    async def drain(self) -> None:
        """At shutdown: let pending audit writes finish."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- the two ways to answer -------------------------------------------------------------------

    def start(self, plan: Plan, caller: Principal, http_request_id: str | None) -> Run:
        return Run(plan, caller, http_request_id)

    async def _generate_all(self, run: Run) -> None:
        async with contextlib.aclosing(self._merged(run)) as steps:
            async for _ in steps:
                pass
        await self._finish_metrics(run)
        await self._release_stats(run)

    async def complete(self, run: Run, caller_gone: Awaitable[None]) -> None:
        """Generate everything, metrics included, and store the record; unless ``caller_gone`` completes
        first (then abort, store as aborted and raise ClientDisconnected)."""
        work = asyncio.create_task(self._generate_all(run))
        watch = asyncio.ensure_future(caller_gone)
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            self._store_in_background(run, "aborted", "the server cancelled the request")
            raise
        finally:
            watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            self._store_in_background(run, "aborted", "the client disconnected")
            raise ClientDisconnected()
        if work.exception() is not None:
            raise await self._failed(run, work.exception())
        await self._store(run, "completed")

    async def stream(self, run: Run) -> AsyncIterator[Delta]:
        """The choices' deltas as they come; once it ends, ``run.result`` holds the metrics and the record
        is durable. Closing it early stores the request as aborted; a failure is stored as failed and
        raised as GenerationFailed; a record the store cannot take raises StoreUnavailable."""
        completed = False
        try:
            async with contextlib.aclosing(self._merged(run)) as steps:
                async for i in steps:
                    delta = await self._stream_delta(run, run.choices[i])
                    if delta is not None:
                        yield delta
            await self._finish_metrics(run)
            await self._release_stats(run)
            await self._store(run, "completed")
            completed = True
        except (asyncio.CancelledError, GeneratorExit):
            if not completed:
                self._store_in_background(run, "aborted", "the client disconnected")
            raise
        except StoreUnavailable:  # the record of the finished request could not be written: no final event
            raise
        except Exception as exc:
            raise await self._failed(run, exc) from exc

    @staticmethod
    def replay_result(run: Run, original: C.AuditRecord) -> C.ReplayResult:
        """A finished replay against the record it replayed: did every choice reproduce its tokens?"""
        choices = [C.ReplayChoice(index=c.index, original_token_ids=o.token_ids, replay_token_ids=c.output.token_ids,
                                  matches=o.token_ids == c.output.token_ids)
                   for c, o in zip(run.choices, original.output.choices)]
        return C.ReplayResult(record_id=original.id, replay_id=run.plan.request_id,
                              provenance_differences=run.plan.provenance_differences,
                              matches=all(c.matches for c in choices), choices=choices, localist=run.result)
