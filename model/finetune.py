"""Fine-tuning a pretrained instruct model with the dial (docs/theory.md §5): LoRA through the reference model.

The base (a GGUF file, dequantized to float32, or a Hugging Face folder) stays frozen; low-rank
adapters on its attention and MLP projections learn the rulebook task (``localist.model.rulebooks``)
with the loss of docs/theory.md §5 restricted to what a pretrained model needs:

    answer NLL + μ · H̄(q^ρ) + ν · (1 − F_pointing),

H̄ over the answer queries, F (pointer fidelity against the ground-truth rule) over the *pointing*
queries: those that write the answer up to the end of the rule's label, before the label exists to
be matched, and the outcome word (``Encoded.pointing``). ρ is drawn per sequence in the dial scope
the model will be served with (docs/theory.md §2 "Dial scope"). Examples whose answer is that no
rule applies have no target block: they count in the NLL and the penalty, never in a pointer term.
The attention is ``model/finetune_attention.py``'s: the reference computation where the dial
changes the output, the stock fused kernel where it does not, statistics at the answer only.

The adapter is written in PEFT's file layout (``adapter_config.json``, ``adapter_model.safetensors``)
so that PEFT can load it, but nothing here needs PEFT: serving merges it once into the base
(``localist.model.default_model.merged_model_dir``), W ← W + (α/r)·B·A, and serves a plain float32 checkpoint. This module
never imports the server (the GPU image has neither pydantic nor vLLM).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from localist.model.blocks import with_dial_scope
from localist.model.data import Encoded
from localist.model.finetune_attention import TRAIN_ATTENTION, TrainAttention, answer_terms, pointer_loss
from localist.model.finetune_attention import register as register_training_attention
from localist.model.gguf_import import PROVENANCE_FILE, file_sha256, import_gguf
from localist.model.reference import load_localist_model
from localist.model.rulebooks import encode, examples
from localist.model.train import Batch, collate, lr_at, mu_at, ramp, sample_rho
from localist.model.train_config import FinetuneConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FINETUNE_META = "finetune.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM's modules


# -- LoRA -------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``base(x) + (α/r) · x Aᵀ Bᵀ`` with the base frozen; B starts at 0, so training starts at the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default for A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap every linear layer whose name ends in one of ``targets``."""
    model.requires_grad_(False)
    wrapped = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    missing = set(targets) - {n.rsplit(".", 1)[-1] for n in wrapped}
    if missing:
        raise ValueError(f"lora_targets: no linear layer named {sorted(missing)} in the model")
    return wrapped


def save_adapter(loras: dict[str, LoRALinear], out: Path, rank: int, alpha: float, base: str) -> Path:
    """The adapter in PEFT's layout: float32 A and B per wrapped module."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, lora in loras.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora.lora_A.detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora.lora_B.detach().float().cpu().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    targets = sorted({n.rsplit(".", 1)[-1] for n in loras})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "init_lora_weights": True, "base_model_name_or_path": base}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def adapter_deltas(adapter: str | Path) -> dict[str, torch.Tensor]:
    """``{module name: (α/r)·B·A}`` in float32 from an adapter folder."""
    adapter = Path(adapter)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("fan_in_fan_out"):
        raise ValueError(f"{adapter}: only plain LoRA adapters can be merged, got {config}")
    scale = float(config["lora_alpha"]) / int(config["r"])
    weights = load_file(str(adapter / ADAPTER_WEIGHTS))
    out = {}
    for key, A in weights.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            B = weights[f"{PEFT_PREFIX}{name}.lora_B.weight"]
            out[name] = (B.double() @ A.double() * scale).float()
    return out


def merge_adapter(base_dir: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """A plain float32 checkpoint: the base's weights plus the adapter's deltas, tokenizer and provenance.

    Written beside ``out_dir`` and renamed, so a merge that stops half-way never looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter, out_dir = Path(base_dir), Path(adapter), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in adapter_deltas(adapter).items():
            if name not in modules:
                raise ValueError(f"{adapter}: module {name} is not in the base model {base_dir}")
            modules[name].weight += delta
    base_provenance = base_dir / PROVENANCE_FILE
    provenance = {"base": json.loads(base_provenance.read_text()) if base_provenance.exists() else str(base_dir),
                  "adapter": {"sha256": file_sha256(adapter / ADAPTER_WEIGHTS),
                              "config": json.loads((adapter / ADAPTER_CONFIG).read_text())},
                  "dtype": "float32"}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.config.dtype = "float32"
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if (adapter / FINETUNE_META).exists():
            shutil.copy(adapter / FINETUNE_META, staging / FINETUNE_META)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.chmod(0o755)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def base_folder(base: str | Path, work: Path) -> Path:
    """A Hugging Face folder for ``base``: itself, or a GGUF file converted to float32 under ``work``."""
    base = Path(base)
    if base.is_dir():
        return base
    if base.suffix != ".gguf":
        raise ValueError(f"base: {base} is neither a model folder nor a .gguf file")
    out = work / f"{file_sha256(base)[:16]}-float32"
    return out if (out / "config.json").exists() else import_gguf(base, out, "float32")


