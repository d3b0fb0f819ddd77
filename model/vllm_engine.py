"""How per-request localist data travels through vLLM, and how statistics come back out.

In: the request's :class:`LocalistParams` JSON rides in ``SamplingParams.extra_args["localist"]``
(vLLM's OpenAI server fills ``extra_args`` from ``vllm_xargs``). :class:`LocalistRowState` is a V1
logits processor: vLLM calls its ``update_state`` with every change of the persistent batch *before*
each forward pass, so it keeps ``row → RequestState`` (parsed once, when the request joins the batch)
where the model, running in the same worker process, reads it: both reach the engine's one
:class:`LocalistWorker` through its vLLM config. It leaves logits alone except for a failed row.

Failures stay inside the request: when the localist path raises in a step, the attention layer
finishes the step with vLLM's own kernel and calls :meth:`LocalistWorker.fail` for every localist
request of the step; this processor then forces each such row to its stop token, and
:func:`fetch_stats` raises :class:`LocalistWorkerError` naming the cause. The engine keeps serving.

Out: the model appends per generated token the block statistics [L, H, G] of the query that produced
that token to a worker-local store keyed by the request id in the JSON. The server pulls them with
``collective_rpc`` into :class:`LocalistWorkerExtension` (works with the default multi-process
layout, costs the engine loop nothing while nobody asks). Records of requests that left the batch
are freed when fetched with ``release=True`` or, as a safety net for aborted requests nobody
fetches, after ``LOCALIST_STATS_TTL`` seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from localist.model.blocks import BlockError, LocalistParams

EXTRA_ARGS_KEY = "localist"
STATS_FIELDS = ("log_mass", "mass", "inner_entropy")
# HF architectures served as localist: vLLM's own class for each, with its attention layers swapped
# (vllm_model.localist_class); SmolLM and Llama-3 checkpoints are LlamaForCausalLM.
ARCHITECTURES = {
    arch: f"Localist{arch}" for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
}


@dataclass
class RequestState:
    """What the attention needs about one request, built once when it joins the batch."""

    request_id: str
    rho: torch.Tensor  # [L] float32
    prompt_block_ids: torch.Tensor  # [P] int64
    pinned: torch.Tensor  # [G] bool
    keep_stats: bool
    stop_token: int | None = None  # the token that ends the request (its EOS or first stop id)
    inject_fault: bool = False  # test switch: the attention raises for this request (LOCALIST_FAULT_LABEL)
    failed: str | None = None  # why the localist path failed for it; the row is then forced to stop

    @property
    def num_blocks(self) -> int:
        return int(self.pinned.numel())

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_block_ids.numel())

    def block_ids(self, seq_len: int) -> torch.Tensor:
        """Block of each of the first ``seq_len`` positions; tokens past the prompt are the response's."""
        ids = torch.full((seq_len,), self.num_blocks - 1, dtype=torch.int64)
        n = min(seq_len, self.prompt_len)
        ids[:n] = self.prompt_block_ids[:n]
        return ids


def _raw_params(extra_args: dict[str, Any] | None) -> str | None:
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    raw = extra_args[EXTRA_ARGS_KEY]
    if not isinstance(raw, str):
        raise BlockError(EXTRA_ARGS_KEY, "must be a JSON string (vllm_xargs takes no nested objects)")
    return raw


def parse_request(extra_args: dict[str, Any] | None, prompt_token_ids: list[int] | None, num_layers: int,
                  fault_label: str | None = None) -> RequestState | None:
    """The request's state, or None for a request without localist data (served as stock)."""
    raw = _raw_params(extra_args)
    if raw is None:
        return None
    params = LocalistParams.from_json(raw, num_layers)
    if prompt_token_ids is None:
        raise BlockError("prompt", "localist requests need prompt token ids (no prompt embeddings)")
    table = params.table(len(prompt_token_ids))
    return RequestState(
        request_id=params.request_id,
        rho=torch.tensor(params.rho, dtype=torch.float32),
        prompt_block_ids=torch.tensor(table.block_ids(), dtype=torch.int64),
        pinned=torch.tensor(table.pinned(), dtype=torch.bool),
        keep_stats=bool(params.request_id),
        inject_fault=fault_label is not None and any(b.label == fault_label for b in table.blocks),
    )


