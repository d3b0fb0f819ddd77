"""LoRA fine-tuning with the dial (model/finetune.py): a few real steps on a tiny random Llama on CPU."""
import json

import pytest
import torch
from safetensors.torch import load_file

from localist.model.blocks import with_dial_scope
from localist.model.finetune import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINETUNE_META, TRAINER_STATE, Finetuner, RulebookBatches, align_eos,
    answer_queries, merge_adapter,
)
from localist.model.finetune_attention import TRAIN_ATTENTION
from localist.model.reference import ATTN_IMPLEMENTATION, LocalistBatch, load_localist_model
from localist.model.rulebooks import encode, examples
from localist.model.tiny import make_tiny_checkpoint
from localist.model.train_config import FinetuneConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base"), num_layers=2)


def config(out, base, **kw):
    values = dict(out=str(out), base=str(base), steps=6, batch_size=2, lr=1e-2, warmup=1, lora_rank=4, eval_every=3,
                  eval_examples=2, pointer_weight=0.5, mu_ramp=(0.0, 0.5), rho_ramp=(0.0, 0.5), progress=False)
    values.update(kw)
    return FinetuneConfig(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    torch.set_num_threads(2)
    tuner = Finetuner(config(tmp_path_factory.mktemp("adapter"), base))
    batch = RulebookBatches(tuner.cfg, tuner.tokenizer, 0)[0]
    records = [tuner.train_step(batch) for _ in range(6)]
    return tuner, records, tuner.save()


def test_the_loss_falls_and_only_the_adapter_learns(trained, base):
    tuner, records, _ = trained
    assert records[-1]["answer_nll"] < 0.8 * records[0]["answer_nll"], [r["answer_nll"] for r in records]
    assert records[-1]["mu"] > 0 and records[-1]["nu"] == 0.5  # the penalty ramped in, the pointer term is on
    frozen = load_localist_model(base).state_dict()
    for name, tensor in tuner.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, frozen[name.replace(".base.", ".")]), name


