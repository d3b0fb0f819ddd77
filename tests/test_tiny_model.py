"""The fast test model models/localist-tiny: size, loading, ρ = 0 is the stock LM, and the card's table reproduces."""
import gc
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from localist.model.data import encode, make_example
from localist.model.evaluate import DEFAULT_RHOS, compare_tables, evaluate, format_table, generate_over_dial
from localist.model.reference import ReferenceLM
from localist.model.train import collate

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "localist-tiny"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the vLLM test below needs only a small cache


@pytest.fixture(scope="module")
def card():
    return json.loads((SHIPPED / "eval.json").read_text())


def test_shipped_folder_is_small_and_complete():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    for folder in (SHIPPED, SHIPPED / "mu0"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "localist.json", "recruitment.jsonl"):
            assert (folder / name).exists(), folder / name
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "llama" and config["head_dim"] >= 32
    assert json.loads((SHIPPED / "localist.json").read_text())["training"]["mu"] > 0
    assert json.loads((SHIPPED / "mu0" / "localist.json").read_text())["training"]["mu"] == 0


def test_loads_in_the_reference_model_and_rho_zero_is_the_stock_lm():
    torch.set_num_threads(2)
    lm = ReferenceLM.from_pretrained(SHIPPED)
    stock = AutoModelForCausalLM.from_pretrained(str(SHIPPED), dtype=torch.float32, attn_implementation="eager").eval()
    enc = encode(make_example(0, "test", 0), lm.tokenizer)
    logits, _ = lm.forward([enc.table], [[0.0] * lm.num_layers])
    with torch.no_grad():
        expected = stock(input_ids=torch.tensor([enc.table.token_ids])).logits
    assert torch.allclose(logits, expected, atol=1e-5)
    # the dial changes the model's computation once ρ > 0
    sharp, _ = lm.forward([enc.table], [[0.9] * lm.num_layers])
    assert not torch.allclose(sharp, expected, atol=1e-3)
    # batched generation over the dial = the reference's one-by-one generation
    rows = generate_over_dial(lm, enc.table, [0.0, 0.9], 8)
    for rho, (tokens, stats) in zip([0.0, 0.9], rows):
        ref_tokens, ref_stats = lm.generate(enc.table, [rho] * lm.num_layers, 8)
        assert tokens == ref_tokens
        assert torch.allclose(stats.mass, ref_stats.mass, atol=1e-4)  # batched matmuls round differently
    assert collate([enc], lm.tokenizer.pad_token_id, 0.0).target.tolist() == [enc.target_block]


def test_card_table_covers_the_dial_grid_and_the_twin(card):
    for which in ("model", "twin"):
        assert [r["rho"] for r in card[which]["rows"]] == list(DEFAULT_RHOS)
        assert card[which]["split"] == "test"
    assert card["twin"]["mu"] == 0 and card["model"]["mu"] > 0
    readme = (SHIPPED / "README.md").read_text()
    assert format_table(card) in readme  # the card shows exactly the measured table


def test_eval_reproduces_the_stored_smoke_table(card):
    torch.set_num_threads(2)
    smoke = card["smoke"]
    measured = evaluate(SHIPPED, count=smoke["model"]["examples"], split=smoke["model"]["split"])
    assert compare_tables({k: smoke[k] for k in ("model", "twin")}, measured, tolerance=0.02) == []


def test_vllm_serves_what_the_reference_computes():
    """The shipped weights through vLLM (the served path, compiled kernel included) give the reference's
    greedy answers at ρ = 0 and 0.9: a trained model's saturated heads drive other blocks' sums
    subnormal, which tiny random models never do (a kernel once turned that into nan here)."""
    from vllm import LLM, SamplingParams

    from localist.model.blocks import LocalistParams
    from localist.model.vllm_engine import cache_salt, engine_kwargs

    lm = ReferenceLM.from_pretrained(SHIPPED)
    llm = LLM(**engine_kwargs(SHIPPED, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, seed=0))
    try:
        for i in range(4):
            enc = encode(make_example(0, "test", i), lm.tokenizer)
            want = [tokens for tokens, _ in generate_over_dial(lm, enc.table, [0.0, 0.9], 12)]
            for rho, expected in zip([0.0, 0.9], want):
                params = LocalistParams(rho=[rho] * lm.num_layers, blocks=enc.table.to_wire(), request_id="")
                salt = cache_salt(params)
                prompt = {"prompt_token_ids": enc.table.token_ids, **({"cache_salt": salt} if salt else {})}
                sampling = SamplingParams(max_tokens=12, temperature=0.0, extra_args={"localist": params.to_json()})
                got = list(llm.generate([prompt], [sampling], use_tqdm=False)[0].outputs[0].token_ids)
                assert got == expected, (i, rho, lm.tokenizer.decode(got), lm.tokenizer.decode(expected))
    finally:
        del llm
        gc.collect()
