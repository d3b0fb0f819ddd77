"""The localist model inside vLLM: stock equality, reference equality, mixed batches, metrics.

One float32 engine for the whole module (tiny random Llama, GQA, 3 layers). Its scheduler takes at
most 48 tokens per step, so prompts longer than that are prefilled in chunks: the tests below cover
single-pass prefill, chunked prefill and decode. Everything is compared with
:class:`localist.model.reference.ReferenceLM` (HF modelling code + the same attention maths).
"""
import gc
import json
import math
import os
import random

import pytest
import torch

from localist.model.attention import dial_mass
from localist.model.blocks import BlockError, LocalistParams
from localist.model.reference import ReferenceLM
from localist.model.tiny import make_tiny_checkpoint
from localist.model.vllm_engine import (
    LocalistRowState, LocalistWorker, WorkerSettings, cache_salt, engine_kwargs, fetch_stats_sync,
)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Small query chunks inside each prefill row (4096 partial elements: a few queries with 4 heads of 32
# and ~8 blocks; the worker inherits the environment), so that blocks straddling a chunk occur in the
# engine too, not only under vLLM's own chunked prefill.
os.environ["LOCALIST_PREFILL_BUDGET"] = "4096"
FAULT_LABEL = "inject-fault"
os.environ["LOCALIST_FAULT_LABEL"] = FAULT_LABEL  # the engine raises in the attention for blocks so labelled
NUM_LAYERS = 3
MAX_TOKENS = 8
CHUNK = 48  # scheduler token budget per step: longer prompts are prefilled in chunks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), arch="llama", num_layers=NUM_LAYERS,
                                initializer_range=0.2, seed=1)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(**engine_kwargs(
        checkpoint, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
        enable_chunked_prefill=True, max_num_batched_tokens=CHUNK, max_num_seqs=16, seed=0,
    ))
    yield engine
    del engine
    gc.collect()


@pytest.fixture(scope="module")
def ref(checkpoint):
    return ReferenceLM.from_pretrained(checkpoint)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(5, 400) for _ in range(n - 1)]


def layout(n: int, seed: int) -> list[list]:
    """A few rule/document spans over a prompt of n tokens (bare spans, as under plain vllm serve)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(2, n - 1), 4))
    return [[cuts[0], cuts[1], "rule"], [cuts[1], cuts[2], "document", 0, 1], [cuts[2], cuts[3], "rule", 1]]


def sampling(params: LocalistParams | None, max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    extra = {"localist": params.to_json()} if params is not None else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)


def run(llm, requests):
    """requests: list of (prompt ids, LocalistParams | None) → generated token ids per request.

    Prompts carry the cache salt, as the server sends them (prefix caching is on).
    """
    prompts = []
    for ids, lp in requests:
        salt = cache_salt(lp) if lp is not None else None
        prompts.append({"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})})
    outs = llm.generate(prompts, [sampling(lp) for _, lp in requests], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def reference(ref, ids, params: LocalistParams):
    table = params.table(len(ids))
    table.token_ids = list(ids)
    return ref.generate(table, params.rho, MAX_TOKENS, stop_at_eos=False)


def rho_for(value) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [float(value)] * NUM_LAYERS


def test_rho0_equals_stock_vllm(llm):
    """Requests without localist data run vLLM's stock kernel; ρ = 0 requests the localist path."""
    prompts = [prompt(n, s) for s, n in enumerate([12, 30, 70, 130])]
    stock = run(llm, [(p, None) for p in prompts])
    dialled = run(llm, [(p, LocalistParams(rho_for(0.0), layout(len(p), i), f"z{i}")) for i, p in enumerate(prompts)])
    assert dialled == stock
    for i in range(len(prompts)):
        fetch_stats_sync(llm, f"z{i}", release=True)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, 1.0, [0.0, 0.8, 0.95]], ids=str)
@pytest.mark.parametrize("n", [30, 150], ids=["prefill", "chunked"])
def test_matches_reference(llm, ref, rho, n):
    ids = prompt(n, n)
    params = LocalistParams(rho_for(rho), layout(n, 7), f"ref-{n}-{rho}")
    tokens = run(llm, [(ids, params)])[0]
    want_tokens, want = reference(ref, ids, params)
    assert tokens == want_tokens
    got = fetch_stats_sync(llm, params.request_id, release=True)
    assert got.mass.shape == want.mass.shape == (MAX_TOKENS, NUM_LAYERS, 4, params.table(n).num_blocks)
    assert torch.allclose(got.mass, want.mass, atol=1e-3)
    assert torch.allclose(got.inner_entropy, want.inner_entropy, atol=1e-3)
    finite = torch.isfinite(want.log_mass)
    assert torch.equal(finite, torch.isfinite(got.log_mass))
    assert torch.allclose(got.log_mass[finite], want.log_mass[finite], atol=1e-3)


