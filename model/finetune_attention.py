"""The fine-tune's attention: the dial where it changes the output, block statistics only where the loss reads them.

The reference attention (``model/reference.py``) materialises every query's scores, block masses and
dialled weights in float32 at every layer, and keeps them all for the backward pass; for a 135 M model
on 450-token rulebook prompts that is tens of GiB and most of the step time, spent on statistics that
the loss reads at a dozen answer queries a sequence. Here, per layer:

- a sequence whose ρ is 0 runs the stock causal attention (``scaled_dot_product_attention``, a fused
  kernel, bf16 under autocast): at ρ = 0 localist attention *is* the stock attention (docs/theory.md §2);
- a sequence whose ρ is above 0 needs every query's block log-masses to dial its output: they are
  computed without gradient and the output comes from the fused kernel with the dial's per-block
  bias as an additive mask, in float32 (``_dialled``: exact output, gradient through the scores
  but not through the bias);
- the block statistics (L, π^ρ, inner entropy) are computed, differentiably and in float32, for the
  selected queries only (``TrainAttention.queries``: the answer's), by the same ``localist_attention``
  restricted to those rows, so the penalty and the pointer term see exactly what serving reports.

Logits and statistics equal the reference model's (tests/test_finetune.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from localist.model.attention import BlockStats, block_onehot, dial_mass, localist_attention

TRAIN_ATTENTION = "localist_train"


@dataclass
class TrainAttention:
    """Per-forward inputs: ``block_ids`` [B, T] (−1 = padding), ``pinned`` [B, G], one ``rho`` [B] per
    sequence for every layer, ``queries`` [B, Q] the positions whose statistics are wanted (a row's
    unused slots repeat a valid position and are masked by the caller). Each layer fills ``stats``
    with BlockStats of shape [B, H, Q, G]."""

    block_ids: Tensor
    pinned: Tensor
    rho: Tensor
    queries: Tensor
    stats: dict[int, BlockStats] = field(default_factory=dict)


def _dialled(query: Tensor, key: Tensor, value: Tensor, block_ids: Tensor, rho: Tensor, pinned: Tensor,
             scale: float) -> Tensor:
    """Whole sequences at their ρ through form 1 of docs/theory.md §2: softmax(s + β) with β the per-block
    bias ln π^ρ − L, in float32 (a bf16 bias loses whole nats).

    β is computed without gradient and enters the fused kernel as an additive mask: the output is
    the localist one exactly, its gradient flows through the scores inside the softmax but not
    through β's own dependence on the block log-masses. The loss's statistics (the penalty and the
    pointer term) come from the differentiable reference computation at the answer queries
    (``training_attention``), so their gradients are exact; the reference computation over every
    query costs ~10× the step time and memory.
    """
    B, H, T, _ = query.shape
    q, k, v = query.float(), key.float(), value.float()
    with torch.no_grad():
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        visible = (causal[None] & (block_ids >= 0)[:, None, :]).unsqueeze(1)  # [B, 1, T, T]
        scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, -1, keepdim=True)
        onehot = block_onehot(block_ids, pinned.shape[-1]).unsqueeze(1)  # [B, 1, T, G]
        base = torch.matmul((scores - row_lse).exp(), onehot)  # π⁰ [B, H, T, G]
        log_mass = torch.where(base > 0, base.clamp(min=torch.finfo(torch.float32).tiny).log() + row_lse,
                               float("-inf"))
        mass = dial_mass(log_mass, rho.view(B, 1, 1), pinned.view(B, 1, 1, -1), base)
        beta = torch.where(mass > 0, mass.clamp(min=torch.finfo(torch.float32).tiny).log() - log_mass, float("-inf"))
        bias = beta.gather(-1, block_ids.clamp(min=0).view(B, 1, 1, T).expand(B, H, T, T))
        bias = bias.masked_fill_(~visible, float("-inf"))
        del scores, base
    with torch.autocast(query.device.type, enabled=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def training_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, localist=None, **_):
    """transformers attention-function interface (as ``reference.localist_attention_forward``)."""
    if not isinstance(localist, TrainAttention):
        raise ValueError("the training attention needs the `localist=TrainAttention(...)` forward argument")
    a = localist
    B, H, T, D = query.shape
    if key.shape[1] != H:
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)
    block_ids, pinned, rho = a.block_ids[:, :T], a.pinned, a.rho
    dial = rho > 0
    out = None
    for rows, dialled in ((torch.nonzero(~dial).view(-1), False), (torch.nonzero(dial).view(-1), True)):
        if rows.numel() == 0:
            continue
        q, k, v = query[rows], key[rows], value[rows]
        if dialled:
            part = _dialled(q, k, v, block_ids[rows], rho[rows], pinned[rows], scaling)
        else:  # right padding: a real query never sees a padded key under the causal mask
            part = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        part = part.to(query.dtype)
        out = part if rows.numel() == B else (query.new_zeros(B, H, T, D) if out is None else out).index_copy(0, rows, part)
    idx = a.queries
    Q = idx.shape[1]
    selected = query.gather(2, idx[:, None, :, None].expand(B, H, Q, D))
    visible = (torch.arange(T, device=idx.device)[None, None, :] <= idx[:, :, None]) & (block_ids >= 0)[:, None, :]
    with torch.autocast(query.device.type, enabled=False):
        _, stats = localist_attention(selected.float(), key.float(), value.float(), block_ids, rho, pinned, scaling,
                                      key_visible=visible)
    a.stats[module.layer_idx] = stats
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="localist_train"`` available to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(TRAIN_ATTENTION, training_attention)
    AttentionMaskInterface.register(TRAIN_ATTENTION, lambda *args, **kwargs: None)


def answer_terms(stats: list[BlockStats], candidate: Tensor, target: Tensor, answer: Tensor, pointing: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(mean H(q^ρ) over layers, heads and ``answer`` queries, Σ π^ρ(target) and Σ candidate mass per query).

    ``stats`` per layer [B, H, Q, G]; ``candidate`` [B, G]; ``target`` [B] (any valid block for rows
    without one: the caller masks them); ``answer``, ``pointing`` [B, Q] bool. H(q^ρ) is the candidate
    block entropy of docs/theory.md §5, counted where ≥ 2 candidates are visible and the candidates
    hold mass; the two sums, over layers and heads, give the response-level pointer fidelity of §3
    over any set of queries (``pointer_loss``)."""
    cand = candidate[:, None, None, :]
    tgt = target.clamp(min=0).view(-1, 1, 1, 1)
    total, count, on_t, on_c = 0.0, 0, 0.0, 0.0
    for s in stats:
        cm = s.mass * cand
        c = cm.sum(-1)
        visible = (torch.isfinite(s.log_mass) & cand).sum(-1)
        keep = answer[:, None, :] & (visible >= 2) & (c > 1e-6)
        q = cm / c.clamp(min=1e-12).unsqueeze(-1)
        H = -(q * q.clamp(min=1e-12).log()).sum(-1)
        total = total + (H * keep).sum()
        count += int(keep.sum())
        on_t = on_t + s.mass.gather(-1, tgt.expand(*s.mass.shape[:-1], 1)).squeeze(-1).sum(1)
        on_c = on_c + c.sum(1)
    return total / max(count, 1), on_t, on_c


def pointer_loss(on_t: Tensor, on_c: Tensor, queries: Tensor) -> Tensor:
    """1 − pointer fidelity over ``queries`` [B, Q] (rows without a target must be masked out by the caller)."""
    q = queries.float()
    return 1.0 - (on_t * q).sum() / (on_c * q).sum().clamp(min=1e-6)
