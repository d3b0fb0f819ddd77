"""The Qwen2 localist class in vLLM against the reference, and the plugin registration (own engine)."""
import gc
import os

import pytest
import torch

from localist.model.blocks import LocalistParams
from localist.model.reference import ReferenceLM
from localist.model.tiny import make_tiny_checkpoint
from localist.model.vllm_engine import cache_salt, engine_kwargs, fetch_stats_sync, localist_architecture

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), arch="qwen2", num_layers=2,
                                initializer_range=0.2, seed=3)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(**engine_kwargs(checkpoint, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3,
                                 max_num_batched_tokens=40, enable_chunked_prefill=True, seed=0))
    yield engine
    del engine
    gc.collect()


def test_plugin_registers_both_architectures(checkpoint):
    from vllm import ModelRegistry

    from localist.model.vllm_plugin import register

    register()
    archs = ModelRegistry.get_supported_archs()
    assert {"LocalistLlamaForCausalLM", "LocalistQwen2ForCausalLM"} <= set(archs)
    assert localist_architecture(checkpoint) == "LocalistQwen2ForCausalLM"


@pytest.mark.parametrize("rho", [0.0, 0.7, [1.0, 0.3]], ids=str)
@pytest.mark.parametrize("n", [25, 90], ids=["prefill", "chunked"])
def test_qwen2_matches_reference(llm, checkpoint, rho, n):
    from vllm import SamplingParams

    ref = ReferenceLM.from_pretrained(checkpoint)
    ids = [1] + [(7 * i * i + 3 * i) % 380 + 5 for i in range(n - 1)]
    rho = list(rho) if isinstance(rho, list) else [rho, rho]
    params = LocalistParams(rho, [[2, 9, "rule"], [9, 20, "document"], [20, 24, "rule", 1]], f"q-{n}-{rho}")
    salt = cache_salt(params)
    prompt = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                        extra_args={"localist": params.to_json()})
    tokens = list(llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids)
    table = params.table(n)
    table.token_ids = ids
    want_tokens, want = ref.generate(table, rho, MAX_TOKENS, stop_at_eos=False)
    assert tokens == want_tokens
    got = fetch_stats_sync(llm, params.request_id, release=True)
    assert got.mass.shape == want.mass.shape
    assert torch.allclose(got.mass, want.mass, atol=1e-3)
    assert torch.allclose(got.inner_entropy, want.inner_entropy, atol=1e-3)
