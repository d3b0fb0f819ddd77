"""Every KV-cache layout vLLM's CPU attention can pick on x86 (vec, vec16, amx), read back correctly.

The cache is written by vLLM's own op (``cpu_attn_reshape_and_cache``) with the layout forced, so
these tests exercise each layout whatever CPU runs them: the op that packs a cache for AMX tiles is
plain C++ and runs on any x86 host; only vLLM's AMX *attention* needs AMX, and localist never calls
it for a layout the host cannot run. Then: the reader returns exactly what was written (K and V,
bf16 and float32, GQA, head dims 64, 80, 128), the decode kernel and the prefill read the same
attention from every layout, and a wrong layout is an error, never silently wrong attention.
"""
from types import SimpleNamespace

import pytest
import torch
from vllm import _custom_ops as ops

from localist.model.kv_layout import LayoutError, PagedKV, require_supported

# (ISA, dtype, head dim, block size): every layout with each dtype vLLM writes it in.
LAYOUTS = [
    ("vec", torch.float32, 64, 32),
    ("vec", torch.bfloat16, 128, 128),
    ("vec16", torch.float32, 80, 16),
    ("vec16", torch.bfloat16, 80, 32),
    ("amx", torch.bfloat16, 64, 128),
    ("amx", torch.bfloat16, 128, 32),
]


def written_cache(isa: str, dtype, D: int, bs: int, nb: int = 6, Hkv: int = 2, seed: int = 0):
    """A cache filled through vLLM's write op in layout ``isa``, and the K/V [nb·bs, Hkv, D] written."""
    gen = torch.Generator().manual_seed(seed)
    n = nb * bs
    key = torch.randn(n, Hkv, D, generator=gen).to(dtype)
    value = torch.randn(n, Hkv, D, generator=gen).to(dtype)
    slots = torch.randperm(n, generator=gen)  # token t sits in slot slots[t]
    cache = torch.zeros(nb, Hkv, bs, 2 * D, dtype=dtype)
    key_cache, value_cache = cache.view(nb, Hkv, 2 * bs, D).chunk(2, dim=2)  # as vLLM's backend splits it
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    by_slot_k, by_slot_v = torch.empty_like(key), torch.empty_like(value)
    by_slot_k[slots], by_slot_v[slots] = key, value
    return PagedKV(cache, isa), key, value, slots, by_slot_k, by_slot_v


@pytest.mark.parametrize("isa, dtype, D, bs", LAYOUTS, ids=[f"{i}-{str(d)[6:]}-d{D}-b{b}" for i, d, D, b in LAYOUTS])
def test_reader_returns_what_vllm_wrote(isa, dtype, D, bs):
    cache, key, value, slots, by_slot_k, by_slot_v = written_cache(isa, dtype, D, bs)
    nb, Hkv = cache.cache.shape[:2]
    keys, values = cache.blocks(torch.arange(nb))  # [nb, Hkv, bs, D]
    assert torch.equal(keys.transpose(1, 2).reshape(-1, Hkv, D), by_slot_k)
    assert torch.equal(values.transpose(1, 2).reshape(-1, Hkv, D), by_slot_v)
    order = torch.tensor([4, 1, 5])  # one sequence's blocks, out of order, its last one partly filled
    length = 2 * bs + 3
    k_seq, v_seq = cache.tokens(order, length)
    seq_slots = (order[:, None] * bs + torch.arange(bs)).reshape(-1)[:length]
    assert torch.equal(k_seq, by_slot_k[seq_slots].transpose(0, 1))
    assert torch.equal(v_seq, by_slot_v[seq_slots].transpose(0, 1))
    cache.check(key, value, slots, "test")
    packed, table = cache.for_kernel(order.view(1, -1))  # what the split-KV kernel reads: K^T and V plain
    kt = packed[table[0], :, 0].unflatten(-1, (D, bs))
    vp = packed[table[0], :, 1].unflatten(-1, (bs, D))
    assert torch.equal(kt.transpose(-1, -2), keys[order]) and torch.equal(vp, values[order])


def test_a_wrong_layout_is_an_error():
    amx, key, value, slots, *_ = written_cache("amx", torch.bfloat16, 64, 32)
    as_vec = PagedKV(amx.cache, "vec")
    with pytest.raises(LayoutError, match="does not hold the K/V just written"):
        as_vec.check(key, value, slots, "model.layers.0.self_attn.attn")


