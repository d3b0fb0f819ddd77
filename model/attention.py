"""Localist attention (docs/theory.md §2), defined once.

The reference model, the vLLM model and the metrics all call these functions, so the dial means
the same thing everywhere. Shapes follow the convention ``[batch, heads, queries, ...]``; block
statistics are always float32 (a bf16 query term of size λ·ln π⁰ loses whole nats).

Three equivalent forms are exposed, each used where it is cheapest:
- :func:`localist_attention` — one pass over the keys (dense), the workhorse;
- :func:`merge_block_partials` — split and merge: per-block partial outputs re-weighted by π^ρ,
  which is how a split-KV kernel over contiguous block spans finishes;
- :func:`dial_bias` — the additive per-block bias β, for kernels that accept a score bias.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class BlockStats:
    """Per (batch, head, query, block) statistics of one attention call, all float32.

    ``log_mass`` is L (−inf where the block has no visible key), ``mass`` is π^ρ (what the query
    actually put on the block) and ``inner_entropy`` is H(w_g), the entropy inside the block in nats
    (0 for absent blocks). Metrics and theory are computed from these alone. ``token_weights``
    [P, H] holds the final weights of the (row, query, key) triples a caller probed, if any:
    training's readout term supervises single tokens, which block masses cannot express.
    """

    log_mass: Tensor
    mass: Tensor
    inner_entropy: Tensor
    token_weights: Tensor | None = None


def dial_mass(log_mass: Tensor, rho: Tensor | float, pinned: Tensor, base: Tensor | None = None) -> Tensor:
    """π^ρ over blocks from block log-masses (docs/theory.md §2).

    ``log_mass`` [..., G] float32 with −inf for absent blocks; ``rho`` broadcastable to
    ``log_mass[..., 0]``; ``pinned`` bool broadcastable to [..., G]. Pinned blocks keep their base
    mass; the free blocks share the rest with temperature 1 − ρ. ρ = 1 is taken as the limit
    (argmax, ties split evenly), never as λ = ∞ inside a formula. ``base`` (π⁰, if the caller has
    it from the same sums; 0 where ``log_mass`` is −inf) is returned bit for bit where nothing
    changes: pinned blocks and ρ = 0.

    Internally the blocks are the *first* dim ([G, ...]; free when the caller's tensor is a
    ``movedim`` of a G-first one, as the vLLM prefill's is): torch's reductions over a last dim of a
    few blocks cost ~15× more than over the first. A row with no (free) block gets 0 without
    masking passes (:func:`_softmax0`); a scalar ρ skips the per-row selects. The result is the
    [..., G] view of a G-first tensor.
    """
    L = log_mass.float()
    shape = L.shape
    L = L.movedim(-1, 0).contiguous()  # [G, ...]
    pinned = torch.as_tensor(pinned, device=L.device)
    pinned = pinned.expand(*pinned.shape[:-1], shape[-1])
    pinned = pinned.view((1,) * (len(shape) - pinned.dim()) + pinned.shape).movedim(-1, 0)  # [G, ...] like L
    if base is None:
        base = _softmax0(L)
    else:
        base = base.float().movedim(-1, 0)

    if isinstance(rho, Tensor) and rho.dim() > 0:
        rho = rho.float()
        at_limit, on = rho >= 1.0, rho > 0
        dialled, limited = bool((on & ~at_limit).any()), bool(at_limit.any())
    else:
        r = float(rho)
        at_limit = on = None
        dialled, limited = 0.0 < r < 1.0, r >= 1.0
    if not (dialled or limited):  # ρ = 0 everywhere: the base attention
        return base.movedim(0, -1)

    L_free = L.masked_fill(pinned, NEG_INF)
    q = None  # the free blocks' shares (0 on pinned and absent blocks); only the branches some ρ needs
    if dialled:
        if at_limit is None:  # (1 + λ) rounded as float32 arithmetic would: the same bits as the tensor path
            q = _softmax0(L_free * _f32(1.0 + _f32(_f32(r) / _f32(1.0 - _f32(r)))))  # (1 + λ)·L, free blocks
        else:
            lam = torch.where(at_limit, 0.0, rho / (1.0 - rho).clamp(min=1e-12))
            q = _softmax0(L_free * (1.0 + lam))
    if limited:
        m = L_free.amax(0)
        top = (L_free == m) & (m > NEG_INF)
        limit = top.float()
        limit = limit / limit.sum(0).clamp(min=1.0)  # ties split evenly
        q = limit if at_limit is None or q is None else torch.where(at_limit, limit, q)
    free_share = base.masked_fill(pinned, 0.0).sum(0)  # 1 − m_P (absent blocks have base 0)
    mixed = free_share * q
    if on is None:  # one ρ > 0 for all rows: every free block moves
        return torch.where(pinned, base, mixed).movedim(0, -1)
    return torch.where(~pinned & on, mixed, base).movedim(0, -1)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _softmax0(x: Tensor) -> Tensor:
    """Softmax over dim 0, 0 for a column that is all −inf (no nan, no masking pass).

    Under autograd it is written out (max, exp, sum) with the max detached (a softmax does not
    depend on it), so that the gradient of an all −inf column is 0, not nan.
    """
    if not x.requires_grad:  # torch's fused softmax; its nan columns (all −inf) become 0
        return torch.softmax(x, 0).nan_to_num_(0.0)
    m = x.detach().amax(0).clamp(min=torch.finfo(x.dtype).min)
    e = (x - m).exp()
    return e / e.sum(0).clamp(min=torch.finfo(x.dtype).tiny)


def dial_bias(log_mass: Tensor, rho: Tensor | float, pinned: Tensor) -> Tensor:
    """Form 1: the additive per-block score bias β = ln π^ρ − L (−inf where π^ρ is 0 or absent)."""
    mass = dial_mass(log_mass, rho, pinned)
    return torch.where(mass > 0, mass.log() - log_mass.float(), NEG_INF)


def merge_block_partials(
    partial_out: Tensor, log_mass: Tensor, rho: Tensor | float, pinned: Tensor, finite: bool = False
) -> tuple[Tensor, Tensor]:
    """Form 2: merge per-block attention outputs ``partial_out`` [..., G, D] with weights π^ρ.

    ``log_mass`` [..., G] are the blocks' log-sum-exps (−inf for blocks with no key). Returns the
    merged output [..., D] and π^ρ [..., G]. ``finite=True`` promises that ``partial_out`` holds
    no nan/inf (a block with no key has a zero output, as the paged kernel writes it), which saves
    the pass that zeroes them.
    """
    mass = dial_mass(log_mass, rho, pinned)
    partial = partial_out.float() if finite else partial_out.float().nan_to_num()
    G, D = partial.shape[-2:]
    # π^ρ is a view of a blocks-first tensor: made G-last first, or bmm loops over its batch (~10× slower).
    out = torch.bmm(mass.reshape(-1, 1, G).contiguous(), partial.reshape(-1, G, D)).view(partial.shape[:-2] + (D,))
    return out.to(partial_out.dtype), mass


def block_onehot(block_ids: Tensor, num_blocks: int) -> Tensor:
    """[B, Tk] block ids (−1 = no key) → [B, Tk, G] float32 indicator."""
    valid = block_ids >= 0
    onehot = torch.nn.functional.one_hot(block_ids.clamp(min=0), num_blocks).float()
    return onehot * valid.unsqueeze(-1)


def localist_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    block_ids: Tensor,
    rho: Tensor | float,
    pinned: Tensor,
    scale: float,
    key_visible: Tensor | None = None,
    probe: Tensor | None = None,
) -> tuple[Tensor, BlockStats]:
    """One-pass localist attention (docs/theory.md §2) with its block statistics.

    query [B, H, Tq, D]; key/value [B, Hkv, Tk, D] (grouped-query heads are repeated);
    block_ids [B, Tk] (−1 marks padding); rho [B] or [B, Tq] (or a float); pinned [B, G] bool.
    Causal: query i sees keys j ≤ Tk − Tq + i, unless ``key_visible`` [B, Tq, Tk] says otherwise.
    ``probe`` [P, 3] (row, query, key) selects weights to return in ``BlockStats.token_weights``.
    The scores are exponentiated once (the stock softmax); block masses come from an indicator
    matmul and the stock weights are re-weighted per block by π^ρ/π⁰, so within-block weights
    never change and ρ = 0 is the stock computation exactly.
    """
    B, H, Tq, _ = query.shape
    Tk, G = key.shape[-2], pinned.shape[-1]
    if key.shape[1] != H:
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)

    if key_visible is None:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
        key_visible = causal.unsqueeze(0) & (block_ids >= 0).unsqueeze(1)
    visible = key_visible.unsqueeze(1)  # [B, 1, Tq, Tk]

    scores = (torch.matmul(query, key.transpose(-1, -2)).float() * scale).masked_fill(~visible, NEG_INF)
    base_probs = torch.softmax(scores, -1)  # the stock weights, bit for bit
    if not bool(visible.any(-1).all()):
        base_probs = base_probs.nan_to_num(0.0)  # a query with no visible key attends to nothing
    # log Σ_j e^{s_j} from the largest weight alone (p_max = e^{m − lse}): no second exp pass.
    tiny = torch.finfo(torch.float32).tiny
    row_lse = scores.amax(-1, keepdim=True) - base_probs.amax(-1, keepdim=True).clamp(min=tiny).log()
    onehot = block_onehot(block_ids, G).unsqueeze(1)  # [B, 1, Tk, G]
    base = torch.matmul(base_probs, onehot)  # π⁰
    weighted_scores = torch.matmul(base_probs * scores.masked_fill(~visible, 0.0), onehot)

    present = base > 0  # underflowed blocks are excluded, never 0·(−inf)
    safe_base = base.clamp(min=tiny)
    log_mass = torch.where(present, safe_base.log() + row_lse, NEG_INF)
    inner_entropy = torch.where(present, log_mass - weighted_scores / safe_base, 0.0)

    rho_t = torch.as_tensor(rho, dtype=torch.float32, device=query.device)
    if rho_t.dim() == 1:
        rho_t = rho_t.view(B, 1, 1).expand(B, 1, Tq)
    elif rho_t.dim() == 2:
        rho_t = rho_t.view(B, 1, Tq)
    mass = dial_mass(log_mass, rho_t, pinned.view(B, 1, 1, G), base)

    # Per block π^ρ/π⁰: exactly 1 at ρ = 0 and for pinned blocks, so those rows stay stock softmax.
    ratio = torch.where(present, mass / safe_base, 0.0)
    probs = base_probs * torch.matmul(ratio, onehot.transpose(-1, -2))
    out = torch.matmul(probs.to(value.dtype), value)
    probed = None if probe is None else probs[probe[:, 0], :, probe[:, 1], probe[:, 2]]
    return out, BlockStats(log_mass, mass, inner_entropy.clamp(min=0.0), probed)
