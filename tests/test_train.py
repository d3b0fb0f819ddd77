"""Dial-aware training (docs/theory.md §5) and recruitment (docs/theory.md §6): a tiny real run on CPU."""
import json
import math

import pytest
import torch

from localist.model.attention import BlockStats
from localist.model.blocks import Block, BlockTable
from localist.model.data import encode, examples
from localist.model.recruitment import greedy_split, split_block, split_cost
from localist.model.tokenizer import train_tokenizer
from localist.model.train import (
    Batch, TrainConfig, Trainer, blocks_at, candidate_entropy, load_layout, mu_at, off_target_share, pointer_at,
    collate, query_fidelity, readout_miss, sample_rho,
)


def tiny(out, **kw):
    base = dict(out=str(out), steps=24, batch_size=6, lr=5e-3, warmup=3, hidden_size=64, num_layers=2, num_heads=2,
                intermediate_size=128, vocab_size=600, tokenizer_examples=200, max_blocks=3, eval_every=12,
                eval_examples=4, recruit_every=12, recruit_probes=3, checkpoint_every=12, rho_ramp=(0.0, 0.5),
                mu_ramp=(0.2, 0.5), progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("run")
    Trainer(tiny(out, readout_weight=0.5)).run()
    return out


def test_loss_falls_and_everything_is_logged(run):
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25))
    first = sum(r["nll"] for r in log[:5]) / 5
    last = sum(r["nll"] for r in log[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert log[0]["mu"] == 0.0 and log[-1]["mu"] == 0.25  # the penalty ramps in
    assert all(r["readout"] > 0 for r in log)  # −ln of a weight on one token, over every copied answer token
    assert "validation" in log[11] and "rho=0.9" in log[11]["validation"]


def test_recruitment_decisions_are_logged_with_gain_and_cost(run):
    decisions = [json.loads(line) for line in (run / "recruitment.jsonl").read_text().splitlines()]
    assert {d["step"] for d in decisions} == {12, 24}
    for d in decisions:
        assert d["cost_nats"] > 0 and d["splits"] >= 1
        assert d["accepted"] == (d["gain_nats"] > d["cost_nats"]) or not d["accepted"]
    assert load_layout(run) == [d["move"].removeprefix("split kind ") for d in decisions if d["accepted"]]


def test_export_is_a_stock_hf_checkpoint_that_loads_in_the_reference_model(run):
    from localist.model.reference import ReferenceLM

    lm = ReferenceLM.from_pretrained(run)
    assert lm.model.config.model_type == "llama" and lm.tokenizer.chat_template
    meta = json.loads((run / "localist.json").read_text())
    assert meta["steps_done"] == 24 and meta["training"]["seed"] == 0


def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(2)
    cfg = dict(steps=6, checkpoint_every=3, eval_every=100, recruit_every=0)
    straight = Trainer(tiny(tmp_path / "a", **cfg))
    straight.run()
    half = Trainer(tiny(tmp_path / "b", **cfg))
    for batch, _ in zip(half.loader(), range(3)):
        half.train_step(batch)
    half._save_checkpoint()
    resumed = Trainer(tiny(tmp_path / "b", **cfg))
    assert resumed.step == 3
    resumed.run()
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_dial_is_sampled_per_sequence_and_ramps():
    cfg = tiny("/tmp/unused", steps=100, rho_ramp=(0.2, 0.4), rho_max=0.95)
    assert torch.equal(sample_rho(cfg, 7, 64), sample_rho(cfg, 7, 64))
    assert float(sample_rho(cfg, 10, 64).max()) == 0.0  # before the ramp: plain LM
    late = sample_rho(cfg, 90, 256)
    assert 0.0 < float(late.max()) < 0.95 and float((late == 0).float().mean()) > 0.1
    assert mu_at(cfg, 0) == 0.0 and mu_at(cfg, 100) == cfg.mu


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        tiny("/tmp/unused", hidden_size=64, num_heads=4).validate()
    with pytest.raises(ValueError, match="rho_max"):
        tiny("/tmp/unused", rho_max=1.0).validate()


def test_candidate_entropy_counts_only_pointing_queries():
    # blocks: 0 sink, 1 and 2 evidence, 3 question; two queries: one inside evidence, one in the question
    mass = torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.2, 0.2, 0.2, 0.4]]).view(1, 1, 2, 4)
    stats = BlockStats(log_mass=torch.zeros(1, 1, 2, 4), mass=mass, inner_entropy=torch.zeros(1, 1, 2, 4))
    batch = Batch(
        input_ids=torch.zeros(1, 2, dtype=torch.long), block_ids=torch.tensor([[1, 3]]),
        pinned=torch.tensor([[True, False, False, False]]), candidate=torch.tensor([[False, True, True, False]]),
        target=torch.tensor([1]), weights=torch.zeros(1, 1), answer=torch.zeros(1, 1, dtype=torch.bool),
        lookup=torch.zeros(1, 1, dtype=torch.bool),
    )
    assert float(candidate_entropy([stats], batch)) == pytest.approx(math.log(2))