def test_unreadable_caches_are_refused():
    with pytest.raises(LayoutError, match="kv_cache_dtype 'fp8'"):
        require_supported("vec", "fp8")
    with pytest.raises(LayoutError, match="'neon' KV-cache layout"):
        require_supported("neon", "auto")
    require_supported("amx", "auto")


def _layer(H, Hkv, D):
    from localist.model.vllm_engine import LocalistWorker, WorkerSettings
    from localist.model.vllm_model import LocalistAttentionLayer

    layer = LocalistAttentionLayer.__new__(LocalistAttentionLayer)
    torch.nn.Module.__init__(layer)
    layer.num_heads, layer.num_kv_heads, layer.head_size = H, Hkv, D
    layer.impl, layer.localist_layer, layer.worker = SimpleNamespace(scale=D ** -0.5), 0, LocalistWorker(1, WorkerSettings())
    return layer


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
def test_decode_reads_the_same_attention_from_every_layout(use_kernel):
    """The same bf16 K/V written as vec and as amx: the decode (compiled kernel and torch path) gives
    bit-identical outputs and statistics from both caches."""
    from localist.model.vllm_model import _Decode, paged_kernel

    kernel = paged_kernel()
    assert kernel is not None, "the kernel must build on this machine (g++ is part of the set-up)"
    H, Hkv, D, bs, G = 6, 2, 64, 32, 4
    vec, *_ = written_cache("vec", torch.bfloat16, D, bs, nb=8, Hkv=Hkv, seed=3)
    amx, *_ = written_cache("amx", torch.bfloat16, D, bs, nb=8, Hkv=Hkv, seed=3)
    layer = _layer(H, Hkv, D)
    seq_lens = torch.tensor([70, 33])
    block_index = torch.tensor([[5, 0, 7], [2, 6, 1]])
    block_ids = torch.full((2, 3 * bs), -1)
    block_ids[0, :70] = torch.tensor([0] + [1] * 30 + [2] * 39)
    block_ids[1, :33] = torch.tensor([0] + [1] * 10 + [3] * 22)
    pinned = torch.zeros(2, G, dtype=torch.bool)
    pinned[:, 0] = True
    q = torch.randn(2, H, D, generator=torch.Generator().manual_seed(5)).bfloat16()  # the engine's dtype
    results = []
    for cache in (vec, amx):
        d = _Decode(torch.arange(2), seq_lens, block_index, block_ids, pinned, torch.tensor([[0.7, 0.3]]),
                    keep=[(0, "x", 0, G)])
        out = torch.zeros(2, H, D, dtype=torch.bfloat16)
        if use_kernel:
            layer._decode_kernel(kernel, d, q, cache, out, 0)
        else:
            layer._decode(d, q, cache, out, 0)
        results.append((out, d.stats[0]))
    assert torch.isfinite(results[0][0]).all()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_chunked_prefill_reads_the_same_keys_from_every_layout():
    """A prefill chunk whose earlier tokens are already cached reads them back from the paged cache:
    the same from an amx cache as from a vec one."""
    from localist.model.vllm_model import _Prefill, _spans

    H, Hkv, D, bs = 4, 2, 64, 32
    vec, *_ = written_cache("vec", torch.bfloat16, D, bs, nb=5, Hkv=Hkv, seed=7)
    amx, *_ = written_cache("amx", torch.bfloat16, D, bs, nb=5, Hkv=Hkv, seed=7)
    layer = _layer(H, Hkv, D)
    S, cached = 90, 40
    block_index = torch.tensor([3, 0, 4])
    ids = torch.tensor([0] + [1] * 44 + [2] * 45)
    p = _Prefill(0, S - cached, S, block_index, ids, _spans(ids), torch.tensor([True, False, False]),
                 torch.tensor([0.8]), keep=None)
    fresh_k, fresh_v = vec.tokens(block_index, S)
    rows = [layer._row_kv(p, fresh_k.transpose(0, 1)[cached:], fresh_v.transpose(0, 1)[cached:], cache)
            for cache in (vec, amx)]
    assert torch.equal(rows[0][0], rows[1][0]) and torch.equal(rows[0][1], rows[1][1])
    assert torch.equal(rows[0][0], fresh_k) and torch.equal(rows[0][1], fresh_v)
