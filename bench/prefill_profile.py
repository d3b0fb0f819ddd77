"""One layer's prefill attention, localist vs stock vLLM, outside the engine.

The bench model's head config (12 heads × 64, bf16, vLLM's CPU cache of 128-token blocks) and the
bench's 8-block layout at ρ = 0.5. Stock is vLLM's ``cpu_attention_with_kv_cache`` over the same
paged cache; localist is ``LocalistAttentionLayer._prefill`` (what the engine runs per row and
layer), broken down by torch.profiler into its ops. Tells where the TTFT gap of bench_vllm.py goes.

    .venv/bin/python bench/prefill_profile.py [--tokens 512 2048] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from types import SimpleNamespace
from unittest import mock

import torch

H = HKV = 12
D, BS = 64, 128


def setup(n: int):
    """A localist layer over a paged bf16 cache holding one fresh n-token prompt, and its plan row."""
    from vllm.v1.attention.backends import cpu_attn

    from localist.model.blocks import LocalistParams
    import vllm._custom_ops as ops

    from localist.model.kv_layout import PagedKV
    from localist.model.vllm_engine import LocalistWorker, WorkerSettings, parse_request
    from localist.model.vllm_model import LocalistAttentionLayer, _Prefill, _spans

    from bench_vllm import dial, layout

    torch.manual_seed(0)
    nblk = -(-n // BS)
    layer = LocalistAttentionLayer.__new__(LocalistAttentionLayer)
    torch.nn.Module.__init__(layer)
    layer.num_heads, layer.num_kv_heads, layer.head_size = H, HKV, D
    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))  # all the constructor reads
    with mock.patch.object(cpu_attn, "get_current_vllm_config", lambda: config):
        layer.impl = cpu_attn.CPUAttentionBackendImpl(H, D, D ** -0.5, HKV, None, None, "auto")
    layer.isa, layer._k_scale_float, layer._v_scale_float = "vec", 1.0, 1.0
    layer.localist_layer, layer.worker = 0, LocalistWorker(12, WorkerSettings())
    layer.kv_cache = torch.zeros(nblk + 3, HKV, BS, 2 * D, dtype=torch.bfloat16)
    q, k, v = (torch.randn(n, h, D).to(torch.bfloat16) for h in (H, HKV, HKV))
    block_index = torch.arange(nblk) + 1
    slots = (block_index.repeat_interleave(BS) * BS + torch.arange(BS).repeat(nblk))[:n]
    key_cache, value_cache = layer.kv_cache.view(-1, HKV, 2 * BS, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, layer.isa)  # vLLM's own write
    state = parse_request({"localist": LocalistParams(dial(0, 12), layout(n, 0), "p").to_json()}, list(range(n)), 12)
    ids = state.block_ids(n)
    p = _Prefill(0, n, n, block_index, ids, _spans(ids), state.pinned, state.rho, keep=("p", 0))
    return layer, p, q, k, v, PagedKV(layer.kv_cache, layer.isa), slots


def stock(layer, q, slots, n: int):
    """vLLM's CPU attention for the same prompt: a closure over its scheduler metadata."""
    import vllm._custom_ops as ops

    qsl, sl = torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    block_table = (slots[::BS] // BS).view(1, -1).int()
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=H, num_kv_heads=HKV, head_dim=D, seq_lens=sl, dtype=torch.bfloat16,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False)
    kv = layer.kv_cache.view(layer.kv_cache.shape[0], HKV, BS * 2, -1)
    key_cache, value_cache = kv.chunk(2, dim=2)
    out = torch.empty(n, H, D, dtype=torch.bfloat16)

    def run():
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl, seq_lens=sl,
            scale=D ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
            scheduler_metadata=meta, s_aux=None)
        return out
    return run


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's op table per config")
    args = ap.parse_args()
    from localist.model.vllm_model import paged_kernel

    paged_kernel()
    for n in args.tokens:
        layer, p, q, k, v, cache, slots = setup(n)
        reps = 20 if n <= 512 else 5

        def localist():
            p.stats.clear()
            out = torch.zeros(n, H, D, dtype=torch.bfloat16)
            layer._prefill(p, q, k, v, cache, out, 0)
            return out

        base = dataclasses.replace(p, rho=torch.zeros_like(p.rho), stats=[])  # the same row at ρ = 0

        def rho0():
            base.stats.clear()
            out = torch.zeros(n, H, D, dtype=torch.bfloat16)
            layer._prefill(base, q, k, v, cache, out, 0)
            return out

        def stats_only():
            p.stats.clear()
            layer._last_query_stats(p, q[-1], cache, None, p.rho[0])

        for threads in args.threads:
            torch.set_num_threads(threads)
            st = stock(layer, q, slots, n)  # vLLM's schedule is made for the thread count
            base.stock = None  # so is the ρ = 0 row's
            err = (localist().float() - st().float()).abs().max().item()  # ρ = 0.5: only the same scale
            print(f"{n} tokens, {threads} thread(s): stock {best_ms(st, reps):.2f} ms, localist "
                  f"{best_ms(localist, reps):.2f} ms (of which last-query stats {best_ms(stats_only, reps):.2f} ms), "
                  f"localist at ρ = 0 {best_ms(rho0, reps):.2f} ms; "
                  f"|localist − stock| max {err:.2f}", flush=True)
            if args.profile:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        localist()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
