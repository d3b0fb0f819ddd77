"""The default model through vLLM gives the reference model's greedy tokens, in float32, at ρ = 0 and 0.9.

The served path — vLLM's engine with the localist plugin, as ``localist serve`` builds it
(``engine_kwargs``), compiled decode kernel included — against the torch oracle
(``model/reference.py``), on the rulebook task's prompts: the hand-written cases, shortest first
(about 180 tokens each: the oracle costs tens of seconds per prompt on two shared cores), in the
model's default dial scope. Both dial values of a prompt are compared in one batch on each side.
``make test`` compares ``PROMPTS_QUICK`` prompts; ``make reference-equality``
(LOCALIST_EQUALITY_FULL=1) compares ``PROMPTS_FULL``.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from default_model_cache import built_default_model

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a few short prompts need a small cache

PROMPTS_QUICK, PROMPTS_FULL = 5, 20
PROMPTS = PROMPTS_FULL if os.environ.get("LOCALIST_EQUALITY_FULL") == "1" else PROMPTS_QUICK
RHOS = (0.0, 0.9)
MAX_TOKENS = 10  # the answer, "Rule: X. Outcome: y.", is about that long


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_vllm_greedy_tokens_equal_the_reference_models():
    from vllm import LLM, SamplingParams

    from localist.model.blocks import LocalistParams, with_dial_scope
    from localist.model.evaluate import generate_over_dial
    from localist.model.reference import ReferenceLM
    from localist.model.rulebooks import block_table, handwritten
    from localist.model.vllm_engine import cache_salt, engine_kwargs
    from localist.server.engine import default_dial_scope

    model_dir = built_default_model()
    torch.set_num_threads(2)
    lm = ReferenceLM.from_pretrained(model_dir)
    eos, layers = lm.tokenizer.eos_token_id, lm.num_layers
    scope = default_dial_scope(model_dir)  # what the server applies to a request that names no scope
    tables = sorted((with_dial_scope(block_table(case, lm.tokenizer), scope) for case in handwritten.load()),
                    key=lambda t: len(t.token_ids))
    tables = tables[:PROMPTS]
    expected = {}
    for i, table in enumerate(tables):
        for rho, (tokens, _) in zip(RHOS, generate_over_dial(lm, table, RHOS, MAX_TOKENS)):
            expected[i, rho] = tokens
    del lm
    gc.collect()

    llm = LLM(**engine_kwargs(model_dir, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, seed=0))
    try:
        prompts, sampling, keys = [], [], []
        for i, table in enumerate(tables):
            for rho in RHOS:
                params = LocalistParams(rho=[rho] * layers, blocks=table.to_wire(), request_id="")
                salt = cache_salt(params)
                prompts.append({"prompt_token_ids": table.token_ids, **({"cache_salt": salt} if salt else {})})
                # past every end-of-sequence token: the oracle's own EOS decides where both are cut
                sampling.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                               extra_args={"localist": params.to_json()}))
                keys.append((i, rho))
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    mismatches = []
    for key, out in zip(keys, outputs):
        got = until_eos(list(out.outputs[0].token_ids), eos)
        if got != expected[key]:
            mismatches.append((key, got, expected[key]))
    assert not mismatches, f"{len(mismatches)} of {len(keys)} differ (prompt, ρ), vLLM, reference: {mismatches}"
    assert len(keys) == 2 * PROMPTS
