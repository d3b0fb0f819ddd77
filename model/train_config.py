"""Training settings, kept free of torch so that the CLI builds its flags without loading it."""
from __future__ import annotations

from dataclasses import dataclass

from localist.model.blocks import DIAL_SCOPES


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    steps: int = 4000
    stop_at: int = 0  # end the run after this step (0 = at steps); the schedules still span steps
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    mu: float = 0.25  # weight of the candidate block-entropy penalty (nats)
    mu_ramp: tuple = (0.5, 0.75)  # μ grows linearly between these fractions of training (0 before)
    pointer_weight: float = 0.0  # ν: weight of the off-target evidence share of the answer queries
    lookup_weight: float = 0.0  # κ: the same off-target share at the one query that cites the id (no ramp)
    readout_weight: float = 0.0  # τ: −ln of the last layer's head 0 weight on each copied answer token's source
    pointer_ramp: tuple = (0.5, 0.75)  # ν and τ grow linearly between these fractions of training
    init_from: str = ""  # start from this exported model (weights and tokenizer): a second training stage
    curriculum: float = 0.3  # over this fraction of training the block count grows from 2 to max_blocks
    rho_max: float = 0.95  # ρ ~ U(0, rho_max), or exactly 0 with probability rho_zero_share
    rho_ramp: tuple = (0.3, 0.5)  # ρ = 0 before the first fraction; its range widens up to the second
    rho_zero_share: float = 0.25
    prompt_weight: float = 0.2  # next-token weight of prompt tokens (answer tokens weigh 1)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 2048
    tokenizer_examples: int = 4000
    min_blocks: int = 3
    max_blocks: int = 8
    paraphrases: bool = False  # train on the generator's paraphrase templates too (data.PARAPHRASE_*)
    checkpoint_every: int = 500
    eval_every: int = 500
    eval_examples: int = 128
    recruit_every: int = 1000
    recruit_probes: int = 32
    recruit_rho: float = 0.9
    recruit_extra_cost: float = 0.0
    device: str = "cpu"
    num_workers: int = 0  # data-building processes (the GPU run is otherwise bound by Python)
    save_dtype: str = "float32"
    progress: bool = True

    def validate(self) -> None:
        checks = {
            "steps": self.steps >= 1, "stop_at": 0 <= self.stop_at <= self.steps, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "mu": self.mu >= 0, "pointer_weight": self.pointer_weight >= 0, "lookup_weight": self.lookup_weight >= 0,
            "readout_weight": self.readout_weight >= 0,
            "curriculum": 0 <= self.curriculum <= 1,
            "mu_ramp": _is_ramp(self.mu_ramp), "pointer_ramp": _is_ramp(self.pointer_ramp), "rho_ramp": _is_ramp(self.rho_ramp),
            "rho_max": 0 <= self.rho_max < 1, "rho_zero_share": 0 <= self.rho_zero_share <= 1,
            "prompt_weight": self.prompt_weight >= 0, "recruit_rho": 0 <= self.recruit_rho <= 1,
            "save_dtype": self.save_dtype in ("float32", "bfloat16"),
            "num_heads": self.hidden_size % self.num_heads == 0 and self.hidden_size // self.num_heads >= 32,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}"
                                 + (" (head_dim = hidden_size/num_heads must be ≥ 32)" if name == "num_heads" else ""))


def _is_ramp(r) -> bool:
    return len(r) == 2 and 0 <= r[0] <= r[1] <= 1




@dataclass
class FinetuneConfig:
    """A LoRA fine-tune of a pretrained model on the rulebook task (docs/theory.md §5, model/finetune.py).

    The dial, penalty and pointer schedules have the same meaning and names as :class:`TrainConfig`'s.
    A pretrained model already reads: its pointer term may act from the start, and ρ spreads early.
    """

    out: str
    base: str  # a GGUF file or a Hugging Face folder
    seed: int = 0
    steps: int = 600
    stop_at: int = 0  # end the run after this step (0 = at steps); the schedules still span steps
    time_limit_s: float = 0.0  # save and stop once this much wall time has passed (0 = no limit)
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int = 30
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    mu: float = 0.25
    mu_ramp: tuple = (0.2, 0.5)
    pointer_weight: float = 0.0  # ν: off-target share of the pointing answer queries (Encoded.pointing)
    pointer_ramp: tuple = (0.0, 0.1)
    rho_max: float = 0.95
    rho_ramp: tuple = (0.05, 0.3)
    rho_zero_share: float = 0.25
    dial_scope: str = "all"  # the scope the model will be served with
    bf16: bool = False  # bf16 autocast of the model's matmuls (on the GPU); block statistics stay float32
    eval_every: int = 100
    eval_examples: int = 64
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True

    def validate(self) -> None:
        checks = {
            "steps": self.steps >= 1, "stop_at": 0 <= self.stop_at <= self.steps, "time_limit_s": self.time_limit_s >= 0,
            "batch_size": self.batch_size >= 1, "lr": self.lr > 0, "lora_rank": self.lora_rank >= 1,
            "lora_alpha": self.lora_alpha > 0, "lora_targets": bool(self.lora_targets.strip()),
            "mu": self.mu >= 0, "pointer_weight": self.pointer_weight >= 0,
            "mu_ramp": _is_ramp(self.mu_ramp), "pointer_ramp": _is_ramp(self.pointer_ramp),
            "rho_ramp": _is_ramp(self.rho_ramp), "rho_max": 0 <= self.rho_max < 1,
            "rho_zero_share": 0 <= self.rho_zero_share <= 1, "dial_scope": self.dial_scope in DIAL_SCOPES,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