def test_a_failing_request_is_ended_and_the_engine_keeps_serving(llm):
    """An exception in the localist path (the test switch raises for a labelled block) ends the
    localist requests of that step with their stop token and a failure naming the cause; stock rows
    of the same step and every later request are served as before."""
    from vllm import SamplingParams

    from localist.model.vllm_engine import LocalistWorkerError

    ids, stock_ids = prompt(40, 5), prompt(50, 6)
    spans = layout(40, 3)
    spans[0] = spans[0] + [0, 0, FAULT_LABEL]  # [start, end, kind, pinned, evidence, label]
    marked = LocalistParams(rho_for(0.5), spans, "marked")
    eos = llm.get_tokenizer().eos_token_id
    stock_alone = run(llm, [(stock_ids, None)])[0]
    outs = llm.generate(
        [{"prompt_token_ids": ids, "cache_salt": cache_salt(marked)}, {"prompt_token_ids": stock_ids}],
        [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args={"localist": marked.to_json()}),
         sampling(None)], use_tqdm=False)
    assert list(outs[0].outputs[0].token_ids) == [eos] and outs[0].outputs[0].finish_reason == "stop"
    assert list(outs[1].outputs[0].token_ids) == stock_alone  # the stock row of the failing step
    with pytest.raises(LocalistWorkerError, match="injected fault"):
        fetch_stats_sync(llm, "marked", release=True)
    healthy = LocalistParams(rho_for(0.5), layout(40, 3), "after-fault")
    assert run(llm, [(ids, healthy)]) == [run(llm, [(ids, LocalistParams(rho_for(0.5), layout(40, 3), "again"))])[0]]
    assert fetch_stats_sync(llm, "after-fault", release=True).num_tokens == MAX_TOKENS
    fetch_stats_sync(llm, "again", release=True)


def test_mixed_batch_equals_solo_runs(llm):
    """Ten concurrent requests — different ρ, per-layer ρ, layouts, lengths, one stock — each as if alone."""
    dials = [0.0, 0.3, 0.6, 0.9, 1.0, [0.2, 0.9, 0.5], 0.75, [1.0, 0.0, 0.4], 0.5]
    requests = []
    for i, d in enumerate(dials):
        n = 20 + 17 * i
        requests.append((prompt(n, 100 + i), LocalistParams(rho_for(d), layout(n, i), f"mix-{i}")))
    requests.append((prompt(64, 99), None))
    together = run(llm, requests)
    stats_together = [fetch_stats_sync(llm, lp.request_id, release=True) for _, lp in requests[:-1]]
    for i, (req, tokens) in enumerate(zip(requests, together)):
        assert run(llm, [req]) == [tokens], f"request {i}"
        if req[1] is not None:
            solo = fetch_stats_sync(llm, req[1].request_id, release=True)
            assert torch.allclose(solo.mass, stats_together[i].mass, atol=1e-4)
            assert torch.allclose(solo.inner_entropy, stats_together[i].inner_entropy, atol=1e-4)