# --------------------------------------------------------------------------------------------------
# Worker-local state, one object per engine: the row table (written by the logits processor), the
# statistics store and the step in progress (read and written by the attention layers).


@dataclass(frozen=True)
class WorkerSettings:
    """The worker's environment, read once when its engine starts."""

    stats_ttl_s: float = 600.0  # LOCALIST_STATS_TTL: records of departed requests nobody fetched are dropped
    fault_label: str | None = None  # LOCALIST_FAULT_LABEL: test switch, the attention raises for such blocks
    prefill_budget: int = 1 << 24  # LOCALIST_PREFILL_BUDGET: block-partial elements per prefill query chunk
    use_kernel: bool = True  # LOCALIST_KERNEL=0: the pure-torch path (the oracle the compiled kernel is tested against)

    @classmethod
    def from_env(cls) -> WorkerSettings:
        env = os.environ
        return cls(
            stats_ttl_s=float(env.get("LOCALIST_STATS_TTL", cls.stats_ttl_s)),
            fault_label=env.get("LOCALIST_FAULT_LABEL") or None,
            prefill_budget=int(env.get("LOCALIST_PREFILL_BUDGET", cls.prefill_budget)),
            use_kernel=env.get("LOCALIST_KERNEL", "1") != "0",
        )


@dataclass
class _Record:
    tokens: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    error: str | None = None  # the request's localist data was refused: it ran as stock
    failure: str | None = None  # the localist path raised while serving it: it was ended
    left_at: float | None = None  # when the request left the batch (finished, aborted or preempted)


class LocalistWorker:
    """One engine's worker state: the live rows of the persistent batch, the statistics records and
    the step in progress. Reached through the engine's vLLM config (:func:`worker_state`)."""

    def __init__(self, num_layers: int, settings: WorkerSettings) -> None:
        self.num_layers = num_layers
        self.settings = settings
        self.rows: dict[int, RequestState] = {}
        self.records: dict[str, _Record] = {}
        self.step: tuple[object, Any] = (None, None)  # (forward context, plan) of the step in progress

    def record(self, request_id: str) -> _Record:
        rec = self.records.get(request_id)
        if rec is None:
            rec = self.records[request_id] = _Record()
        return rec

    def add_token_stats(self, request_id: str, token_index: int, log_mass, mass, inner_entropy) -> None:
        self.record(request_id).tokens[token_index] = (log_mass, mass, inner_entropy)

    def fail(self, state: RequestState, message: str) -> None:
        """The localist path failed for this request: end its row, keep the cause for the server."""
        state.failed = message
        if state.keep_stats:
            self.record(state.request_id).failure = message

    def take(self, request_id: str, since: int, release: bool) -> dict[str, Any]:
        rec = self.records.pop(request_id, None) if release else self.records.get(request_id)
        if rec is None:
            return {"known": False, "error": None, "failure": None, "num_tokens": 0}
        n = 0
        while n in rec.tokens:
            n += 1
        out: dict[str, Any] = {"known": True, "error": rec.error, "failure": rec.failure, "num_tokens": n}
        for k, name in enumerate(STATS_FIELDS):
            rows = [rec.tokens[t][k] for t in range(since, n)]
            if rows:  # raw float32 bytes: the RPC reply crosses two process boundaries
                stacked = torch.stack(rows).float().contiguous()
                out[name] = {"shape": list(stacked.shape), "data": stacked.numpy().tobytes()}
        return out

    def expire(self, now: float) -> None:
        ttl = self.settings.stats_ttl_s
        stale = [rid for rid, rec in self.records.items() if rec.left_at is not None and now - rec.left_at > ttl]
        for rid in stale:
            del self.records[rid]


def worker_state(vllm_config) -> LocalistWorker:
    """The engine's one :class:`LocalistWorker`, kept on its vLLM config: the logits processor, the
    attention layers and the worker extension of one engine receive the same config object (two
    engines in one process get two states); created by the first of them to ask."""
    worker = getattr(vllm_config, "localist_worker", None)
    if worker is None:
        worker = LocalistWorker(vllm_config.model_config.hf_config.num_hidden_layers, WorkerSettings.from_env())
        vllm_config.localist_worker = worker
    return worker