def test_the_adapter_is_saved_in_peft_layout(trained):
    tuner, _, out = trained
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    weights = load_file(str(out / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert len(weights) == 2 * 7 * 2  # A and B, seven projections, two layers
    meta = json.loads((out / FINETUNE_META).read_text())
    assert meta["steps_done"] == 6 and meta["trainable_parameters"] == tuner.trainable_parameters


def test_the_merged_checkpoint_computes_what_the_adapter_does(trained, base, tmp_path):
    tuner, _, out = trained
    merged = load_localist_model(merge_adapter(base, out, tmp_path / "merged"))
    enc = encode(next(examples(0, "validation", 1)), tuner.tokenizer)
    ids = torch.tensor([enc.input_ids])
    tuner.model.eval()
    tuner.model.set_attn_implementation(ATTN_IMPLEMENTATION)  # the reference attention on both sides
    try:
        with torch.no_grad():
            for rho in (0.0, 0.9):
                batch = lambda: LocalistBatch.from_tables([enc.table], [[rho] * 2], length=ids.shape[1])  # noqa: E731
                want = tuner.model(input_ids=ids, localist=batch(), use_cache=False).logits
                got = merged(input_ids=ids, localist=batch(), use_cache=False).logits
                assert torch.allclose(want, got, atol=1e-4), (rho, float((want - got).abs().max()))
    finally:
        tuner.model.set_attn_implementation(TRAIN_ATTENTION)


def test_a_run_logs_validation_writes_the_adapter_and_resumes(tmp_path, base):
    out = Finetuner(config(tmp_path / "run", base, steps=3, stop_at=2, eval_every=2)).run()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert set(log[0]["validation"]) == {"rho=0.0", "rho=0.9"} and "validation" in log[-1]
    assert set(log[0]["validation"]["rho=0.9"]) == {"exact_match", "rule", "fidelity"}
    assert (out / ADAPTER_WEIGHTS).exists() and (out / TRAINER_STATE).exists()
    resumed = Finetuner(config(tmp_path / "run", base, steps=3, eval_every=2))
    assert resumed.step == 2
    resumed.run()
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()][-1] == 3
    assert not (out / TRAINER_STATE).exists()  # the schedule ended: nothing left to resume


def test_evidence_scope_pins_every_block_that_is_not_a_candidate(base):
    from transformers import AutoTokenizer

    table = encode(next(examples(0, "train", 1)), AutoTokenizer.from_pretrained(base)).table
    scoped = with_dial_scope(table, "evidence")
    assert [b.pinned for b in scoped.blocks] == [not b.candidate for b in table.blocks]
    assert scoped.candidates() == table.candidates() and with_dial_scope(table, "all") is table
    with pytest.raises(ValueError, match="dial_scope"):
        with_dial_scope(table, "rules")


def test_pointing_queries_are_those_before_the_label_ends_and_the_outcome(base):
    from transformers import AutoTokenizer

    from localist.model.train import collate

    tok = AutoTokenizer.from_pretrained(base)
    cases = list(examples(0, "train", 4))  # one rulebook: three outcome classes and one no-rule question
    encoded = [encode(c, tok) for c in cases]
    batch = collate(encoded, tok.pad_token_id, 0.0)
    queries = answer_queries(batch)
    for row, (case, enc) in enumerate(zip(cases, encoded)):
        n = len(enc.answer_ids)
        assert int(queries.answer[row].sum()) == n
        prompt = len(enc.table.token_ids)
        assert queries.index[row, :n].tolist() == list(range(prompt - 1, prompt - 1 + n))  # each predicts answer token k
        pointing = [k for k in range(n) if queries.pointing[row, k]]
        assert pointing == (enc.pointing if case.target else [])


def test_the_training_attention_computes_what_the_reference_model_does(trained, base, tmp_path):
    """Logits, block statistics and gradients at the answer queries equal the reference attention's
    (of the merged model), for sequences at ρ = 0 (the fused kernel) and ρ > 0 (the dialled path) in one batch."""
    from localist.model.train import forward

    tuner, _, out = trained
    batch = RulebookBatches(tuner.cfg, tuner.tokenizer, 1)[0]
    reference = load_localist_model(merge_adapter(base, out, tmp_path / "merged"))
    rho = torch.tensor([0.0, 0.9])
    logits, queries, stats = tuner.answer_forward(batch, rho)
    want, want_stats = forward(reference, batch, rho)
    gathered = want.gather(1, queries.index[..., None].expand(-1, -1, want.shape[-1]))
    real = queries.answer[..., None]
    assert torch.allclose(logits * real, gathered * real, atol=1e-4)
    for got, ref in zip(stats, want_stats):
        mass = ref.mass.gather(2, queries.index[:, None, :, None].expand(-1, ref.mass.shape[1], -1, ref.mass.shape[-1]))
        assert torch.allclose(got.mass, mass, atol=1e-5)
    # gradients reach the adapter through both paths
    tuner.opt.zero_grad(set_to_none=True)
    (logits * real).sum().backward()
    assert all(float(lora.lora_B.grad.abs().sum()) > 0 for lora in tuner.loras.values())
    tuner.opt.zero_grad(set_to_none=True)


def test_the_answer_ends_with_the_models_own_eos(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    eos = tok.eos_token_id
    tok.eos_token = tok.convert_ids_to_tokens(tok.bos_token_id)  # as transformers 5.17 reads SmolLM2's GGUF
    align_eos(tok, eos)
    assert tok.eos_token_id == eos
    assert encode(next(examples(0, "train", 1)), tok).answer_ids[-1] == eos


def test_cli_builds_the_finetune_settings():
    from localist.clients.cli import build_parser
    from localist.model.cli import finetune_config

    args = build_parser().parse_args(["finetune", "--out", "a", "--base", "b.gguf", "--mu", "0", "--rho-ramp", "0", "0.2",
                                      "--dial-scope", "evidence"])
    cfg = finetune_config(args)
    assert (cfg.mu, cfg.rho_ramp, cfg.dial_scope, cfg.lora_rank) == (0.0, (0.0, 0.2), "evidence", 8)


# -- the rulebook evaluation's scoring (model/evaluate.py); the vLLM run itself is measured in the model card --
def test_wilson_interval_matches_the_closed_form():
    from localist.model.evaluate import wilson_interval

    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)


def test_answers_are_scored_on_outcome_and_rule_label():
    from localist.model.evaluate import answer_scores, majority_baseline, rulebook_cases

    cases = rulebook_cases("test", 4)
    ruled = next(c for c in cases if c.target)
    no_rule = next(c for c in cases if not c.target)
    assert answer_scores(ruled, ruled.answer + "<junk>") == {"joint": True, "outcome": True, "abstention": True}
    wrong_rule = answer_scores(ruled, f"Rule: {ruled.target}9. Outcome: {ruled.outcome}.")
    assert wrong_rule == {"joint": False, "outcome": True, "abstention": True}
    assert answer_scores(no_rule, ruled.answer) == {"joint": False, "outcome": False, "abstention": False}
    assert answer_scores(no_rule, "Rule: none. Outcome: no rule applies.")["joint"]
    assert majority_baseline(cases) == 0.25  # four classes a rulebook, one question each


def test_the_faithfulness_probe_removes_the_target_rule():
    from localist.model.evaluate import rulebook_cases
    from localist.model.rulebooks import NO_RULE

    originals = [c for c in rulebook_cases("test", 8) if c.target]
    probes = rulebook_cases("test-target-removed", 8)
    assert len(probes) == len(originals)
    for original, probe in zip(originals, probes):
        assert [r.label for r in probe.rules] == [r.label for r in original.rules if r.label != original.target]
        assert (probe.outcome, probe.target, probe.answer) == (NO_RULE, None, "Rule: none. Outcome: no rule applies.")


def test_a_table_row_aggregates_over_cases():
    from localist.model.evaluate import rulebook_row

    common = dict(candidate_mass=0.5, entropy_nats=1.0, block_entropy_nats=0.5)
    results = [
        dict(joint=True, outcome=True, abstention=True, has_target=True, pointer_fidelity=0.9, wrong_block_share=0.0,
             rho_star_median=0.5, **common),
        dict(joint=False, outcome=True, abstention=True, has_target=True, pointer_fidelity=None, wrong_block_share=1.0,
             rho_star_median=None, **common),
        dict(joint=True, outcome=True, abstention=True, has_target=False, pointer_fidelity=None, wrong_block_share=None,
             rho_star_median=None, **common),
    ]
    row = rulebook_row(0.9, results)
    assert row["joint_accuracy"] == pytest.approx(2 / 3) and row["pointer_fidelity"] == 0.9
    assert row["fidelity_null_rate"] == 0.5 and row["wrong_block_share"] == 0.5 and row["rho_star_median"] == 0.5


def test_a_re_measured_table_is_compared_number_by_number():
    from localist.model.evaluate import RULEBOOK_COLUMNS, compare_rulebook_tables

    row = {"rho": 0.9, **{k: 0.5 for k in RULEBOOK_COLUMNS}}
    stored = {"test": {"all": [row]}}
    assert compare_rulebook_tables(stored, {"test": {"all": [dict(row, joint_accuracy=0.515)]}}) == []
    problems = compare_rulebook_tables(stored, {"test": {"all": [dict(row, joint_accuracy=0.53, wrong_block_share=None)]}})
    assert len(problems) == 2 and "joint_accuracy" in problems[0]
    assert compare_rulebook_tables(stored, {"test": {"evidence": [row]}}) == ["test evidence rho=0.9: not in the stored table"]