def test_metrics_satisfy_spec_identities(llm):
    n = 90
    ids = prompt(n, 5)
    rho = [0.4, 0.7, 0.9]
    params = LocalistParams(rho, layout(n, 3), "ident")
    run(llm, [(ids, params)])
    st = fetch_stats_sync(llm, "ident", release=True)
    table = params.table(n)
    target = table.candidates().index(True)
    pinned = torch.tensor(table.pinned())
    # Attribution is a distribution over blocks.
    assert torch.allclose(st.mass.sum(-1), torch.ones(st.mass.shape[:-1]), atol=1e-5)
    assert (st.mass >= 0).all()
    # π^ρ is the dial applied to the block log-masses of the same query (docs/theory.md §2) …
    rho_t = torch.tensor(rho).view(1, -1, 1)
    assert torch.allclose(st.mass, dial_mass(st.log_mass, rho_t, pinned), atol=1e-5)
    # … so pinned blocks keep their base mass (the sink), whatever ρ.
    base = torch.softmax(st.log_mass, -1)
    assert torch.allclose(st.mass[..., pinned], base[..., pinned], atol=1e-5)
    # Entropy decomposition: H(a) = H(π) + Σ π H(w) lies between H(π) and H(π) + ln(#visible keys).
    H_pi = -(st.mass * st.mass.clamp(min=1e-30).log()).sum(-1)
    H_a = H_pi + (st.mass * st.inner_entropy).sum(-1)
    seq = torch.arange(MAX_TOKENS) + n
    assert (H_a >= H_pi - 1e-6).all()
    assert (H_a <= H_pi + seq.log().view(-1, 1, 1) + 1e-5).all()
    # Within-block entropy never exceeds ln of the block's visible size.
    sizes = torch.tensor([b.end - b.start for b in table.blocks], dtype=torch.float32)
    sizes = sizes.expand(MAX_TOKENS, -1).clone()
    sizes[:, -1] = seq.float() - n + 1  # the response block holds the tokens generated so far
    assert (st.inner_entropy <= sizes.log().view(MAX_TOKENS, 1, 1, -1) + 1e-5).all()
    # Pointer fidelity F = π(t)/c lies in [0, 1] for every (token, layer, head).
    cand = torch.tensor(table.candidates())
    c = st.mass[..., cand].sum(-1)
    F = st.mass[..., target] / c
    assert ((F >= 0) & (F <= 1 + 1e-6)).all()
    # docs/theory.md §4 on the candidates: measured F is the exact formula, and never below the lower bound.
    from localist.model.theory import block_margin, candidate_count, exact_fidelity, fidelity_lower_bound, rho_to_lambda

    L_cand = st.log_mass[..., cand]
    R = int(cand[:target].sum())  # the target's index among the candidates
    lam = rho_to_lambda(rho).view(1, -1, 1)
    assert torch.allclose(F.double(), exact_fidelity(L_cand, R, lam), atol=1e-4)
    bound = fidelity_lower_bound(block_margin(L_cand, R), candidate_count(L_cand), lam)
    assert (F.double() >= bound - 1e-5).all()


def test_prefix_cache_salt_keeps_dials_apart(llm, ref):
    """ρ = 0 then ρ = 0.9 on the same long prompt: the salt stops the second reusing the first's K/V."""
    ids = prompt(200, 42)
    spans = layout(200, 42)
    base = LocalistParams(rho_for(0.0), spans, "salt-0")
    sharp = LocalistParams(rho_for(0.9), spans, "salt-9")
    assert cache_salt(base) is None and cache_salt(sharp) is not None
    assert cache_salt(sharp) == cache_salt(LocalistParams(rho_for(0.9), spans, "other-id"))
    assert cache_salt(sharp) != cache_salt(LocalistParams(rho_for(0.8), spans, "x"))
    for params in (base, sharp, sharp):  # the third run reuses the second's cache within its salt
        salt = cache_salt(params)
        p = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
        out = llm.generate([p], sampling(params), use_tqdm=False)[0]
        want_tokens, _ = reference(ref, ids, params)
        assert list(out.outputs[0].token_ids) == want_tokens
        fetch_stats_sync(llm, params.request_id, release=True)


def test_streaming_fetch_and_release(llm):
    ids = prompt(40, 8)
    params = LocalistParams(rho_for(0.6), layout(40, 8), "stream")
    run(llm, [(ids, params)])
    first = fetch_stats_sync(llm, "stream", since=0)
    tail = fetch_stats_sync(llm, "stream", since=5)
    assert first.num_tokens == tail.num_tokens == MAX_TOKENS
    assert torch.equal(tail.mass, first.mass[5:])
    fetch_stats_sync(llm, "stream", release=True)
    assert fetch_stats_sync(llm, "stream").num_tokens == 0  # freed in the worker


def test_bad_params_are_rejected_naming_the_field(llm):
    ids = prompt(20, 1)
    cases = {
        "localist.rho": json.dumps({"id": "bad", "rho": 1.5, "blocks": []}),
        "localist.blocks[0]": json.dumps({"id": "bad", "rho": 0.5, "blocks": [[5, 3, "rule"]]}),
        "localist": "{not json",
    }
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # what vLLM's server turns into HTTP 400

    for name, raw in cases.items():
        with pytest.raises(VLLMValidationError, match=name.replace("[", r"\[").replace("]", r"\]")):
            llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=2, extra_args={"localist": raw}),
                         use_tqdm=False)
    two = SamplingParams(n=2, max_tokens=2, extra_args={"localist": json.dumps({"id": "twin", "rho": 0.5})})
    with pytest.raises(VLLMValidationError, match="^n: "):
        llm.generate([{"prompt_token_ids": ids}], two, use_tqdm=False)


