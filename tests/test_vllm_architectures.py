"""Every architecture served as localist (Mistral, Qwen2, Qwen3 here; Llama in test_vllm.py) in vLLM
against the reference model, the plugin registration, and the layers that are refused at start."""
import gc
import json
import os

import pytest
import torch

from localist.model.blocks import LocalistParams
from localist.model.reference import ReferenceLM
from localist.model.tiny import make_tiny_checkpoint
from localist.model.vllm_engine import ARCHITECTURES, cache_salt, engine_kwargs, fetch_stats_sync, localist_architecture

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
MAX_TOKENS = 6


@pytest.fixture(scope="module", params=["mistral", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory):
    # Mistral's default 4096-token sliding window exceeds the context served here: it has no effect
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch=request.param, num_layers=2,
                                initializer_range=0.2, seed=3)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(**engine_kwargs(checkpoint, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3,
                                 max_num_batched_tokens=40, enable_chunked_prefill=True, seed=0))
    yield engine
    del engine
    gc.collect()


def test_plugin_registers_every_architecture(checkpoint):
    from vllm import ModelRegistry

    from localist.model.vllm_plugin import register

    register()
    assert set(ARCHITECTURES.values()) <= set(ModelRegistry.get_supported_archs())
    arch = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    assert localist_architecture(checkpoint) == f"Localist{arch}"


@pytest.mark.parametrize("rho", [0.0, 0.7, [1.0, 0.3]], ids=str)
@pytest.mark.parametrize("n", [25, 90], ids=["prefill", "chunked"])
def test_matches_reference(llm, checkpoint, rho, n):
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


def test_other_architectures_are_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*Qwen3ForCausalLM"):
        localist_architecture(tmp_path)


def _attention(monkeypatch, **impl_args):
    """A real vLLM attention layer (CPU backend), built outside an engine."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends import cpu_attn

    monkeypatch.setattr(cpu_attn, "get_current_vllm_config",
                        lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32)))
    layer = Attention.__new__(Attention)
    torch.nn.Module.__init__(layer)
    layer.impl = cpu_attn.CPUAttentionBackendImpl(4, 32, 32 ** -0.5, 2, impl_args.pop("alibi_slopes", None),
                                                  impl_args.pop("sliding_window", None), "auto", **impl_args)
    layer.layer_name, layer.head_size, layer.head_size_v = "model.layers.0.self_attn.attn", 32, 32
    layer.kv_sharing_target_layer_name, layer.attn_type = None, "decoder"
    return layer


def test_layers_that_are_not_plain_softmax_attention_are_refused(monkeypatch):
    from localist.model.vllm_model import check_attention

    check_attention(_attention(monkeypatch), 2048)
    check_attention(_attention(monkeypatch, sliding_window=4096), 2048)  # longer than the context: no effect
    with pytest.raises(ValueError, match="sliding window of 512 tokens.*--max-model-len 512"):
        check_attention(_attention(monkeypatch, sliding_window=512), 2048)
    with pytest.raises(ValueError, match="ALiBi"):
        check_attention(_attention(monkeypatch, alibi_slopes=[0.5, 0.25, 0.125, 0.0625]), 2048)
    with pytest.raises(ValueError, match="soft cap"):
        check_attention(_attention(monkeypatch, logits_soft_cap=30.0), 2048)