def test_split_cost_is_in_nats():
    assert split_cost(3, 5) == pytest.approx(math.log(3) + math.log(5))
    assert split_cost(3, 5, new_params=10, num_tokens=100, extra=1.0) == pytest.approx(
        math.log(15) + 5 * math.log(100) + 1.0)
    with pytest.raises(ValueError, match="extra"):
        split_cost(3, 5, extra=-1)


def test_greedy_split_accepts_only_gains_above_cost_and_stops():
    tok = train_tokenizer(["Case one. Case two. Which rule?"] * 20, vocab_size=300, min_frequency=1)
    ids = [tok.bos_token_id] + tok("Case one. Case two. Which rule?", add_special_tokens=False)["input_ids"]
    n = len(ids)
    table = BlockTable([Block(0, "sink", "sink", 0, 1, pinned=True), Block(1, "q", "user", 1, n),
                        Block(2, "response", "response", n, n)], ids)
    # a layout that separates the first sentence is worth 10 nats; nothing else helps
    def nll(t):
        return 20.0 - (10.0 if any(b.label.startswith("q.") for b in t.blocks) and t.num_blocks == 4 else 0.0)

    new, decisions = greedy_split(table, tok, nll)
    assert [d.accepted for d in decisions] == [True, False]
    assert decisions[0].gain_nats == pytest.approx(10.0) and decisions[0].cost_nats == pytest.approx(
        math.log(2) + math.log(4))
    assert new.num_blocks == 4 and new.blocks[1].kind == new.blocks[2].kind == "user"
    assert tok.decode(new.token_ids[new.blocks[1].start:new.blocks[1].end]).endswith(".")
    with pytest.raises(ValueError, match="strictly inside"):
        split_block(table, 1, 1)


def test_curriculum_grows_the_block_count_from_two():
    cfg = tiny("/tmp/unused", steps=100, curriculum=0.5, min_blocks=3, max_blocks=8)
    counts = [blocks_at(cfg, step) for step in range(100)]
    assert counts[0] == (2, 2) and counts[49][0] == 2 and counts[50] == (3, 8) and counts[99] == (3, 8)
    assert all(a[1] <= b[1] for a, b in zip(counts, counts[1:]))  # never shrinks
    assert blocks_at(tiny("/tmp/unused", curriculum=0.0, max_blocks=5), 0) == (3, 5)


