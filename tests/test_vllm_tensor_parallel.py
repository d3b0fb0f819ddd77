"""Tensor parallelism: two CPU ranks, each holding half of every layer's heads, give the tokens and
the per-head statistics of one rank (float32, the statistics of both ranks joined in head order).

vLLM's CPU workers need one core each under tensor parallelism: ``VLLM_CPU_OMP_THREADS_BIND="0|1"``
(its default ``auto`` binding fails on a 2-core host).
"""
import gc
import os

import pytest
import torch

from localist.model.blocks import LocalistParams
from localist.model.tiny import make_tiny_checkpoint
from localist.model.vllm_engine import cache_salt, engine_kwargs, fetch_stats_sync

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
MAX_TOKENS = 6
DIALS = [0.0, 0.5, 0.9, [1.0, 0.2]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 4 heads over 2 KV heads: each rank holds 2 query heads and 1 KV head
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp"), arch="llama", num_layers=2, num_heads=4, num_kv_heads=2,
                                initializer_range=0.2, seed=5)


def serve_all(checkpoint, tensor_parallel_size: int):
    """Tokens and statistics of every dial's request, on an engine of that many ranks."""
    from vllm import LLM, SamplingParams

    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if tensor_parallel_size > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tensor_parallel_size))
    try:
        llm = LLM(**engine_kwargs(checkpoint, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3,
                                  tensor_parallel_size=tensor_parallel_size, seed=0))
    finally:
        if previous is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
    ids = [1] + [(5 * i * i + 11 * i) % 380 + 5 for i in range(59)]
    results = []
    for i, rho in enumerate(DIALS):
        rho = list(rho) if isinstance(rho, list) else [rho, rho]
        params = LocalistParams(rho, [[2, 15, "rule"], [15, 33, "document"], [33, 50, "rule", 1]], f"tp-{i}")
        salt = cache_salt(params)
        prompt = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
        sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                            extra_args={"localist": params.to_json()})
        tokens = list(llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids)
        results.append((tokens, fetch_stats_sync(llm, params.request_id, release=True)))
    del llm
    gc.collect()
    return results


def test_two_ranks_equal_one(checkpoint):
    one = serve_all(checkpoint, 1)
    two = serve_all(checkpoint, 2)
    for rho, (tokens1, stats1), (tokens2, stats2) in zip(DIALS, one, two):
        assert tokens2 == tokens1, rho
        assert stats2.mass.shape == stats1.mass.shape and stats2.mass.shape[:3] == (MAX_TOKENS, 2, 4), rho  # every head
        for name in ("mass", "inner_entropy"):
            assert torch.allclose(getattr(stats2, name), getattr(stats1, name), atol=1e-5), (rho, name)
        finite = torch.isfinite(stats1.log_mass)
        assert torch.equal(finite, torch.isfinite(stats2.log_mass))
        assert torch.allclose(stats2.log_mass[finite], stats1.log_mass[finite], atol=1e-5)