def test_spans_past_the_prompt_run_stock_and_report_the_error(llm):
    """Only the worker knows the prompt length: the request is served stock and its record says why."""
    ids = prompt(20, 2)
    params = LocalistParams(rho_for(0.5), [[3, 60, "rule"]], "late")
    assert run(llm, [(ids, params)]) == run(llm, [(ids, None)])
    with pytest.raises(BlockError, match=r"localist.blocks\[0\]"):
        fetch_stats_sync(llm, "late", release=True)


# ---- the row table on its own (the logits processor is a plain object) ---------------------------


def _params(payload):
    from vllm import SamplingParams

    return SamplingParams(extra_args={"localist": json.dumps(payload)} if payload is not None else None)


def test_row_table_follows_batch_updates():
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    proc = LocalistRowState.__new__(LocalistRowState)
    proc.worker = worker = LocalistWorker(2, WorkerSettings())
    add = lambda i, rid, n: (i, _params({"id": rid, "rho": 0.5, "blocks": [[1, 3, "rule"]]}), list(range(n)), [])  # noqa: E731
    proc.update_state(BatchUpdate(3, removed=[], added=[add(0, "a", 5), add(1, "b", 6), (2, _params(None), [1, 2], [])],
                                  moved=[]))
    assert {i: s.request_id for i, s in worker.rows.items()} == {0: "a", 1: "b"}
    proc.update_state(BatchUpdate(2, removed=[0], added=[], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert {i: s.request_id for i, s in worker.rows.items()} == {0: "b"}
    proc.update_state(BatchUpdate(2, removed=[], added=[add(1, "c", 4)], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert {i: s.request_id for i, s in worker.rows.items()} == {0: "c", 1: "b"}
    state = worker.rows[1]
    assert state.block_ids(9).tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3]  # past the prompt: the response block


def test_records_of_departed_requests_expire():
    store = LocalistWorker(1, WorkerSettings(stats_ttl_s=600.0))
    store.add_token_stats("gone", 0, torch.zeros(1), torch.zeros(1), torch.zeros(1))
    store.add_token_stats("live", 0, torch.zeros(1), torch.zeros(1), torch.zeros(1))
    store.records["gone"].left_at = 0.0
    store.expire(now=math.inf)
    assert set(store.records) == {"live"}


# ---- the compiled split-KV kernel against the pure-torch path (its oracle) -----------------------


@pytest.mark.parametrize("bs", [32, 80, 128], ids=["block-32", "block-80", "block-128"])  # the 16-, 64- and 128-key dot paths
@pytest.mark.parametrize("H, Hkv, D, G, q_scale", [(8, 2, 32, 5, 2.0), (4, 4, 64, 12, 2.0), (4, 4, 64, 12, 60.0)],
                         ids=["gqa-d32", "mha-d64-12-blocks", "saturated"])
def test_paged_kernel_equals_torch_path(bs, H, Hkv, D, G, q_scale):
    """Decode over a random paged cache: C++ per-block partials + merge == localist_attention on a gather.

    "saturated": scores spread over hundreds of nats, as in a trained model whose heads sit on one
    token, so some blocks' sums are subnormal against the row max (their 1/s overflowed once)."""
    from types import SimpleNamespace

    from localist.model.kv_layout import PagedKV
    from localist.model.vllm_model import LocalistAttentionLayer, _Decode, paged_kernel

    kernel = paged_kernel()
    assert kernel is not None, "the kernel must build on this machine (g++ is part of the set-up)"
    torch.manual_seed(0)
    nb = 40
    layer = LocalistAttentionLayer.__new__(LocalistAttentionLayer)
    torch.nn.Module.__init__(layer)
    layer.num_heads, layer.num_kv_heads, layer.head_size = H, Hkv, D
    layer.impl, layer.localist_layer, layer.worker = SimpleNamespace(scale=D ** -0.5), 0, LocalistWorker(1, WorkerSettings())
    cache = PagedKV(torch.randn(nb, Hkv, bs, 2 * D), "vec")  # every layout reads as this one (test_kv_layout)

    seq_lens = torch.tensor([70, 5, 128, 33])
    R, nblk = len(seq_lens), 4
    block_index = torch.randperm(nb)[: R * nblk].view(R, nblk)
    block_ids = torch.full((R, nblk * bs), -1)
    pinned = torch.zeros(R, G, dtype=torch.bool)
    for r, S in enumerate(seq_lens.tolist()):
        cuts = sorted(torch.randperm(S - 1)[: G - 2].add(1).tolist()) if S > G else list(range(1, G - 1))
        ids = torch.zeros(S, dtype=torch.long)
        for c in cuts:
            ids[c:] += 1
        block_ids[r, :S] = ids.clamp(max=G - 1)
        pinned[r, 0] = True
    q = torch.randn(R, H, D) * q_scale

    def decode(use_kernel: bool):
        rho = torch.tensor([[0.0, 0.6, 1.0, 0.3]])  # [layers, rows]
        d = _Decode(torch.arange(R), seq_lens, block_index, block_ids, pinned, rho, keep=[(0, "x", 0, G)])
        out = torch.zeros(R, H, D)
        if use_kernel:
            layer._decode_kernel(kernel, d, q, cache, out, 0)
        else:
            layer._decode(d, q, cache, out, 0)
        return out, d.stats[0]

    out_k, st_k = decode(True)
    out_t, st_t = decode(False)
    assert torch.isfinite(out_k).all()
    # A score's float32 rounding grows with its size (hundreds of nats when saturated: ~1e-5), and the
    # weights, so the outputs, move by as much relative to one another; the two paths round differently.
    assert torch.allclose(out_k, out_t, atol=1e-5 * max(1.0, q_scale / 10))
    finite, finite_k = torch.isfinite(st_t[0]), torch.isfinite(st_k[0])
    tol = 1e-5
    if q_scale < 10:
        assert torch.equal(finite, finite_k)
    else:  # blocks > 80 nats below the row's top one: below float32's normal range, where the torch
        # path clamps the mass and the kernel may call the block absent; they carry no weight either way
        far = st_t[0] < st_t[0].amax(-1, keepdim=True) - 80
        assert bool((finite == finite_k)[~far].all()) and bool((st_t[1][far] < 1e-34).all() and (st_k[1][far] < 1e-34).all())
        finite = finite & ~far
        tol = 1e-3  # H = L − E[score] cancels two values of a few hundred nats, each rounded by ~3e-5
    assert torch.allclose(st_k[0][finite], st_t[0][finite], rtol=1e-5, atol=1e-5)
    assert torch.allclose(st_k[1], st_t[1], atol=1e-5)
    assert torch.allclose(st_k[2][finite], st_t[2][finite], atol=tol), (st_k[2][finite] - st_t[2][finite]).abs().max()


# ---- the blockwise prefill (fused SDPA per block + dial merge) against localist_attention ---------


@pytest.mark.parametrize("budget", [1 << 24, 3 * 8 * 8 * 32], ids=["one-chunk", "query-chunks"])
@pytest.mark.parametrize("cached", [0, 37], ids=["fresh", "chunked-prefill"])
@pytest.mark.parametrize("merge", ["kernel", "torch"])
def test_blockwise_prefill_equals_torch_path(monkeypatch, budget, cached, merge):
    """Prefill rows against the oracle: blocks starting before, inside and after a query chunk,
    queries before a block, keys already in the paged cache (chunked prefill), GQA, ρ = 0 (vLLM's own
    kernel) and > 0; the blocks merged (and the last query's statistics taken) by the compiled kernel
    and by the pure-torch fallback."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends import cpu_attn

    import localist.model.vllm_model as vm
    from localist.model.attention import localist_attention
    from localist.model.kv_layout import PagedKV
    from localist.model.vllm_model import LocalistAttentionLayer, _Prefill, _spans

    if merge == "kernel":
        assert vm.paged_kernel() is not None, "the kernel must build on this machine (g++ is part of the set-up)"
    torch.manual_seed(1)
    H, Hkv, D, bs, nb = 8, 2, 32, 32, 12  # vLLM's CPU attention needs head_dim ≥ 32
    layer = LocalistAttentionLayer.__new__(LocalistAttentionLayer)
    torch.nn.Module.__init__(layer)
    layer.num_heads, layer.num_kv_heads, layer.head_size = H, Hkv, D
    # a budget of 3-query chunks: blocks start before, at and inside chunks
    layer.worker = LocalistWorker(4, WorkerSettings(prefill_budget=budget, use_kernel=merge == "kernel"))
    # ρ = 0 runs vLLM's own CPU attention (its constructor reads only the model dtype from the config)
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config",
                        lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32)))
    layer.impl = cpu_attn.CPUAttentionBackendImpl(H, D, D ** -0.5, Hkv, None, None, "auto")
    layer.isa, layer._k_scale_float, layer._v_scale_float = cpu_attn._get_attn_isa(torch.float32, bs, D), 1.0, 1.0
    layer.kv_cache = torch.randn(nb, Hkv, bs, 2 * D)
    cache = PagedKV(layer.kv_cache, layer.isa)
    S, block_index = 90, torch.randperm(nb)[:6]
    keys, values = cache.tokens(block_index, S)
    ids = torch.zeros(S, dtype=torch.long)
    for cut in [1, 9, 36, 41, 42, 70]:  # a block ends at the chunked-prefill boundary, one is 1 token
        ids[cut:] += 1
    G = 7 + 1  # plus an empty response block
    pinned = torch.zeros(G, dtype=torch.bool)
    pinned[[0, 3]] = True
    Tq = S - cached
    q = torch.randn(Tq, H, D) * 2.0
    k_fresh, v_fresh = keys.transpose(0, 1)[cached:], values.transpose(0, 1)[cached:]  # [Tq, Hkv, D]
    rho = torch.tensor([0.0, 0.6, 1.0, 0.95])

    for layer_index in range(len(rho)):
        p = _Prefill(0, Tq, S, block_index, ids, _spans(ids), pinned, rho, keep=("x", 0))
        out = torch.zeros(Tq, H, D)
        layer._prefill(p, q, k_fresh, v_fresh, cache, out, layer_index)
        positions = torch.arange(cached, S)
        visible = (torch.arange(S).unsqueeze(0) <= positions.unsqueeze(1)).unsqueeze(0)
        want, st = localist_attention(q.transpose(0, 1)[None], keys[None], values[None], ids[None],
                                      rho[layer_index].view(1), pinned[None], D ** -0.5, key_visible=visible)
        r = float(rho[layer_index])
        tol = 1e-5 / (1 - r) if r < 1 else 1e-5  # float32 rounding of L, sharpened by 1 + λ = 1 / (1 − ρ)
        assert torch.allclose(out, want[0].transpose(0, 1), atol=tol), layer_index
        last = torch.stack([st.log_mass, st.mass, st.inner_entropy])[:, 0, :, -1]  # [3, H, G]
        finite = torch.isfinite(last[0])
        assert torch.equal(finite, torch.isfinite(p.stats[0][0]))
        assert torch.allclose(p.stats[0][0][finite], last[0][finite], atol=1e-5)
        assert torch.allclose(p.stats[0][1:], last[1:], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_blocks_equals_weighted_sum(dtype):
    """The compiled prefill merge: Σ_g π_g·o_g over the parts whose queries include t, in the
    engine's dtype (bf16 parts from flash, a float32 part from a straddling block), written once."""
    from localist.model.vllm_model import paged_kernel

    kernel = paged_kernel()
    assert kernel is not None, "the kernel must build on this machine (g++ is part of the set-up)"
    torch.manual_seed(2)
    n, H, D, G = 23, 3, 40, 5
    starts, blocks = [0, 0, 7, 22], [0, 2, 3, 4]  # block 1 has no part (absent); the last part is 1 query
    parts = [torch.randn(H, n - s, D).to(dtype if j != 1 else torch.float32).transpose(0, 1)  # flash's layout
             for j, s in enumerate(starts)]
    mass = torch.rand(G, H, n)
    mass[3, :, 9] = 0.0  # a zero weight is skipped, not multiplied
    out = torch.full((n, H, D), float("nan"), dtype=dtype)
    kernel.merge_blocks(parts, starts, blocks, mass, out)
    want = torch.zeros(n, H, D, dtype=torch.float64)
    for o, s, g in zip(parts, starts, blocks):
        want[s:] += o.double() * mass[g, :, s:].t().double().unsqueeze(-1)
    atol, rtol = (1e-5, 1e-6) if dtype == torch.float32 else (0.0, 8e-3)  # bf16: one rounding of the sum
    assert torch.allclose(out.double(), want, atol=atol, rtol=rtol)
