"""Dial-aware training of the default localist model (docs/theory.md §5–6).

Loss per batch = NLL + μ · mean H(q^ρ), the candidate block entropy of the queries that point (those
outside evidence blocks that see ≥ 2 candidate blocks), + ν · (1 − F), the answer's off-target
evidence share against the training split's ground truth, + κ · the same share at the one query that
writes the cited id (``lookup_weight``), + τ · the readout head's −ln weight on the source of each
answer token read off the target block (``readout_weight``), with ρ drawn per sequence from a spread over
[0, 1) so that one set of weights serves every dial value. The model is a stock HF Llama run through
the reference localist attention, so the saved checkpoint loads in HF and vLLM as is. Layout
recruitment (docs/theory.md §6) runs every ``recruit_every`` steps on validation probes; every decision is
logged to ``recruitment.jsonl``.

Deterministic given the seed: data index, dial draw and init depend only on (seed, step), so a
resumed run continues exactly where the checkpoint left it.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

from localist.model.blocks import BlockTable
from localist.model.data import Encoded, corpus_texts, encode, examples, make_example
from localist.model.recruitment import recruit_layout
from localist.model.reference import ATTN_IMPLEMENTATION, LocalistBatch, register
from localist.model.tokenizer import train_tokenizer
from localist.model.train_config import TrainConfig

CHECKPOINT = "checkpoint.pt"
LAYOUT_FILE = "localist.json"


def ramp(fractions: tuple, steps: int, step: int) -> float:
    """0 before the first fraction of training, 1 after the second, linear in between."""
    start, end = (f * steps for f in fractions)
    if step >= end:
        return 1.0
    return min(max((step - start) / max(end - start, 1), 0.0), 1.0)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    block_ids: torch.Tensor  # [B, T], −1 = padding
    pinned: torch.Tensor  # [B, G]
    candidate: torch.Tensor  # [B, G]
    target: torch.Tensor  # [B] ground-truth block
    weights: torch.Tensor  # [B, T−1] next-token loss weights
    answer: torch.Tensor  # [B, T−1] bool: position t predicts an answer token
    lookup: torch.Tensor  # [B, T−1] bool: position t predicts the cited id (Encoded.lookup)
    copies: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))  # [P, 3] (row, query, source)
    pointing: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))  # [B, T−1] (Encoded.pointing)

    def to(self, device: str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(encoded: Sequence[Encoded], pad_id: int, prompt_weight: float) -> Batch:
    """Right-padded tensors; the answer (EOS included) is what the model is mainly trained to produce."""
    T = max(len(e.input_ids) for e in encoded)
    G = max(e.table.num_blocks for e in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    block_ids = torch.full((B, T), -1, dtype=torch.long)
    pinned = torch.zeros(B, G, dtype=torch.bool)
    candidate = torch.zeros(B, G, dtype=torch.bool)
    weights = torch.zeros(B, T - 1)
    answer = torch.zeros(B, T - 1, dtype=torch.bool)
    lookup = torch.zeros(B, T - 1, dtype=torch.bool)
    pointing = torch.zeros(B, T - 1, dtype=torch.bool)
    for row, e in enumerate(encoded):
        n, p = len(e.input_ids), len(e.table.token_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        block_ids[row, :n] = torch.tensor(e.block_ids)
        pinned[row, : e.table.num_blocks] = torch.tensor(e.table.pinned())
        candidate[row, : e.table.num_blocks] = torch.tensor(e.table.candidates())
        weights[row, : p - 1] = prompt_weight
        weights[row, p - 1 : n - 1] = 1.0
        answer[row, p - 1 : n - 1] = True
        if e.lookup >= 0:
            lookup[row, p - 1 + e.lookup] = True
        for k in e.pointing:
            pointing[row, p - 1 + k] = True
    target = torch.tensor([e.target_block for e in encoded])
    copies = torch.tensor([(row, len(e.table.token_ids) - 1 + k, src) for row, e in enumerate(encoded)
                           for k, src in e.copies], dtype=torch.long).view(-1, 3)
    return Batch(input_ids, block_ids, pinned, candidate, target, weights, answer, lookup, copies, pointing)


def forward(model: PreTrainedModel, batch: Batch, rho: torch.Tensor):
    """Logits and per-layer BlockStats with one ρ per sequence for every layer."""
    L = model.config.num_hidden_layers
    lb = LocalistBatch(batch.block_ids, batch.pinned, rho.view(-1, 1).expand(-1, L).contiguous(), batch.copies)
    logits = model(input_ids=batch.input_ids, localist=lb, use_cache=False).logits
    return logits.float(), [lb.stats[i] for i in range(L)]


def pointing_queries(batch: Batch) -> torch.Tensor:
    """[B, T] queries that point: outside evidence blocks (evidence is read, not a pointer)."""
    own = batch.block_ids.clamp(min=0)
    return (batch.block_ids >= 0) & ~torch.gather(batch.candidate, 1, own)


def candidate_entropy(stats, batch: Batch) -> torch.Tensor:
    """mean over layers, heads and pointing queries of H(q^ρ) in nats (docs/theory.md §5), differentiable."""
    cand = batch.candidate[:, None, None, :]
    query = pointing_queries(batch)[:, None, :]
    total, count = 0.0, 0
    for s in stats:
        cm = s.mass * cand
        c = cm.sum(-1)
        visible = (torch.isfinite(s.log_mass) & cand).sum(-1)
        keep = query & (visible >= 2) & (c > 1e-6)
        q = cm / c.clamp(min=1e-12).unsqueeze(-1)
        H = -(q * q.clamp(min=1e-12).log()).sum(-1)
        total = total + (H * keep).sum()
        count += int(keep.sum())
    return total / max(count, 1)


def query_fidelity(stats, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query that predicts a token ([B, T−1]): Σ over layers and heads of π(target) and of the
    candidate mass. Computed once a step; each pointer term and the validation weigh their queries."""
    tgt = batch.target.view(-1, 1, 1, 1)
    cand = batch.candidate[:, None, None, :]
    on_t = sum(s.mass.gather(-1, tgt.expand(*s.mass.shape[:-1], 1)).squeeze(-1).sum(1) for s in stats)
    on_c = sum((s.mass * cand).sum((1, 3)) for s in stats)
    return on_t[:, :-1], on_c[:, :-1]