# --------------------------------------------------------------------------------------------------
# The state channel: a V1 logits processor that never changes logits.


class LocalistRowState(LogitsProcessor):
    """Keeps ``row → RequestState`` for the model; validates the JSON at admission (→ HTTP 400)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        raw = _raw_params(sampling_params.extra_args)
        if raw is None:
            return
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BlockError(EXTRA_ARGS_KEY, f"not valid JSON: {exc}") from None
        rho = value.get("rho") if isinstance(value, dict) else None
        # The layer count is unknown here (front-end process): check a list's values with its own length.
        params = LocalistParams.from_json(raw, len(rho) if isinstance(rho, list) and rho else 1)
        # The prompt is not known here either: check the spans against their own extent.
        params.table(max((int(s[1]) for s in params.blocks), default=1))
        if params.request_id and sampling_params.n != 1:
            raise BlockError("n", "a localist request with an id needs n = 1: statistics are kept per id")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.worker = worker_state(vllm_config)
        self.worker.rows.clear()

    def is_argmax_invariant(self) -> bool:
        return False  # a failed row is forced to its stop token, greedy or not

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, state in self.worker.rows.items():
            if state.failed is not None and state.stop_token is not None and row < logits.shape[0]:
                # the lowest finite value, not −inf: a min_tokens mask on the stop token then leaves
                # a valid (if arbitrary) distribution instead of nan, and the request still ends at max_tokens
                logits[row] = torch.finfo(logits.dtype).min
                logits[row, state.stop_token] = 0.0
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        worker, now = self.worker, time.monotonic()
        rows = worker.rows
        for index in batch_update.removed:
            state = rows.pop(index, None)
            if state is not None and state.keep_stats and state.request_id in worker.records:
                worker.records[state.request_id].left_at = now
        for index, params, prompt_ids, _output_ids in batch_update.added:
            rows.pop(index, None)
            state = self._new_state(params, prompt_ids)
            if state is not None:
                rows[index] = state
        for a, b, direction in batch_update.moved:
            sa, sb = rows.pop(a, None), rows.pop(b, None)
            if sa is not None:
                rows[b] = sa
            if sb is not None and direction == MoveDirectionality.SWAP:
                rows[a] = sb
        worker.expire(now)

    def _new_state(self, params, prompt_ids) -> RequestState | None:
        worker = self.worker
        try:
            state = parse_request(params.extra_args, prompt_ids, worker.num_layers, worker.settings.fault_label)
        except BlockError as exc:
            # Only what the front end could not check lands here (spans against the prompt length,
            # per-layer list length): the request runs as stock and its record carries the error.
            value = json.loads(params.extra_args[EXTRA_ARGS_KEY])  # valid JSON: checked at admission
            if isinstance(value, dict) and value.get("id"):
                worker.record(str(value["id"])).error = str(exc)
            return None
        if state is None:
            return None
        # vLLM stops a request on its EOS (unless ignore_eos) or on a stop token id.
        stops = ([params.eos_token_id] if params.eos_token_id is not None and not params.ignore_eos else []) + list(
            params.stop_token_ids or ())
        state.stop_token = stops[0] if stops else None
        if state.keep_stats:
            rec = worker.record(state.request_id)
            rec.left_at = None
        return state


# --------------------------------------------------------------------------------------------------
# Statistics out of the engine.


class LocalistWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); reached through ``collective_rpc``."""

    def localist_stats(self, request_id: str, since: int = 0, release: bool = False) -> dict[str, Any]:
        return worker_state(self.vllm_config).take(request_id, since, release)

    def localist_stats_held(self) -> int:
        """Statistics records this rank still holds (0 once every request was released or expired)."""
        return len(worker_state(self.vllm_config).records)

    def localist_attention_isas(self) -> list[str]:
        """The KV-cache layouts vLLM's CPU attention set on this rank's localist layers (``layer.isa``,
        assigned once the KV cache exists), for the audit's provenance."""
        layers = [m for m in self.model_runner.get_model().modules() if hasattr(m, "localist_layer")]
        return sorted({str(getattr(m, "isa", "unset")) for m in layers})


class LocalistWorkerError(RuntimeError):
    """The localist attention failed while serving the request; the worker ended it (the cause in str())."""


