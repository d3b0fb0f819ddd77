"""The localist engine against engines built apart from it: a separate stock vLLM engine on
the same weights at ρ = 0, and a KV cache so small that the scheduler must preempt (recompute) rows.

Each engine lives only for its test (float32, tiny random Llama): two engines never run at once.
"""
import gc
import os
import random

import pytest
import torch

from localist.model.blocks import LocalistParams
from localist.model.reference import ReferenceLM
from localist.model.tiny import make_tiny_checkpoint
from localist.model.vllm_engine import cache_salt, engine_kwargs, fetch_stats_sync

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
NUM_LAYERS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), arch="llama", num_layers=NUM_LAYERS,
                                initializer_range=0.2, seed=3)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(5, 400) for _ in range(n - 1)]


def params(n: int, rho: float, request_id: str) -> LocalistParams:
    """Three evidence blocks over a prompt of n tokens, one of them pinned."""
    a, b, c = n // 4, n // 2, 3 * n // 4
    return LocalistParams([rho] * NUM_LAYERS, [[a, b, "rule"], [b, c, "document", 0, 1], [c, n - 1, "rule"]], request_id)


def generate(llm, requests, max_tokens: int) -> list[list[int]]:
    """requests: (prompt ids, LocalistParams | None) → greedy tokens, submitted as one batch."""
    from vllm import SamplingParams

    prompts, sampling = [], []
    for ids, lp in requests:
        salt = cache_salt(lp) if lp is not None else None
        prompts.append({"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})})
        extra = {"localist": lp.to_json()} if lp is not None else None
        sampling.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra))
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sampling, use_tqdm=False)]


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def test_rho0_equals_a_separate_stock_engine(checkpoint):
    """ρ = 0 through the localist model class equals vLLM's own LlamaForCausalLM (no plugin override)."""
    from vllm import LLM

    prompts = [prompt(n, s) for s, n in enumerate([9, 33, 64, 100])]
    stock = LLM(model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    assert stock.llm_engine.model_config.architecture == "LlamaForCausalLM"
    want = generate(stock, [(p, None) for p in prompts], max_tokens=12)
    close(stock)
    llm = LLM(**engine_kwargs(checkpoint, dtype="float32", max_model_len=256, seed=0))
    assert llm.llm_engine.model_config.architecture != "LlamaForCausalLM"
    got = generate(llm, [(p, params(len(p), 0.0, f"stock-{i}")) for i, p in enumerate(prompts)], max_tokens=12)
    for i in range(len(prompts)):
        assert fetch_stats_sync(llm, f"stock-{i}", release=True).mass.shape[0] == 12
    close(llm)
    assert got == want


def test_preempted_rows_recompute_to_the_reference_tokens_and_statistics(checkpoint):
    """Eight blocks of 32 tokens cannot hold six growing rows: vLLM preempts some and re-prefills them
    later (prompt plus the tokens generated so far). Every row must still equal the reference model,
    tokens and per-token statistics, with exactly one statistics entry per generated token."""
    from vllm import LLM

    max_tokens = 24
    llm = LLM(**engine_kwargs(
        checkpoint, dtype="float32", max_model_len=128, block_size=32, num_gpu_blocks_override=8,
        max_num_seqs=6, enable_chunked_prefill=True, max_num_batched_tokens=64, disable_log_stats=False, seed=0,
    ))
    rhos = [0.0, 0.5, 0.9, 1.0, 0.75, 0.3]
    requests = [(prompt(40 + 3 * i, 50 + i), params(40 + 3 * i, rho, f"pre-{i}")) for i, rho in enumerate(rhos)]
    tokens = generate(llm, requests, max_tokens)
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    stats = [fetch_stats_sync(llm, lp.request_id, release=True) for _, lp in requests]
    close(llm)
    assert preemptions > 0, "the KV cache was meant to be too small for all rows"

    ref = ReferenceLM.from_pretrained(checkpoint)
    for (ids, lp), got_tokens, got in zip(requests, tokens, stats):
        table = lp.table(len(ids))
        table.token_ids = list(ids)
        want_tokens, want = ref.generate(table, lp.rho, max_tokens, stop_at_eos=False)
        assert got_tokens == want_tokens, lp.request_id
        assert got.mass.shape == want.mass.shape, lp.request_id
        assert torch.allclose(got.mass, want.mass, atol=1e-3), lp.request_id
        assert torch.allclose(got.inner_entropy, want.inner_entropy, atol=1e-3), lp.request_id
