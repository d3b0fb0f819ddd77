"""The vLLM engine inside the server: one AsyncLLM per process, plus what the audit needs about it.

Every use of vLLM by the server is in this module: a choice goes in as token ids (the block table
decides tokenisation, docs/theory.md §1) with a :class:`Sampling` and the request's
``LocalistParams`` (:meth:`Engine.request` turns them into vLLM's ``SamplingParams``); what it
produced comes back as :class:`Generated`; its per-token attention statistics come back as
``BlockStats`` (:meth:`Engine.fetch_stats`, a ``collective_rpc`` into the workers).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from transformers import AutoTokenizer

from localist.model.attention import BlockStats
from localist.model.blocks import DIAL_SCOPES, LocalistParams
from localist.model.provenance import checkpoint
from localist.model.tokenizer import tokenizer_fingerprint

log = logging.getLogger("localist.server")
T = TypeVar("T")


def weights_sha256(model_dir: Path) -> str:
    """One hash over every weight file (sorted by name), so a record pins the exact weights."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def default_dial_scope(model_dir: Path) -> str:
    """The dial scope a request gets when it gives none: the model folder's ``localist.json``, key
    ``dial_scope`` (chosen by measurement and stated in the model card), else ``all``."""
    from localist.model.train import LAYOUT_FILE

    path = model_dir / LAYOUT_FILE
    scope = json.loads(path.read_text()).get("dial_scope", "all") if path.exists() else "all"
    if scope not in DIAL_SCOPES:
        raise ValueError(f"{path}: dial_scope must be one of {', '.join(DIAL_SCOPES)}, got {scope!r}")
    return scope


def software_versions() -> dict[str, str]:
    import fastapi
    import torch
    import transformers
    import vllm

    from importlib.metadata import PackageNotFoundError, version

    try:
        localist_version = version("localist")
    except PackageNotFoundError:
        localist_version = "unknown"
    return {
        "localist": localist_version, "vllm": vllm.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "fastapi": fastapi.__version__,
        "python": platform.python_version(),
    }


@dataclass
class EngineConfig:
    model_dir: Path
    name: str
    max_model_len: int = 2048
    stand_in: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampling:
    """How one choice is sampled."""

    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: list[str] | None
    max_tokens: int
    logprobs: int | None
    ignore_eos: bool


@dataclass(frozen=True)
class EngineRequest:
    """One choice as the engine runs it: its id (its statistics are fetched by it), its sampling as the
    engine normalised it (what an audit record keeps) and the localist parameters it carries."""

    engine_id: str
    sampling: Sampling
    localist_json: str
    _params: Any = field(repr=False)  # vLLM's SamplingParams


@dataclass(frozen=True)
class RankedToken:
    """One entry of a position's logprobs."""

    logprob: float
    rank: int | None
    text: str


@dataclass
class Generated:
    """What one choice has produced so far."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, RankedToken]] = field(default_factory=list)  # per position, when asked for


class EngineUnavailable(RuntimeError):
    """The engine is not serving: it died and a new one is starting. ``retry_after``: seconds until it
    probably serves again."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


ENGINE_POLL_S = 0.5  # how often the supervisor looks whether the engine core still lives
RESTART_BACKOFF_S = (1, 2, 5, 10, 30, 60)  # waits between failed restart attempts, the last one repeated