def off_target_share(fidelity: tuple[torch.Tensor, torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """1 − pointer fidelity (docs/theory.md §3, response-level F over ``queries`` [B, T−1], layers, heads) of
    the batch, differentiable: the evidence-directed attention of those queries that misses the target.

    Ground truth of the training split only; it teaches a head that reads evidence to read the
    right block, or none (a head that cannot know the target yet, e.g. in layer 0, is free to
    attend to the question or the sink instead)."""
    on_t, on_c = fidelity
    q = queries.float()
    return 1.0 - (on_t * q).sum() / (on_c * q).sum().clamp(min=1e-6)


def readout_miss(stats, batch: Batch) -> torch.Tensor:
    """Mean over the answer tokens read off the target block (``Encoded.copies``) of −ln the weight
    that one designated head, the last layer's first, puts on the token's source: the id in the
    heading, the outcome or value in the body. Block-level terms put heads on the right block;
    reading it needs a head on the one token that carries what the answer copies. One head, not the
    best of all: a best-of-heads target is met by heads that each sit on a different block's id."""
    if batch.copies.shape[0] == 0:
        return torch.zeros((), device=batch.input_ids.device)
    return -stats[-1].token_weights[:, 0].clamp(min=1e-9).log().mean()


def sample_rho(cfg: TrainConfig, step: int, n: int) -> torch.Tensor:
    """One ρ per sequence. The circuits that find a block form at ρ = 0 (at high ρ an untrained
    model's attention collapses onto the largest block); the dial's range then widens to rho_max."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rho = torch.rand(n, generator=g) * cfg.rho_max * ramp(cfg.rho_ramp, cfg.steps, step)
    zero = torch.rand(n, generator=g) < cfg.rho_zero_share
    return torch.where(zero, 0.0, rho)


def mu_at(cfg: TrainConfig, step: int) -> float:
    """The penalty sharpens a pointer once there is one: applied early, it locks attention onto
    whichever block happens to lead and starves the gradient that would find the right one."""
    return cfg.mu * ramp(cfg.mu_ramp, cfg.steps, step)


def blocks_at(cfg: TrainConfig, step: int) -> tuple[int, int]:
    """(min, max) evidence blocks per example: a lookup among 2 blocks is learnt first (its gradient
    is strong: half the examples already point right by chance), then the count grows to the full range."""
    if cfg.curriculum == 0 or step >= cfg.curriculum * cfg.steps:
        return cfg.min_blocks, cfg.max_blocks
    hi = 2 + int((cfg.max_blocks - 2) * step / (cfg.curriculum * cfg.steps))
    return 2, max(hi, 2)


def pointer_at(cfg: TrainConfig, step: int) -> tuple[float, float]:
    """(ν, τ) at this step. They ramp in over ``pointer_ramp``: from the start, a pointer loss on the
    answer starves the positional heads (previous token, induction) that reading a block needs; they
    form first, then get aimed. Their ramp is μ's own, or earlier: a head the entropy penalty has
    locked onto a block gets no pointer gradient."""
    r = ramp(cfg.pointer_ramp, cfg.steps, step)
    return cfg.pointer_weight * r, cfg.readout_weight * r


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def build_model(cfg: TrainConfig, tokenizer) -> PreTrainedModel:
    register()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=1024, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32)


class StepBatches(torch.utils.data.Dataset):
    """Item i = the training batch of step ``start + i`` (built on CPU, in worker processes if any)."""

    def __init__(self, cfg: TrainConfig, tokenizer, split_kinds: list[str], start: int):
        self.cfg, self.tokenizer, self.split_kinds, self.start = cfg, tokenizer, split_kinds, start

    def __len__(self) -> int:
        return self.cfg.steps - self.start

    def __getitem__(self, i: int) -> Batch:
        cfg, step = self.cfg, self.start + i
        lo, hi = blocks_at(cfg, step)
        exs = [make_example(cfg.seed, "train", step * cfg.batch_size + j, lo, hi, cfg.paraphrases)
               for j in range(cfg.batch_size)]
        encoded = [encode(e, self.tokenizer, self.split_kinds) for e in exs]
        return collate(encoded, self.tokenizer.pad_token_id, cfg.prompt_weight)


class Trainer:
    """One training run in ``cfg.out``; :meth:`run` resumes from ``checkpoint.pt`` when present."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.backends.cuda.matmul.allow_tf32 = True  # GPU speed; the eval table, not bits, must reproduce
        if cfg.init_from:
            register()
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.init_from)
            self.model = AutoModelForCausalLM.from_pretrained(
                cfg.init_from, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32).to(cfg.device)
        else:
            self.tokenizer = train_tokenizer(corpus_texts(cfg.seed, cfg.tokenizer_examples), vocab_size=cfg.vocab_size)
            self.model = build_model(cfg, self.tokenizer).to(cfg.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.98),
        )
        self.step = 0
        self.split_kinds: list[str] = []
        self.probes = [encode(e, self.tokenizer) for e in examples(cfg.seed, "validation", cfg.recruit_probes)]
        self.validation = list(examples(cfg.seed, "validation", cfg.eval_examples, start=cfg.recruit_probes))
        if (self.out / CHECKPOINT).exists():
            self._load()

    # -- data -------------------------------------------------------------------------------------
    def loader(self) -> torch.utils.data.DataLoader:
        """Batches from the current step on; a batch depends only on (seed, step, layout)."""
        data = StepBatches(self.cfg, self.tokenizer, list(self.split_kinds), self.step)
        return torch.utils.data.DataLoader(
            data, batch_size=None, num_workers=self.cfg.num_workers,
            prefetch_factor=8 if self.cfg.num_workers else None,
        )

    def collate(self, encoded: Sequence[Encoded]) -> Batch:
        return collate(encoded, self.tokenizer.pad_token_id, self.cfg.prompt_weight).to(self.cfg.device)

    # -- loop ---------------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> dict:
        cfg = self.cfg
        self.model.train()
        batch = batch.to(cfg.device)
        rho = sample_rho(cfg, self.step, cfg.batch_size).to(cfg.device)
        logits, stats = forward(self.model, batch, rho)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        loss_nll = (nll * batch.weights).sum() / batch.weights.sum()
        penalty = candidate_entropy(stats, batch)
        fidelity = query_fidelity(stats, batch)
        off_target = off_target_share(fidelity, batch.answer)
        off_lookup = off_target_share(fidelity, batch.lookup)
        readout = readout_miss(stats, batch)
        nu, tau = pointer_at(cfg, self.step)
        loss = (loss_nll + mu_at(cfg, self.step) * penalty + nu * off_target + cfg.lookup_weight * off_lookup
                + tau * readout)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        answer_nll = (nll * batch.answer).sum() / batch.answer.sum()
        return {"step": self.step, "loss": loss.item(), "nll": loss_nll.item(), "answer_nll": answer_nll.item(),
                "penalty": penalty.item(), "off_target": off_target.item(), "off_lookup": off_lookup.item(),
                "readout": readout.item(), "mu": mu_at(cfg, self.step - 1),
                "nu": nu, "tau": tau, "grad_norm": grad_norm.item(), "lr": lr_at(cfg, self.step - 1)}

    def run(self) -> Path:
        cfg = self.cfg
        log = (self.out / "train_log.jsonl").open("a")
        end = cfg.stop_at or cfg.steps
        bar = tqdm(total=end, initial=self.step, disable=not cfg.progress, desc="train", unit="step")
        while self.step < end:
            for batch in self.loader():  # rebuilt whenever recruitment changes the layout
                rec = self.train_step(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", ans=f"{rec['answer_nll']:.3f}", H=f"{rec['penalty']:.3f}",
                                off=f"{rec['off_target']:.3f}")
                if self.step % cfg.eval_every == 0 or self.step == end:
                    rec["validation"] = self.validate()
                    bar.write(json.dumps({"step": self.step, **rec["validation"]}))
                layout = list(self.split_kinds)
                if cfg.recruit_every and self.step % cfg.recruit_every == 0:
                    self.recruit()
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if self.step % cfg.checkpoint_every == 0 or self.step == end:
                    self._save_checkpoint()
                if self.split_kinds != layout or self.step == end:
                    break
        bar.close()
        log.close()
        return self.export()

    # -- validation and recruitment -----------------------------------------------------------------
    @torch.no_grad()
    def teacher_forced(self, encoded: Sequence[Encoded], rho: float) -> dict:
        """Exact match (every answer token, EOS included, is the argmax), the cited id alone (the
        argmax at the lookup query) and answer-token fidelity."""
        self.model.eval()
        correct, ids, on_t, on_c, nll_sum = 0, 0, 0.0, 0.0, []
        for i in range(0, len(encoded), 32):
            batch = self.collate(encoded[i : i + 32])
            logits, stats = forward(self.model, batch, torch.full((batch.input_ids.shape[0],), rho, device=self.cfg.device))
            target = batch.input_ids[:, 1:]
            hit = (logits[:, :-1].argmax(-1) == target) | ~batch.answer
            correct += int(hit.all(-1).sum())
            ids += int((hit & batch.lookup).sum())
            t, c = query_fidelity(stats, batch)
            on_t, on_c = on_t + float((t * batch.answer).sum()), on_c + float((c * batch.answer).sum())
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
            nll_sum.extend(((nll * batch.answer).sum(-1)).tolist())
        return {"exact_match": correct / len(encoded), "id_accuracy": ids / len(encoded),
                "fidelity": on_t / max(on_c, 1e-12), "answer_nll": nll_sum}

    def validate(self) -> dict:
        encoded = [encode(e, self.tokenizer, self.split_kinds) for e in self.validation]
        out = {}
        for rho in (0.0, 0.9):
            r = self.teacher_forced(encoded, rho)
            out[f"rho={rho}"] = {k: round(r[k], 4) for k in ("exact_match", "id_accuracy", "fidelity")}
        return out

    def recruit(self) -> None:
        """Greedy layout recruitment on the probes at ``recruit_rho``; every decision is logged."""
        def nll(tables: Sequence[BlockTable]) -> list[float]:
            encoded = [Encoded(t, p.answer_ids, t.index(p.table.blocks[p.target_block].label))
                       for t, p in zip(tables, self.probes)]
            return self.teacher_forced(encoded, self.cfg.recruit_rho)["answer_nll"]

        tables = [p.table for p in self.probes]
        kinds, decisions = recruit_layout(tables, self.tokenizer, nll, self.split_kinds,
                                          self.cfg.recruit_extra_cost, step=self.step)
        with (self.out / "recruitment.jsonl").open("a") as f:
            for d in decisions:
                f.write(json.dumps(d.to_dict()) + "\n")
        self.split_kinds = kinds

    # -- persistence --------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                 "split_kinds": self.split_kinds, "config": asdict(self.cfg)}
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out / CHECKPOINT)

    def _load(self) -> None:
        state = torch.load(self.out / CHECKPOINT, map_location=self.cfg.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.split_kinds = list(state["split_kinds"])

    def export(self) -> Path:
        """HF checkpoint (config, safetensors, tokenizer) plus the recruited layout in ``localist.json``."""
        dtype = getattr(torch, self.cfg.save_dtype)
        self.model.to(dtype).save_pretrained(str(self.out), safe_serialization=True)
        self.model.to(torch.float32)
        self.tokenizer.save_pretrained(str(self.out))
        meta = {"layout": {"split_kinds": self.split_kinds}, "training": asdict(self.cfg), "steps_done": self.step}
        (self.out / LAYOUT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return self.out


def load_layout(path: str | Path) -> list[str]:
    """The block kinds the model's training recruited for splitting (empty when none were)."""
    meta = Path(path) / LAYOUT_FILE
    return json.loads(meta.read_text())["layout"]["split_kinds"] if meta.exists() else []


def train(cfg: TrainConfig) -> Path:
    return Trainer(cfg).run()


__all__ = ["TrainConfig", "Trainer", "train", "collate", "forward", "candidate_entropy", "load_layout"]