# -- data -------------------------------------------------------------------------------------------
def encode_scoped(example, tokenizer, scope: str) -> Encoded:
    enc = encode(example, tokenizer)
    return replace(enc, table=with_dial_scope(enc.table, scope))


class RulebookBatches(torch.utils.data.Dataset):
    """Item i = the batch of step ``start + i``: consecutive training examples (four questions a rulebook)."""

    def __init__(self, cfg: FinetuneConfig, tokenizer, start: int):
        self.cfg, self.tokenizer, self.start = cfg, tokenizer, start

    def __len__(self) -> int:
        return (self.cfg.stop_at or self.cfg.steps) - self.start

    def __getitem__(self, i: int) -> Batch:
        cfg = self.cfg
        exs = examples(cfg.seed, "train", cfg.batch_size, start=(self.start + i) * cfg.batch_size)
        encoded = [encode_scoped(e, self.tokenizer, cfg.dial_scope) for e in exs]
        return collate(encoded, self.tokenizer.pad_token_id, 0.0)  # the answer is learnt, the prompt is the base's


@dataclass
class AnswerQueries:
    """The queries the loss reads, gathered per row: ``index`` [B, Q] positions that predict an answer
    token (unused slots repeat the first), ``answer`` [B, Q] which slots are real, ``pointing`` [B, Q]
    which of them must find the target rule (``Encoded.pointing``; none in a no-rule row)."""

    index: torch.Tensor
    answer: torch.Tensor
    pointing: torch.Tensor


def answer_queries(batch: Batch) -> AnswerQueries:
    counts = batch.answer.sum(1)
    order = torch.argsort((~batch.answer).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]
    real = torch.arange(order.shape[1], device=order.device)[None, :] < counts[:, None]
    index = torch.where(real, order, order[:, :1])
    pointing = batch.pointing.gather(1, index) & real & (batch.target >= 0)[:, None]
    return AnswerQueries(index, real, pointing)


def align_eos(tokenizer, eos_token_id: int | None) -> None:
    """Answers end with the model's own end-of-turn token (its config's EOS, which the GGUF states).

    Tokenizers converted from the same GGUF disagree across transformers versions: 5.17 names
    <|im_start|> (id 1) as SmolLM2's EOS, 5.19 <|im_end|> (id 2); the config says 2 in both. A
    fine-tune trained on the wrong EOS ends its answers with the wrong token and is never stopped.
    """
    if eos_token_id is not None and tokenizer.eos_token_id != eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)


# -- training ---------------------------------------------------------------------------------------
TRAINER_STATE = "trainer_state.pt"  # adapter, optimizer and step of an unfinished run: a later call resumes it


