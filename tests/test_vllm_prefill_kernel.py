"""The compiled bf16 blockwise prefill (``block_prefill`` in model/vllm_kernel.cpp) against float32 oracles.

It replaces one torch flash call per semantic block in bf16 engines, so it is checked on its own
(per-block log-mass and output against a dense float32 computation) and inside the layer's prefill
(merged by the dial against :func:`localist.model.attention.localist_attention`): chunked prefill
(keys already cached), query chunks with blocks straddling their start, a one-token block, GQA,
pinned blocks, ρ = 1, blocks and query ranges longer than one kernel tile, and head dims that take
both of the kernel's P·V widths.
"""
from types import SimpleNamespace

import pytest
import torch

from localist.model.attention import localist_attention

NEG_INF = float("-inf")


def _kernel():
    from localist.model.vllm_model import paged_kernel

    kernel = paged_kernel()
    assert kernel is not None, "the kernel must build on this machine (g++ is part of the set-up)"
    if not hasattr(kernel, "block_prefill"):
        pytest.skip("this CPU has no AVX512-BF16: bf16 prefill runs through torch's flash kernel")
    return kernel


def _ids(S: int, cuts) -> torch.Tensor:
    ids = torch.zeros(S, dtype=torch.long)
    for c in cuts:
        ids[c:] += 1
    return ids


@pytest.mark.parametrize("T,S,H,Hkv,D", [(170, 170, 8, 2, 32), (53, 170, 8, 2, 96), (37, 180, 4, 4, 64)],
                         ids=["fresh-gqa", "chunked-gqa-d96", "chunked-mha"])
def test_block_partials_equal_dense_float32(T, S, H, Hkv, D):
    """Per block g and query i ≥ its start: L_g = logsumexp of the block's visible scores and o_g the
    block's own softmax output, for queries at positions S − T … S − 1 (earlier keys cached)."""
    from localist.model.vllm_model import _spans

    kernel = _kernel()
    torch.manual_seed(3)
    q = (torch.randn(T, H, D) * 2).bfloat16()
    k, v = torch.randn(Hkv, S, D).bfloat16(), torch.randn(Hkv, S, D).bfloat16()
    spans = _spans(_ids(S, [1, 9, 36, 41, 42, 150]))  # a one-token block, one over several key tiles
    G, P0, scale = len(spans) + 1, S - T, D ** -0.5  # plus an absent block
    got = kernel.block_prefill(q, k, v, *(list(x) for x in zip(*spans)), P0, G, scale)
    log_mass, parts = got[0], got[1:]

    scores = torch.einsum("thd,hsd->hts", q.float(), k.float().repeat_interleave(H // Hkv, 0)) * scale
    key, pos = torch.arange(S), torch.arange(P0, S)
    assert len(parts) == len(spans) and log_mass.shape == (G, H, T)
    assert torch.isinf(log_mass[G - 1]).all()
    for (g, a, b), part in zip(spans, parts):
        seen = ((key >= a) & (key < b)).unsqueeze(0) & (key.unsqueeze(0) <= pos.unsqueeze(1))  # [T, S]
        x = scores.masked_fill(~seen, NEG_INF)
        want_l = torch.logsumexp(x, -1)  # [H, T]
        first = max(a - P0, 0)
        assert torch.isinf(log_mass[g, :, :first]).all()
        assert torch.allclose(log_mass[g, :, first:], want_l[:, first:], atol=1e-4, rtol=1e-5)
        want_o = torch.einsum("hts,hsd->thd", torch.softmax(x[:, first:], -1),
                              v.float().repeat_interleave(H // Hkv, 0))
        assert part.shape == (T - first, H, D) and part.dtype == torch.bfloat16
        err = (part.float() - want_o).abs()
        assert err.max() < 3e-2 and err.mean() < 3e-3  # P and o rounded to bf16, as flash kernels do


@pytest.mark.parametrize("budget", [1 << 24, 3 * 8 * 8 * 64], ids=["one-chunk", "query-chunks"])
@pytest.mark.parametrize("cached", [0, 37], ids=["fresh", "chunked-prefill"])
def test_bf16_prefill_equals_oracle(monkeypatch, budget, cached):
    """The layer's bf16 prefill through block_prefill + dial_mass + merge_blocks == localist_attention
    in float32 on the same bf16 K/V, for ρ = 0.6, 1 and 0.95 with two pinned blocks."""
    import localist.model.vllm_model as vm
    from localist.model.kv_layout import PagedKV
    from localist.model.vllm_engine import LocalistWorker, WorkerSettings
    from localist.model.vllm_model import LocalistAttentionLayer, _Prefill, _spans

    kernel = _kernel()
    calls = []

    class Spy:  # the kernel, counting block_prefill calls (the fused path must be the one taken)
        def __getattr__(self, name):
            return getattr(kernel, name)

        def block_prefill(self, *args):
            calls.append(args[0].shape[0])
            return kernel.block_prefill(*args)

    monkeypatch.setattr(vm, "paged_kernel", lambda: Spy())
    torch.manual_seed(4)
    H, Hkv, D, bs, nb, S = 8, 2, 64, 16, 12, 160
    layer = LocalistAttentionLayer.__new__(LocalistAttentionLayer)
    torch.nn.Module.__init__(layer)
    layer.num_heads, layer.num_kv_heads, layer.head_size = H, Hkv, D
    # a budget of 3-query chunks: blocks start before, at and inside chunks
    layer.worker = LocalistWorker(1, WorkerSettings(prefill_budget=budget))
    layer.impl = SimpleNamespace(scale=D ** -0.5)
    cache = PagedKV(torch.randn(nb, Hkv, bs, 2 * D).bfloat16(), "vec")
    block_index = torch.randperm(nb)[:10]
    keys, values = cache.tokens(block_index, S)
    ids = _ids(S, [1, 9, 36, 41, 42, 140])  # block [42, 140) spans several key tiles
    G = 7 + 1
    pinned = torch.zeros(G, dtype=torch.bool)
    pinned[[0, 3]] = True
    Tq = S - cached
    q = (torch.randn(Tq, H, D) * 2).bfloat16()
    k_fresh, v_fresh = keys.transpose(0, 1)[cached:], values.transpose(0, 1)[cached:]
    cases = [(0.6, torch.zeros(G, dtype=torch.bool)), (1.0, torch.zeros(G, dtype=torch.bool)), (0.95, pinned)]
    for rho, pins in cases:
        calls.clear()
        rho_t = torch.full((1,), rho)
        p = _Prefill(0, Tq, S, block_index, ids, _spans(ids), pins, rho_t, keep=None)
        out = torch.zeros(Tq, H, D, dtype=torch.bfloat16)
        layer._prefill(p, q, k_fresh, v_fresh, cache, out, 0)
        assert sum(calls) == Tq and (len(calls) > 1) == (budget < Tq * H * G * D)
        visible = (torch.arange(S).unsqueeze(0) <= torch.arange(cached, S).unsqueeze(1)).unsqueeze(0)
        want, _ = localist_attention(q.float().transpose(0, 1)[None], keys.float()[None], values.float()[None],
                                     ids[None], rho_t, pins[None], D ** -0.5, key_visible=visible)
        err = (out.float() - want[0].transpose(0, 1)).abs()
        assert err.max() < 3e-2 and err.mean() < 3e-3, (rho, err.max(), err.mean())
