"""vLLM model classes with localist attention (docs/theory.md §2) over vLLM's paged KV cache.

``LocalistLlamaForCausalLM`` / ``LocalistQwen2ForCausalLM`` are vLLM's own Llama/Qwen2 classes —
same layers, same weight loading — whose attention layers are swapped for
:class:`LocalistAttentionLayer`. That layer keeps vLLM's KV-cache *write* (so the cache layout stays
vLLM's), then attends with the request's block ids, pinned blocks and this layer's ρ: decode through
the split-KV kernel (vllm_kernel.cpp), prefill through the blockwise kernel (bf16; otherwise one
fused SDPA call per semantic block); both merge the per-block outputs with
:func:`localist.model.attention.dial_mass`, the one definition of the dial, and
:func:`~localist.model.attention.localist_attention` stays the oracle (and, without a compiler,
computes the statistics of the query that produces a token). A batch with no localist request runs
vLLM's stock kernel untouched, and so does a prefill row whose ρ is 0 in a layer.

The per-step plan (which rows decode, which prefill, their block ids, ρ per layer, who produces a
token) is built once per forward pass from the attention metadata and the row table kept by
:class:`localist.model.vllm_engine.LocalistRowState`, and shared by all layers.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from vllm import envs
from vllm._custom_ops import cpu_attn_get_scheduler_metadata
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, _get_attn_isa

from localist.model.attention import NEG_INF, dial_mass, localist_attention, merge_block_partials
from localist.model.kv_layout import PagedKV, require_supported
from localist.model.vllm_engine import LocalistWorker, RequestState, worker_state

log = logging.getLogger(__name__)

@functools.cache
def paged_kernel():
    """The compiled split-KV kernel (vllm_kernel.cpp), built on first use and loaded once per process
    (a shared library); None → the pure-torch path."""
    try:
        from torch.utils.cpp_extension import load

        return load("localist_paged_kv", [str(Path(__file__).with_name("vllm_kernel.cpp"))],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler: stay correct, only slower
        log.warning("localist: paged kernel unavailable (%s); decoding with the pure-torch path", exc)
        return None


@dataclass
class _Decode:
    """All rows with one query this step, attended together over their padded paged K/V."""

    query_index: torch.Tensor  # [R] positions of the rows' queries in the flat batch
    seq_lens: torch.Tensor  # [R]
    block_index: torch.Tensor  # [R, nblk] cache blocks
    block_ids: torch.Tensor  # [R, nblk * block_size] (−1 past the sequence)
    pinned: torch.Tensor  # [R, G]
    rho: torch.Tensor  # [L, R]
    keep: list[tuple[int, str, int, int]]  # (row in group, request id, token index, G)
    stats: list[torch.Tensor] = field(default_factory=list)  # per layer [3, R, H, G]
    # Derived once per step for every layer's kernel call (see __post_init__).
    rows: slice | torch.Tensor = field(init=False)  # the rows' queries in the flat batch (a slice when consecutive)
    layer_rho: list = field(init=False)  # per layer: one float for all rows, or [R, 1, 1]
    pinned_view: torch.Tensor = field(init=False)  # [R, 1, 1, G]

    def __post_init__(self) -> None:
        """The rows as a slice when they are consecutive (views instead of gathers), ρ per layer as
        one float when all rows share it (the dial's cheaper path), the pinned flags in the merge's shape."""
        idx = self.query_index.tolist()
        consecutive = idx == list(range(idx[0], idx[0] + len(idx)))
        self.rows = slice(idx[0], idx[-1] + 1) if consecutive else self.query_index
        R, G = self.pinned.shape
        self.layer_rho = [r[0] if len(set(r)) == 1 else torch.tensor(r).view(R, 1, 1) for r in self.rho.tolist()]
        self.pinned_view = self.pinned.view(R, 1, 1, G)


@dataclass
class _Prefill:
    """One row with several queries (a prompt or a chunk of one), attended on its own."""

    query_start: int
    query_len: int
    seq_len: int
    block_index: torch.Tensor  # [nblk]
    block_ids: torch.Tensor  # [seq_len]
    spans: list[tuple[int, int, int]]  # (block, start, end) of each block's key span, in order
    pinned: torch.Tensor  # [G]
    rho: torch.Tensor  # [L]
    keep: tuple[str, int] | None  # (request id, token index) when its last query produces a token
    stats: list[torch.Tensor] = field(default_factory=list)  # per layer [3, H, G]
    stock: CPUAttentionMetadata | None = None  # this row alone for vLLM's kernel (ρ = 0 layers), made once


@dataclass
class _Plan:
    worker: LocalistWorker
    states: list[RequestState]  # the localist requests of this step
    decode: _Decode | None = None
    prefills: list[_Prefill] = field(default_factory=list)
    failed: bool = False  # the localist path raised: the rest of the step runs vLLM's own kernel

    def fail(self, message: str) -> None:
        """End every localist request of the step (the worker forces their stop token), keep the cause."""
        log.error("localist: %s; ending %d localist request(s) of this step", message, len(self.states))
        message = message if len(message) <= 500 else message[:497] + "..."  # an exception may print whole tensors
        for state in self.states:
            self.worker.fail(state, message)
        self.failed = True


def _row_inputs(state: RequestState | None, seq_len: int, num_layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block ids, pinned flags and ρ per layer of one row; a stock row is one block at ρ = 0."""
    if state is None:
        return (torch.zeros(seq_len, dtype=torch.int64), torch.zeros(1, dtype=torch.bool),
                torch.zeros(num_layers, dtype=torch.float32))
    return state.block_ids(seq_len), state.pinned, state.rho


def _token_index(state: RequestState | None, seq_len: int) -> int | None:
    """Output token produced by the query at position seq_len − 1, if the request keeps statistics.

    That query produces output token seq_len − P (P = prompt length) whenever seq_len ≥ P: the first
    token after a full prefill, each decode step, and the recomputed step after a preemption.
    """
    if state is None or not state.keep_stats or seq_len < state.prompt_len:
        return None
    return seq_len - state.prompt_len


def _spans(block_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(block, start, end) of each run of equal block ids; blocks are contiguous (BlockTable.validate)."""
    ids, counts = torch.unique_consecutive(block_ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    spans = [(g, a, b) for g, a, b in zip(ids.tolist(), [0] + ends[:-1], ends)]
    if len({g for g, _, _ in spans}) != len(spans):
        raise ValueError("localist: a block's tokens are not contiguous")
    return spans


def _build_plan(worker: LocalistWorker, meta, block_size: int) -> _Plan | None:
    """The step's plan; None when no localist request is in the batch (a request whose localist path
    failed runs as stock until its forced stop token ends it)."""
    num_reqs = meta.seq_lens.shape[0]
    rows = {r: state for r, state in worker.rows.items() if r < num_reqs and state.failed is None}
    if not rows:
        return None
    plan = _Plan(worker, list(rows.values()))
    try:
        plan.decode, plan.prefills = _row_work(meta, rows, block_size, worker.num_layers)
    except Exception as exc:  # noqa: BLE001 — whatever it is, it must not reach the engine loop
        plan.fail(f"localist could not plan the step: {type(exc).__name__}: {exc}")
    return plan


def _row_work(meta, rows: dict[int, RequestState], block_size: int, num_layers: int
              ) -> tuple[_Decode | None, list[_Prefill]]:
    """The decode group and the prefill rows of one step, from vLLM's metadata and the row table."""
    num_reqs = meta.seq_lens.shape[0]
    qsl = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    decode_rows = [r for r in range(num_reqs) if qsl[r + 1] - qsl[r] == 1]
    prefills = []
    for r in range(num_reqs):
        qlen = qsl[r + 1] - qsl[r]
        if qlen <= 1:
            continue
        state, seq_len = rows.get(r), seq_lens[r]
        ids, pinned, rho = _row_inputs(state, seq_len, num_layers)
        nblk = math.ceil(seq_len / block_size)
        token = _token_index(state, seq_len)
        prefills.append(_Prefill(
            qsl[r], qlen, seq_len, meta.block_table[r, :nblk].long(), ids, _spans(ids), pinned, rho,
            (state.request_id, token) if token is not None else None,
        ))
    decode = None
    if decode_rows:
        nblk = math.ceil(max(seq_lens[r] for r in decode_rows) / block_size)
        inputs = [_row_inputs(rows.get(r), seq_lens[r], num_layers) for r in decode_rows]
        G = max(p.numel() for _, p, _ in inputs)
        block_ids = torch.full((len(decode_rows), nblk * block_size), -1, dtype=torch.int64)
        pinned = torch.zeros(len(decode_rows), G, dtype=torch.bool)
        keep = []
        for i, (r, (ids, pin, _)) in enumerate(zip(decode_rows, inputs)):
            block_ids[i, : ids.numel()] = ids
            pinned[i, : pin.numel()] = pin
            token = _token_index(rows.get(r), seq_lens[r])
            if token is not None:
                keep.append((i, rows[r].request_id, token, pin.numel()))
        rows_t = torch.tensor(decode_rows)
        decode = _Decode(
            query_index=torch.tensor([qsl[r] for r in decode_rows]),
            seq_lens=torch.tensor([seq_lens[r] for r in decode_rows]),
            block_index=meta.block_table[rows_t, :nblk].long(),
            block_ids=block_ids,
            pinned=pinned,
            rho=torch.stack([rho for _, _, rho in inputs], 1),
            keep=keep,
        )
    return decode, prefills


def _flush(plan: _Plan) -> None:
    """After the last layer: hand each produced token's [L, H, G] statistics to the store."""
    if plan.decode is not None and plan.decode.keep:
        stacked = torch.stack(plan.decode.stats, 2)  # [3, R, L, H, G]
        for i, request_id, token, G in plan.decode.keep:
            row = stacked[:, i, :, :, :G].clone()
            plan.worker.add_token_stats(request_id, token, row[0], row[1], row[2])
    for p in plan.prefills:
        if p.keep is not None:
            stacked = torch.stack(p.stats, 1)  # [3, L, H, G]
            plan.worker.add_token_stats(p.keep[0], p.keep[1], stacked[0], stacked[1], stacked[2])


class LocalistAttentionLayer(Attention):
    """vLLM's ``Attention`` with localist attention for batches that hold localist requests."""

    localist_layer: int
    worker: LocalistWorker  # the engine's worker state (set when the layer is made localist)

    def forward(self, query, key, value, output_shape=None, output_dtype=None):
        context = get_forward_context()
        meta = context.attn_metadata
        meta = meta.get(self.layer_name) if isinstance(meta, dict) else None
        if meta is None:
            return super().forward(query, key, value, output_shape, output_dtype)
        if self.worker.step[0] is not context:  # the first layer of a step plans it for all layers
            self.worker.step = (context, _build_plan(self.worker, meta, self.kv_cache.shape[2]))
        plan: _Plan | None = self.worker.step[1]
        if plan is None or plan.failed:
            return super().forward(query, key, value, output_shape, output_dtype)
        try:
            return self._localist_forward(plan, meta, query, key, value, output_dtype)
        except Exception as exc:  # noqa: BLE001 — one failure ends its requests, never the engine
            plan.fail(f"localist attention failed in layer {self.layer_name}: {type(exc).__name__}: {exc}")
            return super().forward(query, key, value, output_shape, output_dtype)

    def _localist_forward(self, plan: _Plan, meta, query, key, value, output_dtype):
        if any(state.inject_fault for state in plan.states):
            raise RuntimeError("localist: injected fault (LOCALIST_FAULT_LABEL)")
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        q = query.view(-1, H, D)
        k, v = key.view(-1, Hkv, D), value.view(-1, Hkv, D)
        unified_kv_cache_update(k, v, self.layer_name)  # vLLM's own write: the layout stays vLLM's
        cache = PagedKV(self.kv_cache, self.isa)
        if self.localist_layer == 0:  # once per step: the cache holds what vLLM was asked to write
            n = meta.num_actual_tokens
            cache.check(k[:n], v[:n], meta.slot_mapping, self.layer_name)

        out = torch.zeros(q.shape, dtype=output_dtype or query.dtype, device=query.device)
        layer = self.localist_layer
        if plan.decode is not None:
            kernel = self._kernel()
            if kernel is not None:
                self._decode_kernel(kernel, plan.decode, q, cache, out, layer)
            else:
                self._decode(plan.decode, q, cache, out, layer)
        for p in plan.prefills:
            self._prefill(p, q, k, v, cache, out, layer)
        if layer == self.worker.num_layers - 1:
            _flush(plan)
        return out.view(q.shape[0], H * D)

    def _kernel(self):
        """The compiled kernel, unless this engine runs the pure-torch path (LOCALIST_KERNEL=0)."""
        return paged_kernel() if self.worker.settings.use_kernel else None

    def _decode(self, d: _Decode, q, cache: PagedKV, out, layer: int) -> None:
        R, nblk = d.block_index.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        g = H // Hkv
        keys, values = (x.transpose(1, 2).reshape(R, Hkv, -1, D) for x in cache.blocks(d.block_index))  # [R, Hkv, T, D]
        queries = q[d.query_index].view(R, Hkv, g, D)  # grouped heads share their K/V (no repeat)
        visible = (d.block_ids >= 0).unsqueeze(1).expand(R, g, -1)
        o, st = localist_attention(
            queries, keys, values, d.block_ids, d.rho[layer], d.pinned, self.impl.scale, key_visible=visible,
        )
        out[d.query_index] = o.reshape(R, H, D).to(out.dtype)
        if d.keep:
            d.stats.append(torch.stack([st.log_mass, st.mass, st.inner_entropy]).view(3, R, H, -1))

    def _decode_kernel(self, kernel, d: _Decode, q, cache: PagedKV, out, layer: int) -> None:
        """One pass over the paged cache in C++ (per-block partials), merged by the dial in Python."""
        R, G = d.pinned.shape
        H, D = self.num_heads, self.head_size
        log_mass, inner_entropy, partial = self._block_partials(
            kernel, cache, q[d.rows], d.block_index, d.seq_lens, d.block_ids, G)
        merged, mass = merge_block_partials(partial, log_mass, d.layer_rho[layer], d.pinned_view, finite=True)
        out[d.rows] = merged.view(R, H, D)
        if d.keep:
            d.stats.append(torch.stack([log_mass, mass, inner_entropy]).view(3, R, H, G))

    def _block_partials(self, kernel, cache: PagedKV, queries, block_index, seq_lens, block_ids, G: int):
        """The split-KV kernel over this layer's paged cache for R rows of one query each ([R, H, D]):
        per block the log-mass, the inner entropy and the block's own output."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        kv, table = cache.for_kernel(block_index)
        return kernel.block_partials(queries.reshape(-1, Hkv, H // Hkv, D).float().contiguous(), kv, table,
                                     seq_lens, block_ids, G, float(self.impl.scale))

    def _prefill(self, p: _Prefill, q, k, v, cache: PagedKV, out, layer: int) -> None:
        rows = q[p.query_start: p.query_start + p.query_len]  # [Tq, H, D]
        rho = p.rho[layer]
        # The row's K/V, only where something reads them besides vLLM's kernel or ours over the cache.
        kv = self._row_kv(p, k, v, cache) if float(rho) != 0.0 or self._kernel() is None else None
        if float(rho) == 0.0:
            # ρ = 0 is the base attention: vLLM's own CPU attention for this row (the stock computation;
            # docs/theory.md §8: ρ = 0 pays only the metrics).
            self.impl.forward(self, rows, None, None, self.kv_cache, self._stock_metadata(p),
                              out[p.query_start: p.query_start + p.query_len])
        else:
            self._prefill_blocks(p, rows, *kv, rho, out)
        if p.keep is not None:
            p.stats.append(self._last_query_stats(p, rows[-1], cache, kv, rho))

    def _row_kv(self, p: _Prefill, k, v, cache: PagedKV) -> tuple[torch.Tensor, torch.Tensor]:
        """The row's keys and values [Hkv, S, D]: the fresh ones, or read back from the paged cache
        when earlier chunks of the prompt are cached."""
        S = p.seq_len
        if S == p.query_len:  # nothing cached before this chunk: the fresh K/V are all the keys
            return k[p.query_start: p.query_start + S].transpose(0, 1), v[p.query_start: p.query_start + S].transpose(0, 1)
        return cache.tokens(p.block_index, S)

    def _stock_metadata(self, p: _Prefill) -> CPUAttentionMetadata:
        """vLLM's CPU attention metadata for this row alone (made by the first ρ = 0 layer of the step)."""
        if p.stock is None:
            qsl = torch.tensor([0, p.query_len], dtype=torch.int32)
            seq_lens = torch.tensor([p.seq_len], dtype=torch.int32)
            schedule = cpu_attn_get_scheduler_metadata(
                num_reqs=1, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
                seq_lens=seq_lens, dtype=self.kv_cache.dtype, query_start_loc=qsl, causal=True,
                sliding_window_size=self.impl.sliding_window, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
            p.stock = CPUAttentionMetadata(
                num_actual_tokens=p.query_len, max_query_len=p.query_len, query_start_loc=qsl, max_seq_len=p.seq_len,
                seq_lens=seq_lens, block_table=p.block_index[None].int(), slot_mapping=None,
                scheduler_metadata=schedule)
        return p.stock

    def _prefill_blocks(self, p: _Prefill, rows, keys, values, rho, out) -> None:
        """ρ > 0: per semantic block ordinary causal attention over its keys alone, merged by the dial.

        Blocks are contiguous key spans and attention is causal, so block [a, b) is seen by the
        queries at positions ≥ a (a query inside the block sees its keys up to itself, a later one
        all of them): that gives the block's own output o_g and log-mass L_g per query. π^ρ comes
        from ``dial_mass`` and the output is Σ_g π^ρ_g o_g (docs/theory.md §2 form 2); queries before a block
        leave its L_g at −inf (mass 0). In bf16 the compiled ``block_prefill`` does all blocks in one
        call (torch's CPU flash kernel, one call per block, was ~2× slower than vLLM's attention);
        otherwise one fused SDPA call per block, where a block that starts before the query chunk
        is split at the chunk start and its two halves merged by log-sum-exp. Queries are chunked
        so the partials stay bounded.
        """
        H, D = self.num_heads, self.head_size
        G, first_pos, scale = p.pinned.numel(), p.seq_len - p.query_len, self.impl.scale
        sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        kernel = self._kernel() if out.is_contiguous() else None
        fused = (kernel is not None and hasattr(kernel, "block_prefill") and rows.dtype == keys.dtype == torch.bfloat16
                 and D % 32 == 0)  # the kernel's P·V widths
        q_all, k_all, v_all = rows.transpose(0, 1)[None], keys[None], values[None]  # [1, H(kv), T, D]
        span_g, span_a, span_b = (list(x) for x in zip(*p.spans))
        chunk = max(1, self.worker.settings.prefill_budget // (H * G * D))
        for c0 in range(0, p.query_len, chunk):
            c1 = min(c0 + chunk, p.query_len)
            P0, P1 = first_pos + c0, first_pos + c1  # positions of the chunk's queries
            parts = []  # (block, first query, its output [n_g, H, D])
            if fused:
                log_mass, *outs = kernel.block_prefill(rows[c0:c1], keys, values, span_g, span_a, span_b, P0, G, scale)
                parts = [(g, max(a - P0, 0), o) for (g, a, _), o in zip(p.spans, outs)]
            else:
                qc = q_all[:, :, c0:c1]
                log_mass = torch.full((G, H, c1 - c0), NEG_INF)  # blocks first: what dial_mass works in
                for g, a, b in p.spans:
                    if a >= P1:
                        break
                    kg, vg = k_all[:, :, a:b], v_all[:, :, a:b]
                    if b <= P0:  # wholly before the chunk: every query sees all of it
                        i, (o, lse) = 0, sdpa(qc, kg, vg, 0.0, False, scale=scale)
                    elif a >= P0:  # starts inside the chunk
                        i, (o, lse) = a - P0, sdpa(qc[:, :, a - P0:], kg, vg, 0.0, True, scale=scale)
                    else:  # straddles the chunk start: keys before P0 unmasked, keys from P0 causal
                        o1, l1 = sdpa(qc, kg[:, :, : P0 - a], vg[:, :, : P0 - a], 0.0, False, scale=scale)
                        o2, l2 = sdpa(qc, kg[:, :, P0 - a:], vg[:, :, P0 - a:], 0.0, True, scale=scale)
                        i, lse = 0, torch.logaddexp(l1, l2)
                        o = o1 * (l1 - lse).exp().unsqueeze(-1) + o2 * (l2 - lse).exp().unsqueeze(-1)
                    log_mass[g, :, i:] = lse[0]
                    parts.append((g, i, o[0].transpose(0, 1)))
            mass = dial_mass(log_mass.movedim(0, -1), rho, p.pinned).movedim(-1, 0)  # [G, H, n]
            target = out[p.query_start + c0: p.query_start + c1]
            if kernel is not None:  # Σ_g π^ρ_g o_g in one pass, written once
                kernel.merge_blocks([o for _, _, o in parts], [i for _, i, _ in parts], [g for g, _, _ in parts],
                                    mass.contiguous(), target)
                continue
            merged = torch.zeros(c1 - c0, H, D)
            for g, i, o in parts:
                merged[i:].addcmul_(o, mass[g, :, i:].t().unsqueeze(-1))
            target.copy_(merged)

    def _last_query_stats(self, p: _Prefill, query, cache: PagedKV, kv, rho) -> torch.Tensor:
        """[3, H, G] statistics of the row's last query (the one that produces a token).

        Through the split-KV kernel over the paged cache (vLLM has written this chunk's K/V before
        attention), as a decode query's, with π^ρ from ``dial_mass``; the oracle without a kernel.
        """
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        g, G = H // Hkv, p.pinned.numel()
        kernel = self._kernel()
        if kernel is not None:
            log_mass, inner_entropy, _ = self._block_partials(
                kernel, cache, query[None], p.block_index[None], torch.tensor([p.seq_len]), p.block_ids[None], G)
            mass = dial_mass(log_mass, rho, p.pinned)
            return torch.stack([log_mass, mass, inner_entropy]).view(3, H, G)
        visible = torch.ones(1, g, p.seq_len, dtype=torch.bool)  # the last query sees every key
        _, st = localist_attention(
            query.view(1, Hkv, g, D), kv[0][None], kv[1][None], p.block_ids[None], rho.view(1),
            p.pinned[None], self.impl.scale, key_visible=visible,
        )
        return torch.stack([st.log_mass, st.mass, st.inner_entropy]).view(3, H, -1)


def check_attention(layer: Attention, max_model_len: int) -> None:
    """Refuse, at engine start, a layer whose attention is not the plain causal softmax the dial
    reshapes (docs/theory.md §2): a sliding window shorter than the context, ALiBi, a logit soft cap,
    sinks, a KV cache shared with another layer, V of another head size. Read from vLLM's own layer."""
    impl, window = layer.impl, getattr(layer.impl, "sliding_window", -1)
    if window is not None and 0 < window < max_model_len:
        raise ValueError(f"{layer.layer_name}: a sliding window of {window} tokens; localist attention reads "
                         f"every key of the context — serve with --max-model-len {window} or less")
    refusals = {
        f"vLLM's {type(layer).__name__}, not its plain Attention": type(layer) is not Attention,
        "ALiBi slopes": getattr(impl, "alibi_slopes", None) is not None,
        "a logit soft cap": bool(getattr(impl, "logits_soft_cap", 0)),
        "attention sinks": getattr(impl, "sinks", None) is not None,
        "a KV cache shared with another layer": layer.kv_sharing_target_layer_name is not None,
        "a value head size unlike the key's": layer.head_size_v != layer.head_size,
        f"attention type {layer.attn_type}": layer.attn_type != AttentionType.DECODER,
    }
    found = [what for what, present in refusals.items() if present]
    if found:
        raise ValueError(f"{layer.layer_name}: {', '.join(found)}; localist attention takes over plain causal "
                         "softmax attention only")


def _localize(model: torch.nn.Module, vllm_config) -> None:
    """Swap every vLLM attention layer of ``model`` for the localist one (weights untouched)."""
    if not vllm_config.model_config.enforce_eager:
        raise ValueError("enforce_eager: localist models run their attention eagerly; start vLLM with enforce_eager=True")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("pipeline_parallel_size: localist collects every layer's statistics in one worker per "
                         "rank; use tensor parallelism (--tensor-parallel-size) instead")
    cache_config, max_model_len = vllm_config.cache_config, vllm_config.model_config.max_model_len
    worker = worker_state(vllm_config)
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no vLLM attention layer to make localist")
    for module in layers:
        check_attention(module, max_model_len)
        # the KV-cache layout vLLM's CPU attention will pick for this layer (it sets layer.isa later)
        isa = _get_attn_isa(vllm_config.model_config.dtype, cache_config.block_size, module.head_size,
                            cache_config.cache_dtype)
        require_supported(isa, cache_config.cache_dtype)
        module.__class__ = LocalistAttentionLayer
        module.localist_layer = extract_layer_index(module.layer_name)
        module.worker = worker
    if worker.settings.use_kernel:
        paged_kernel()  # build (first start on a host) or load it now, not on the first request


def localist_class(base: type) -> type:
    """vLLM's own model class ``base`` — same layers, same weight loading — with localist attention."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        _localize(self, vllm_config)

    doc = f"{base.__name__} with localist attention; loads any checkpoint vLLM's {base.__name__} loads."
    return type(f"Localist{base.__name__}", (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


# One class per architecture of vllm_engine.ARCHITECTURES, each tested against the reference model.
LocalistLlamaForCausalLM = localist_class(LlamaForCausalLM)
LocalistMistralForCausalLM = localist_class(MistralForCausalLM)
LocalistQwen2ForCausalLM = localist_class(Qwen2ForCausalLM)
LocalistQwen3ForCausalLM = localist_class(Qwen3ForCausalLM)