class Finetuner:
    def __init__(self, cfg: FinetuneConfig):
        from transformers import AutoTokenizer

        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        torch.backends.cuda.matmul.allow_tf32 = True  # GPU speed; the eval table, not bits, must reproduce
        self.base_dir = base_folder(cfg.base, self.out / "base")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir))
        self.model = load_localist_model(self.base_dir).to(cfg.device)
        register_training_attention()
        self.model.set_attn_implementation(TRAIN_ATTENTION)
        align_eos(self.tokenizer, self.model.config.eos_token_id)
        if self.tokenizer.pad_token_id is None:  # padding is masked out: any id will do
            self.tokenizer.pad_token_id = self.tokenizer.eos_token_id
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        self.loras = add_lora(self.model, targets, cfg.lora_rank, cfg.lora_alpha)
        params = [p for lora in self.loras.values() for p in (lora.lora_A, lora.lora_B)]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.step = 0
        if (self.out / TRAINER_STATE).exists():
            state = torch.load(self.out / TRAINER_STATE, map_location=cfg.device)
            self.model.load_state_dict(state["lora"], strict=False)
            self.opt.load_state_dict(state["optimizer"])
            self.step = state["step"]
        self.validation = [encode_scoped(e, self.tokenizer, cfg.dial_scope)
                           for e in examples(cfg.seed, "validation", cfg.eval_examples)]

    @property
    def trainable_parameters(self) -> int:
        return sum(lora.lora_A.numel() + lora.lora_B.numel() for lora in self.loras.values())

    def answer_forward(self, batch: Batch, rho: torch.Tensor):
        """(logits [B, Q, V] of the answer queries, the queries, the layers' statistics at them [B, H, Q, G]).

        The vocabulary projection runs on the answer queries only: the prompt is not learnt."""
        queries = answer_queries(batch)
        attention = TrainAttention(batch.block_ids, batch.pinned, rho, queries.index)
        with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            hidden = self.model.model(input_ids=batch.input_ids, localist=attention, use_cache=False).last_hidden_state
            at = hidden.gather(1, queries.index[..., None].expand(-1, -1, hidden.shape[-1]))
            logits = self.model.lm_head(at).float()
        stats = [attention.stats[i] for i in range(self.model.config.num_hidden_layers)]
        return logits, queries, stats

    def train_step(self, batch: Batch) -> dict:
        cfg = self.cfg
        self.model.train()
        batch = batch.to(cfg.device)
        rho = sample_rho(cfg, self.step, batch.input_ids.shape[0]).to(cfg.device)
        logits, queries, stats = self.answer_forward(batch, rho)
        labels = batch.input_ids.gather(1, queries.index + 1)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        real = queries.answer.float()
        loss_nll = (nll * real).sum() / real.sum()
        penalty, on_t, on_c = answer_terms(stats, batch.candidate, batch.target, queries.answer, queries.pointing)
        off_target = pointer_loss(on_t, on_c, queries.pointing)
        mu = mu_at(cfg, self.step)
        nu = cfg.pointer_weight * ramp(cfg.pointer_ramp, cfg.steps, self.step)
        loss = loss_nll + mu * penalty + nu * off_target
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        self.step += 1
        pointing = queries.pointing.float()
        return {"step": self.step, "loss": loss.item(), "answer_nll": loss_nll.item(),
                "pointing_nll": ((nll * pointing).sum() / pointing.sum().clamp(min=1)).item(),
                "penalty": penalty.item(), "off_target": off_target.item(), "mu": mu, "nu": nu,
                "rho_mean": rho.mean().item(), "grad_norm": grad_norm.item(), "lr": lr_at(cfg, self.step - 1)}

    @torch.no_grad()
    def validate(self, rhos: Sequence[float] = (0.0, 0.9)) -> dict:
        """Teacher-forced on the validation split. ``exact``: every answer token the argmax, i.e. the
        greedy answer is right (outcome and rule); ``rule``: the answer tokens up to the label's end the
        argmax (rows with a target); ``fidelity``: the pointing queries' pointer fidelity against the
        ground truth."""
        self.model.eval()
        out = {}
        for rho in rhos:
            exact, rule, ruled, on_t_sum, on_c_sum = 0, 0, 0, 0.0, 0.0
            for i in range(0, len(self.validation), 16):
                batch = collate(self.validation[i:i + 16], self.tokenizer.pad_token_id, 0.0).to(self.cfg.device)
                rho_t = torch.full((batch.input_ids.shape[0],), rho, device=self.cfg.device)
                logits, queries, stats = self.answer_forward(batch, rho_t)
                hit = (logits.argmax(-1) == batch.input_ids.gather(1, queries.index + 1)) | ~queries.answer
                exact += int(hit.all(-1).sum())
                has_target = batch.target >= 0
                rule += int(((hit | ~queries.pointing).all(-1) & has_target).sum())
                ruled += int(has_target.sum())
                _, on_t, on_c = answer_terms(stats, batch.candidate, batch.target, queries.answer, queries.pointing)
                on_t_sum += float((on_t * queries.pointing).sum())
                on_c_sum += float((on_c * queries.pointing).sum())
            out[f"rho={rho}"] = {"exact_match": round(exact / len(self.validation), 4),
                                 "rule": round(rule / max(ruled, 1), 4),
                                 "fidelity": round(on_t_sum / max(on_c_sum, 1e-12), 4)}
        return out

    def run(self) -> Path:
        cfg = self.cfg
        started = time.monotonic()
        end = cfg.stop_at or cfg.steps
        data = RulebookBatches(cfg, self.tokenizer, self.step)
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=cfg.num_workers,
                                             prefetch_factor=4 if cfg.num_workers else None)
        with (self.out / "train_log.jsonl").open("a") as log:
            log.write(json.dumps({"step": self.step, "validation": self.validate()}) + "\n")
            for batch in tqdm(loader, total=end - self.step, disable=not cfg.progress, desc="finetune", unit="step"):
                rec = self.train_step(batch)
                rec["elapsed_s"] = round(time.monotonic() - started, 1)
                out_of_time = cfg.time_limit_s and rec["elapsed_s"] >= cfg.time_limit_s
                if self.step % cfg.eval_every == 0 or self.step == end or out_of_time:
                    rec["validation"] = self.validate()
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if out_of_time:
                    break
        return self.save()

    def save(self) -> Path:
        """The adapter, and what it was trained on: the base's provenance (a GGUF's sha256) and the settings;
        short of the schedule's end, the optimizer too, so that a later run resumes."""
        provenance = self.base_dir / PROVENANCE_FILE
        source = json.loads(provenance.read_text()) if provenance.exists() else {"path": str(self.base_dir)}
        save_adapter(self.loras, self.out, self.cfg.lora_rank, self.cfg.lora_alpha, Path(self.cfg.base).name)
        meta = {"base": source, "training": asdict(self.cfg), "steps_done": self.step,
                "trainable_parameters": self.trainable_parameters, "eos_token_id": self.tokenizer.eos_token_id}
        (self.out / FINETUNE_META).write_text(json.dumps(meta, indent=2) + "\n")
        if self.step < self.cfg.steps:
            lora = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
            torch.save({"lora": lora, "optimizer": self.opt.state_dict(), "step": self.step}, self.out / TRAINER_STATE)
        else:
            (self.out / TRAINER_STATE).unlink(missing_ok=True)
        return self.out


def finetune(cfg: FinetuneConfig) -> Path:
    return Finetuner(cfg).run()


__all__ = ["FinetuneConfig", "Finetuner", "LoRALinear", "add_lora", "adapter_deltas", "finetune", "merge_adapter",
           "save_adapter"]