@dataclass
class RequestStats:
    """Per generated token (from ``since`` on) statistics [T, L, H, G] of the attention used."""

    log_mass: torch.Tensor
    mass: torch.Tensor
    inner_entropy: torch.Tensor
    num_tokens: int  # tokens with statistics so far (all of them, not only those returned)


def _to_stats(replies: list[dict[str, Any]], request_id: str) -> RequestStats:
    """One reply per worker, in rank order. Under tensor parallelism each rank holds a contiguous slice
    of every layer's heads, so the statistics are the ranks' [T, L, H_rank, G] joined along heads."""
    for reply in replies:
        if reply.get("failure"):
            raise LocalistWorkerError(reply["failure"])
        if reply.get("error"):
            raise BlockError(EXTRA_ARGS_KEY, f"request {request_id!r} ran without localist attention: {reply['error']}")
    num_tokens = min(int(reply.get("num_tokens", 0)) for reply in replies)
    tensors = {}
    for k in STATS_FIELDS:
        parts = [torch.frombuffer(bytearray(r[k]["data"]), dtype=torch.float32).view(r[k]["shape"])
                 for r in replies if r.get(k)]
        tensors[k] = torch.cat(parts, dim=2) if parts else torch.empty(0, 0, 0, 0)
    return RequestStats(**tensors, num_tokens=num_tokens)


async def fetch_stats(engine, request_id: str, *, since: int = 0, release: bool = False) -> RequestStats:
    """Statistics of request ``request_id`` (the id in its LocalistParams) from an ``AsyncLLM``.

    ``since`` skips tokens already fetched (streaming); ``release`` frees the worker's record —
    call it once per request, also for aborted ones.
    """
    replies = await engine.collective_rpc("localist_stats", args=(request_id, since, release))
    return _to_stats(replies, request_id)


def fetch_stats_sync(llm, request_id: str, *, since: int = 0, release: bool = False) -> RequestStats:
    """The same for an offline ``vllm.LLM``."""
    replies = llm.collective_rpc("localist_stats", args=(request_id, since, release))
    return _to_stats(replies, request_id)


# --------------------------------------------------------------------------------------------------
# Engine construction and prefix-cache salting.


def localist_architecture(model_dir: str | Path) -> str:
    """The registered localist class serving the checkpoint in ``model_dir``."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    if arch in ARCHITECTURES.values():
        return arch
    if arch not in ARCHITECTURES:
        raise ValueError(f"architectures: {arch!r} has no localist model class; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def engine_kwargs(model_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` serving ``model_dir`` as a localist model.

    Sets the architecture override (a stock Llama/Qwen2 checkpoint is served as localist), the
    worker extension for statistics and eager mode (the localist attention runs eagerly, outside
    torch.compile), and the checkpoint's own dtype: vLLM's "auto" downcasts float32 weights to
    bfloat16, and what is served and audited must be the weights as measured (a trained model's
    saturated heads answer differently in bfloat16). The state processor comes from the
    ``vllm.logits_processors`` entry point.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": str(config.get("dtype") or config.get("torch_dtype") or "auto"),
        "hf_overrides": {"architectures": [localist_architecture(model_dir)]},
        "worker_extension_cls": f"{__name__}.LocalistWorkerExtension",
        "enforce_eager": True,
        "enable_prefix_caching": True,
    }
    kwargs.update(overrides)
    return kwargs


def engine_args(model_dir: str | Path, **overrides: Any):
    """``AsyncEngineArgs`` for the server (``AsyncLLM.from_engine_args``)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(model_dir, **overrides))


def cache_salt(params: LocalistParams) -> str | None:
    """Prefix-cache salt (docs/theory.md §2): requests share cached K/V only with the same layout and per-layer ρ.

    With ρ = 0 on every layer the attention is the base model's whatever the layout, so such
    requests share with stock traffic (no salt).
    """
    if not any(r > 0 for r in params.rho):
        return None
    layout = [[int(s[0]), int(s[1]), int(bool(s[3])) if len(s) > 3 else 0] for s in params.blocks]
    key = json.dumps({"rho": params.rho, "layout": layout}, separators=(",", ":"))
    return "localist-" + hashlib.sha256(key.encode()).hexdigest()[:32]