def test_off_target_share_is_one_minus_answer_fidelity_and_trains_the_attention():
    # blocks: 0 sink (pinned), 1 and 2 evidence (target 1), 3 question; query 0 predicts the answer token
    log_mass = torch.tensor([[0.0, 1.0, 2.0, 0.0]] * 2, requires_grad=True)
    mass = torch.softmax(log_mass, -1).view(1, 1, 2, 4)
    stats = BlockStats(log_mass=log_mass.view(1, 1, 2, 4), mass=mass, inner_entropy=torch.zeros(1, 1, 2, 4))
    batch = Batch(
        input_ids=torch.zeros(1, 2, dtype=torch.long), block_ids=torch.tensor([[1, 3]]),
        pinned=torch.tensor([[True, False, False, False]]), candidate=torch.tensor([[False, True, True, False]]),
        target=torch.tensor([1]), weights=torch.ones(1, 1), answer=torch.ones(1, 1, dtype=torch.bool),
        lookup=torch.tensor([[False]]),
    )
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 0.0]), -1)
    loss = off_target_share(query_fidelity([stats], batch), batch.answer)
    assert loss.item() == pytest.approx(float(p[2] / (p[1] + p[2])))
    loss.backward(retain_graph=True)
    assert log_mass.grad[0, 1] < 0 < log_mass.grad[0, 2]  # towards the target, away from the distractor
    assert torch.all(log_mass.grad[1] == 0)  # the query that does not answer is not scored
    log_mass.grad = None
    off_target_share(query_fidelity([stats], batch), batch.lookup).backward()
    assert torch.all(log_mass.grad == 0)  # the lookup term scores only the query that cites the id
    cfg = tiny("/tmp/unused", steps=100, pointer_weight=0.5, readout_weight=3.0, pointer_ramp=(0.2, 0.4))
    assert pointer_at(cfg, 0) == (0.0, 0.0) and pointer_at(cfg, 30) == (0.25, 1.5) and pointer_at(cfg, 40) == (0.5, 3.0)


def test_readout_term_trains_one_head_on_each_copied_token(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run)
    encoded = [encode(e, tok) for e in examples(0, "train", 4)]
    batch = collate(encoded, tok.pad_token_id, 0.2)
    rows, queries, sources = batch.copies.T
    assert torch.equal(batch.input_ids[rows, queries + 1], batch.input_ids[rows, sources])  # query predicts its copy
    assert bool(batch.answer[rows, queries].all())
    weights = torch.tensor([[0.1, 0.5], [0.9, 0.2]], requires_grad=True)  # [P, H] of the last layer
    earlier = torch.ones(2, 2, requires_grad=True)  # an earlier layer's heads on the sources do not count
    stats = [BlockStats(*(torch.zeros(1),) * 3, token_weights=w) for w in (earlier, weights)]
    pairs = Batch(*(getattr(batch, f) for f in ("input_ids", "block_ids", "pinned", "candidate", "target",
                                                  "weights", "answer", "lookup")), copies=torch.zeros(2, 3, dtype=torch.long))
    loss = readout_miss(stats, pairs)
    assert loss.item() == pytest.approx(-(math.log(0.1) + math.log(0.9)) / 2)
    loss.backward()
    assert bool((weights.grad[:, 0] < 0).all())  # more weight on the source lowers the loss
    assert bool((weights.grad[:, 1] == 0).all()) and earlier.grad is None  # only the designated head is trained


def test_second_stage_starts_from_an_exported_model_and_stops_where_told(run, tmp_path):
    torch.set_num_threads(2)
    stage = Trainer(tiny(tmp_path / "stage2", init_from=str(run), steps=10, stop_at=2, eval_every=100, recruit_every=0))
    first = Trainer(tiny(run, steps=24))  # the finished first stage, resumed from its checkpoint
    for p, q in zip(first.model.parameters(), stage.model.parameters()):
        assert torch.equal(p, q)
    assert stage.tokenizer.get_vocab() == first.tokenizer.get_vocab() and stage.step == 0
    out = stage.run()
    meta = json.loads((out / "localist.json").read_text())
    assert meta["steps_done"] == 2 and meta["training"]["init_from"] == str(run)
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_train_flags_build_the_config():
    from localist.clients.cli import build_parser
    from localist.model.cli import train_config

    args = build_parser().parse_args(["train", "--out", "run", "--paraphrases", "--pointer-ramp", "0", "0.5",
                                      "--stop-at", "5", "--no-progress"])
    cfg = train_config(args)
    assert cfg.paraphrases is True and cfg.pointer_ramp == (0.0, 0.5) and cfg.stop_at == 5 and not cfg.progress
    assert cfg.mu == TrainConfig.mu and cfg.rho_ramp == TrainConfig.rho_ramp  # unset flags keep the defaults
    assert train_config(build_parser().parse_args(["train", "--out", "run", "--no-paraphrases"])).paraphrases is False