class Engine:
    """AsyncLLM with the served model's identity (name, hashes, shape) attached, and its supervisor.

    One failure must not take the service down: when the engine core dies (a crash inside vLLM, a
    killed process, OOM), :meth:`supervise` shuts the dead ``AsyncLLM`` down and starts a new one in the
    background. Meanwhile every use of the engine raises :class:`EngineUnavailable` at once (→ 503
    with Retry-After), and calls that were waiting on the dead engine are released with it, never left
    hanging.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        self.name = config.name
        self.model_dir = Path(config.model_dir)
        hf = json.loads((self.model_dir / "config.json").read_text())
        self.num_layers = int(hf["num_hidden_layers"])
        self.num_heads = int(hf["num_attention_heads"])
        self.max_model_len = min(config.max_model_len, int(hf.get("max_position_embeddings", config.max_model_len)))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.weights_sha256 = weights_sha256(self.model_dir)
        self.checkpoint = checkpoint(self.model_dir)  # the input files' identity (provenance)
        self.default_dial_scope = default_dial_scope(self.model_dir)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.versions = software_versions()
        # How the engine runs the model, read from vLLM once it started (:meth:`read_engine_setup`).
        self.dtype: str | None = None
        self.attention_isa: str | None = None
        self.tensor_parallel_size: int | None = None
        self._llm = None
        self._died = asyncio.Event()  # set once the current AsyncLLM is found dead; a new one per engine
        self.restarting = False
        self.restarts = 0  # engines started after a death, successfully
        self.last_failure: str | None = None  # why the engine last died (or a restart failed)
        self.down_since: float | None = None  # unix time of the current outage; None while serving
        self.start_seconds = 60.0  # how long the last start took: the Retry-After estimate

    def _new_llm(self):
        """A fresh AsyncLLM (tens of seconds on CPU: the engine core loads the model)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from localist.model.vllm_engine import engine_args

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # glibc raises its mmap threshold to the largest block freed, so the per-step tensors of the engine's
        # worker land in its heap and fragment it: in 3-min soaks the worker's RSS crept 15-23 MB/min after the
        # 2-min warm-up, all of it native heap (its Python objects and statistics records stayed flat). With a
        # fixed threshold they go back to the OS when freed: 7-8 MB/min in the same window, 8.4 MB/min over the
        # 4 min after warm-up of a 6-min soak (smaller, not gone: the rest is in its anonymous mappings).
        # The engine's processes read it when they start.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
        settings = {"served_model_name": self.name, "max_model_len": self.max_model_len,
                    "gpu_memory_utilization": 0.3, "seed": self.config.seed}
        args = engine_args(self.model_dir, **{**settings, **self.config.extra})  # the user's engine flags win
        began = time.monotonic()
        llm = AsyncLLM.from_engine_args(args)
        self.start_seconds = time.monotonic() - began
        return llm

    def start(self) -> None:
        """Start the engine core (tens of seconds on CPU)."""
        self._llm = self._new_llm()
        scheduler = self._llm.vllm_config.scheduler_config
        log.info("engine started: model %s from %s (%d layers, %d heads, max_model_len %d, max_num_seqs %d; "
                 "engine flags %s)", self.name, self.model_dir, self.num_layers, self.num_heads, self.max_model_len,
                 scheduler.max_num_seqs, self.config.extra or "none")

    async def read_engine_setup(self) -> None:
        """The dtype, the attention ISA every rank's localist layers use, and the tensor-parallel size,
        as vLLM set them up (the audit's provenance): once, after :meth:`start`."""
        config = self._llm.vllm_config
        ranks = await self.collective_rpc("localist_attention_isas")
        self.dtype = str(config.model_config.dtype).removeprefix("torch.")
        self.attention_isa = ",".join(sorted({isa for rank in ranks for isa in rank}))
        self.tensor_parallel_size = int(config.parallel_config.tensor_parallel_size)

    @property
    def running(self) -> bool:
        return self._llm is not None and not self.restarting and not self._llm.errored

    def retry_after(self) -> int:
        """Seconds until a restarting engine probably serves again (at least 1)."""
        elapsed = time.time() - self.down_since if self.down_since is not None else 0.0
        return max(1, math.ceil(self.start_seconds - elapsed))

    def unavailable(self, what: str, cause: str | None = None) -> EngineUnavailable:
        cause = cause or (self.last_failure if self.down_since is not None else None)
        because = f" ({cause})" if cause else ""
        return EngineUnavailable(f"{what}{because}; the engine is restarting, retry in {self.retry_after()} s",
                                 self.retry_after())

    def ensure_serving(self) -> None:
        """Raises :class:`EngineUnavailable` while the engine is down: callers are refused at once, never queued."""
        if not self.running:
            raise self.unavailable("the engine is not serving")

    def _serving(self):
        """The serving AsyncLLM; raises :class:`EngineUnavailable` while there is none."""
        self.ensure_serving()
        return self._llm

    def unfinished_requests(self) -> int:
        """Requests in the engine, running or waiting (0 while it is down)."""
        return self._llm.get_num_unfinished_requests() if self.running else 0

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    def request(engine_id: str, sampling: Sampling, localist: LocalistParams) -> EngineRequest:
        """The engine request of one choice; vLLM normalises the sampling (an absent stop list becomes
        empty, a greedy choice's top_p 1, …) and the request keeps it as normalised."""
        from vllm import SamplingParams

        localist_json = localist.to_json()
        params = SamplingParams(n=1, extra_args={"localist": localist_json}, **dataclasses.asdict(sampling))
        ran = Sampling(params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty,
                       params.seed, list(params.stop), params.max_tokens, params.logprobs, params.ignore_eos)
        return EngineRequest(engine_id, ran, localist_json, params)

    @staticmethod
    def cache_salt(localist: LocalistParams) -> str | None:
        """The prefix-cache salt of a request (docs/architecture.md, Prefix caching)."""
        from localist.model.vllm_engine import cache_salt

        return cache_salt(localist)

    async def fetch_stats(self, engine_id: str, *, since: int = 0, release: bool = False) -> BlockStats:
        """Per-token attention statistics [T, L, H, G] of engine request ``engine_id`` from token ``since``
        on; ``release`` frees the workers' record of it."""
        from localist.model.vllm_engine import fetch_stats

        got = await fetch_stats(self, engine_id, since=since, release=release)
        return BlockStats(got.log_mass, got.mass, got.inner_entropy)

    async def stats_held(self) -> int:
        """Statistics records the workers still hold, all ranks (0 while the engine is down)."""
        if not self.running:
            return 0
        try:
            return sum(await self.collective_rpc("localist_stats_held"))
        except EngineUnavailable:  # it died meanwhile: its records went with it (`running` says the rest)
            return 0

    async def _unless_dead(self, step: Awaitable[T], died: asyncio.Event, what: str) -> T:
        """Await ``step`` unless the engine dies first (vLLM leaves a call waiting on a dead engine core,
        e.g. its first ``get_supported_tasks``, unanswered): then cancel it and raise EngineUnavailable."""
        work, death = asyncio.ensure_future(step), asyncio.ensure_future(died.wait())
        try:
            await asyncio.wait({work, death}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            death.cancel()
            if not work.done():
                work.cancel()  # the engine died, or this task was cancelled (the client left)
                await asyncio.wait({work})  # let vLLM finish its abort before anyone closes the generator
        if work.cancelled() and died.is_set():
            raise self.unavailable(f"the engine died during {what}")
        return work.result()

    async def generate(self, prompt_token_ids: list[int], request: EngineRequest, cache_salt: str | None = None
                       ) -> AsyncIterator[Generated]:
        """The choice's output after each engine step (one object, updated); cancelling the iteration
        aborts the request in vLLM. A death of the engine meanwhile raises :class:`EngineUnavailable`."""
        from vllm.v1.engine.exceptions import EngineDeadError

        llm, died = self._serving(), self._died
        prompt: dict[str, Any] = {"prompt_token_ids": list(prompt_token_ids)}
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        generated = Generated()
        try:
            async with contextlib.aclosing(llm.generate(prompt, request._params, request.engine_id)) as outputs:
                while True:
                    try:
                        out = await self._unless_dead(anext(outputs), died, "this request")
                    except StopAsyncIteration:
                        return
                    self._update(generated, out.outputs[0])
                    yield generated
        except Exception as exc:
            if isinstance(exc, (EngineDeadError, EngineUnavailable)) or llm.errored:
                raise self.unavailable("the engine died during this request", self._death_cause(llm)) from exc
            raise

    def _update(self, generated: Generated, completion) -> None:
        """Take a vLLM ``CompletionOutput`` (cumulative) into ``generated``; logprobs of new positions only."""
        generated.token_ids = list(completion.token_ids)
        generated.text = completion.text
        generated.finish_reason = completion.finish_reason
        for entry in (completion.logprobs or [])[len(generated.logprobs):]:
            generated.logprobs.append({
                token_id: RankedToken(lp.logprob, lp.rank,
                                      lp.decoded_token if lp.decoded_token is not None else self.token_text(token_id))
                for token_id, lp in entry.items()})

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> list[Any]:
        """``AsyncLLM.collective_rpc``, released with :class:`EngineUnavailable` if the engine dies first."""
        from vllm.v1.engine.exceptions import EngineDeadError

        llm, died = self._serving(), self._died
        try:
            return await self._unless_dead(llm.collective_rpc(method, timeout, args, kwargs), died, f"a call to {method}")
        except EngineDeadError as exc:
            raise self.unavailable(f"the engine died before a call to {method}") from exc

    async def supervise(self) -> None:
        """Runs for the server's lifetime: whenever the engine dies, start a new one."""
        while True:
            while not self._llm.errored:
                await asyncio.sleep(ENGINE_POLL_S)
            self._died.set()
            await self._restart(self._death_cause(self._llm))

    @staticmethod
    def _death_cause(llm) -> str:
        """The engine core's exit, as far as its process tells (vLLM logs the details)."""
        manager = getattr(getattr(llm.engine_core, "resources", None), "engine_manager", None)
        exits = [(p.name, p.pid, p.exitcode) for p in getattr(manager, "processes", ())
                 if p.exitcode is not None]
        if not exits:
            return "the engine core stopped (EngineDeadError; the server log has its error)"
        name, pid, code = exits[0]
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"the engine core process {name} (pid {pid}) {how}"

    async def _restart(self, cause: str) -> None:
        log.error("engine died: %s; starting a new one", cause)
        self.restarting, self.last_failure, self.down_since = True, cause, time.time()
        dead, self._llm = self._llm, None
        try:
            await asyncio.to_thread(dead.shutdown)
        except Exception:  # noqa: BLE001 — what is left of the dead engine must not stop the new one
            log.exception("shutting the dead engine down failed")
        for attempt in itertools.count():
            try:
                self._llm = await asyncio.to_thread(self._new_llm)
                self._died = asyncio.Event()
                break
            except Exception as exc:  # noqa: BLE001 — keep trying: the service must come back by itself
                wait = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                self.last_failure = f"{cause}; restart attempt {attempt + 1} failed: {type(exc).__name__}: {exc}"
                log.exception("engine restart attempt %d failed; next in %d s", attempt + 1, wait)
                await asyncio.sleep(wait)
        log.warning("engine restarted: it was down for %.1f s", time.time() - self.down_since)
        self.restarts += 1
        self.restarting, self.down_since = False, None

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
