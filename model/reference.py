"""Reference localist causal LM: any HF Llama/Qwen2 checkpoint run with localist attention.

It plugs :func:`localist.model.attention.localist_attention` into transformers' attention-function
interface, so the HF modelling code (RoPE, GQA, weights) stays the stock one and ρ = 0 is the HF
model. A static additive mask cannot express the dial (the bias depends on the query's own block
log-masses), hence a custom attention function fed through a ``localist=`` forward kwarg. This is
the oracle the vLLM model is tested against, and the model that training differentiates through.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from localist.model.attention import BlockStats, localist_attention
from localist.model.blocks import BlockTable

ATTN_IMPLEMENTATION = "localist"


@dataclass
class LocalistBatch:
    """Per-forward localist inputs; the attention function fills ``stats`` per layer.

    ``block_ids`` [B, Tk] covers every key position seen so far (−1 marks padding), ``pinned``
    [B, G], ``rho`` [B, num_layers]; ``probe`` [P, 3] (row, query, key) asks every layer for those
    attention weights (training's readout term).
    """

    block_ids: Tensor
    pinned: Tensor
    rho: Tensor
    probe: Tensor | None = None
    stats: dict[int, BlockStats] = field(default_factory=dict)

    @classmethod
    def from_tables(
        cls, tables: Sequence[BlockTable], rho: Sequence[Sequence[float]], length: int | None = None
    ) -> LocalistBatch:
        """Right-padded batch of block layouts; positions past a prompt belong to its response block."""
        length = length or max(len(t.token_ids) for t in tables)
        G = max(t.num_blocks for t in tables)
        block_ids = torch.full((len(tables), length), -1, dtype=torch.long)
        pinned = torch.zeros(len(tables), G, dtype=torch.bool)
        for row, table in enumerate(tables):
            ids = table.block_ids()
            ids += [table.response_id] * (len(table.token_ids) - len(ids))
            block_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            pinned[row, : table.num_blocks] = torch.tensor(table.pinned())
        return cls(block_ids, pinned, torch.tensor(rho, dtype=torch.float32))

    def extend(self, block_id: Tensor) -> None:
        """Append one key position per row (a generated token) with the given block ids [B]."""
        self.block_ids = torch.cat([self.block_ids, block_id.view(-1, 1).to(self.block_ids)], dim=1)


def localist_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, localist=None, **_):
    """transformers attention-function interface → docs/theory.md §2 (HF's own causal mask is not needed)."""
    if localist is None:
        raise ValueError("localist attention needs the `localist=LocalistBatch(...)` forward argument")
    Tk = key.shape[-2]
    out, stats = localist_attention(
        query, key, value, localist.block_ids[:, :Tk].to(query.device), localist.rho[:, module.layer_idx].to(query.device),
        localist.pinned.to(query.device), scaling, probe=localist.probe,
    )
    localist.stats[module.layer_idx] = stats
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="localist"`` available to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, localist_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)


def load_localist_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    register()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    return model.eval()


class ReferenceLM:
    """Greedy generation with per-token block statistics, the oracle for the vLLM path."""

    def __init__(self, model: PreTrainedModel, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> ReferenceLM:
        return cls(load_localist_model(path, dtype), AutoTokenizer.from_pretrained(str(path)))

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @torch.no_grad()
    def forward(
        self, tables: Sequence[BlockTable], rho: Sequence[Sequence[float]]
    ) -> tuple[Tensor, dict[int, BlockStats]]:
        """Logits [B, T, V] for right-padded prompts, and each layer's statistics."""
        batch = LocalistBatch.from_tables(tables, rho)
        input_ids = torch.full(batch.block_ids.shape, self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for row, table in enumerate(tables):
            input_ids[row, : len(table.token_ids)] = torch.tensor(table.token_ids)
        logits = self.model(input_ids=input_ids, localist=batch, use_cache=False).logits
        return logits.float(), batch.stats

    @torch.no_grad()
    def generate(
        self, table: BlockTable, rho: Sequence[float], max_new_tokens: int, stop_at_eos: bool = True
    ) -> tuple[list[int], BlockStats]:
        """Greedy tokens and, per generated token, the stats of the query that produced it: [T, L, H, G]."""
        batch = LocalistBatch.from_tables([table], [list(rho)])
        response = torch.tensor([table.response_id])
        input_ids = torch.tensor([table.token_ids])
        past, tokens, per_token = None, [], []
        for _ in range(max_new_tokens):
            out = self.model(input_ids=input_ids, localist=batch, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].float().argmax())
            per_token.append([batch.stats[layer] for layer in range(self.num_layers)])
            tokens.append(token)
            if stop_at_eos and token == self.tokenizer.eos_token_id:
                break
            input_ids = torch.tensor([[token]])
            batch.extend(response)
        return tokens, stack_token_stats(per_token)


def stack_token_stats(per_token: Sequence[Sequence[BlockStats]]) -> BlockStats:
    """[T][L] per-layer stats of batch row 0's last query → one BlockStats of shape [T, L, H, G]."""
    def stack(name: str) -> Tensor:
        return torch.stack([torch.stack([getattr(s, name)[0, :, -1] for s in layers]) for layers in per_token])

    if not per_token:
        empty = torch.zeros(0, 0, 0, 0)
        return BlockStats(empty, empty, empty)
    return BlockStats(stack("log_mass"), stack("mass"), stack("inner_entropy"))
