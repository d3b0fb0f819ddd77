"""Per-response metrics (docs/theory.md §3), defined once, with the theory (docs/theory.md §4) beside them.

Input: the per-token statistics of a response — ``log_mass``, ``mass`` (π^ρ)
and ``inner_entropy`` (H(w_g)), each [T, L, H, G] float32, one row per generated token — plus the
block layout (candidate and pinned masks, visible keys per block) and the optional target block.
Everything is vectorised over tokens, layers and heads so that the server can run it per response.

Levels: per (token, layer, head) values are the primitives; a layer's value is the mean over its
heads (attribution, entropy) or the ratio of sums (fidelity); a token's the same over layers and
heads; the response's the mean over tokens (ratio of sums over everything for fidelity). Results are
tensors (NaN where a metric is null); the server turns them into the wire's objects at the audit level
the request asked for (``localist.server.wire``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from localist.model.attention import BlockStats
from localist.model.blocks import BlockTable
from localist.model.theory import DEFAULT_EPS, NULL_MASS, TheoryReport, predicted_vs_measured, visible_counts

def _scalar(t: Tensor) -> float | None:
    x = float(t)
    return None if math.isnan(x) else x


def _ratio(num: Tensor, den: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Σ num / Σ den over ``dims``; NaN (null) where the summed candidate mass is below 10⁻⁶."""
    n, d = num.sum(dims), den.sum(dims)
    return torch.where(d >= NULL_MASS, n / d.clamp(min=NULL_MASS), math.nan)


@dataclass
class TokenLevel:
    """Per generated token: [T, G] attribution, [T] the rest (fidelity NaN where null)."""

    attribution: Tensor
    sink_mass: Tensor
    candidate_mass: Tensor
    entropy_nats: Tensor
    block_entropy_nats: Tensor
    pointer_fidelity: Tensor


@dataclass
class LayerLevel:
    """Per token and layer ([T, L, …]) and per token, layer and head ([T, L, H, …])."""

    attribution: Tensor
    head_attribution: Tensor
    sink_mass: Tensor
    entropy_nats: Tensor
    head_entropy_nats: Tensor
    block_entropy_nats: Tensor
    head_block_entropy_nats: Tensor
    pointer_fidelity: Tensor
    head_pointer_fidelity: Tensor


@dataclass
class ResponseMetrics:
    """One generated choice: measured metrics (docs/theory.md §3) and the theory's predictions (docs/theory.md §4)."""

    num_tokens: int
    num_layers: int
    num_heads: int
    num_blocks: int
    target_block: int | None
    target_source: str | None  # "request" | "top_candidate" | None (no target could be named)
    attribution: Tensor | None  # [G], None without generated tokens
    sink_mass: float | None
    candidate_mass: float | None
    entropy_nats: float | None
    block_entropy_nats: float | None
    pointer_fidelity: float | None
    theory: TheoryReport
    tokens: TokenLevel
    layers: LayerLevel


def _bool_mask(x: Tensor | Sequence[bool], name: str, T: int, G: int) -> Tensor:
    m = torch.as_tensor(x, dtype=torch.bool)
    if m.shape[-1:] != (G,) or m.dim() > 2 or (m.dim() == 2 and m.shape[0] != T):
        raise ValueError(f"{name}: expected shape [{G}] or [{T}, {G}], got {list(m.shape)}")
    return m.expand(T, G)


def _candidate_mass(mass: Tensor, cand: Tensor) -> Tensor:
    """c per (token, layer, head): the mass on the token's candidate blocks."""
    return (mass * cand.view(cand.shape[0], 1, 1, cand.shape[1])).sum(-1)


def _target_mass(mass: Tensor, cand: Tensor, target: int) -> Tensor:
    """π(t) per (token, layer, head), counted where t is a candidate of the token's query."""
    return mass[..., target] * cand[:, target].view(cand.shape[0], 1, 1)


def token_pointers(stats: BlockStats, candidates: Tensor | Sequence[bool],
                   target: int | None) -> tuple[Tensor, Tensor | None]:
    """The per-token part of :func:`response_metrics` alone, as a stream needs it: attribution [T, G]
    (π, mean over layers and heads) and the all-heads pointer fidelity [T] against ``target`` (NaN where
    null; None without a target). No theory is computed."""
    mass = stats.mass.float()
    T, _, _, G = mass.shape
    cand = _bool_mask(candidates, "candidates", T, G)
    attribution = mass.mean((1, 2))
    if target is None:
        return attribution, None
    return attribution, _ratio(_target_mass(mass, cand, target), _candidate_mass(mass, cand), (1, 2))


def response_metrics(
    stats: BlockStats,
    candidates: Tensor | Sequence[bool],
    pinned: Tensor | Sequence[bool],
    visible: Tensor,
    target: int | None = None,
    rho: float | Sequence[float] | Tensor = 0.0,
    eps: float = DEFAULT_EPS,
) -> ResponseMetrics:
    """All metrics of one response from its per-token statistics [T, L, H, G].

    ``candidates`` [G] or [T, G] (per token: a query's own block is never a candidate); ``pinned``
    [G] (the sink and other pinned blocks: their mass is reported as ``sink_mass``); ``visible``
    [T, G] visible keys per block for each token's query (the entropy bound needs them); ``target``
    the request's ground-truth block, else the top candidate block is used; ``rho`` the dial the
    response ran at (scalar, per layer, or [T, L]) for the theory.
    """
    mass = stats.mass
    shape = tuple(mass.shape)
    if mass.dim() != 4 or stats.log_mass.shape != mass.shape or stats.inner_entropy.shape != mass.shape:
        raise ValueError(f"stats: log_mass, mass and inner_entropy must share one shape [T, L, H, G], got "
                         f"{list(stats.log_mass.shape)}, {list(shape)}, {list(stats.inner_entropy.shape)}")
    T, L, H, G = shape
    if not bool(torch.isfinite(mass).all()):
        raise ValueError("stats.mass: contains NaN or inf")
    cand = _bool_mask(candidates, "candidates", T, G)
    pin = torch.as_tensor(pinned, dtype=torch.bool)
    if pin.shape != (G,):
        raise ValueError(f"pinned: expected shape [{G}], got {list(pin.shape)}")
    if target is not None:
        if not 0 <= target < G:
            raise ValueError(f"target: block {target} is outside the table's {G} blocks")
        if not bool(cand[:, target].any()) and T > 0:
            raise ValueError(f"target: block {target} is not a candidate block")

    mass = mass.float()
    head_cand = _candidate_mass(mass, cand)
    head_sink = (mass * pin).sum(-1)
    head_block_H = -torch.special.xlogy(mass, mass).sum(-1)
    head_H = head_block_H + (mass * stats.inner_entropy.float()).sum(-1)

    token_attr = mass.mean((1, 2))  # [T, G]
    response_attr = token_attr.mean(0) if T else None
    source = "request" if target is not None else None
    top = None
    if T:
        cand_attr = (token_attr * cand).mean(0)
        if float(cand_attr.max()) > 0:
            top = int(cand_attr.argmax())
    if target is None and top is not None:
        target, source = top, "top_candidate"

    head_target = torch.zeros_like(head_cand) if target is None else _target_mass(mass, cand, target)
    head_F = torch.where(head_cand >= NULL_MASS, head_target / head_cand.clamp(min=NULL_MASS), math.nan)
    no_target = target is None
    null_like = lambda t: torch.full_like(t, math.nan) if no_target else t  # noqa: E731

    tokens = TokenLevel(
        attribution=token_attr,
        sink_mass=head_sink.mean((1, 2)),
        candidate_mass=head_cand.mean((1, 2)),
        entropy_nats=head_H.mean((1, 2)),
        block_entropy_nats=head_block_H.mean((1, 2)),
        pointer_fidelity=null_like(_ratio(head_target, head_cand, (1, 2))),
    )
    layers = LayerLevel(
        attribution=mass.mean(2),
        head_attribution=mass,
        sink_mass=head_sink.mean(2),
        entropy_nats=head_H.mean(2),
        head_entropy_nats=head_H,
        block_entropy_nats=head_block_H.mean(2),
        head_block_entropy_nats=head_block_H,
        pointer_fidelity=null_like(_ratio(head_target, head_cand, (2,))),
        head_pointer_fidelity=null_like(head_F),
    )
    theory = predicted_vs_measured(stats, cand, visible, rho, target,
                                   top_candidate=top if source == "request" else None, eps=eps)
    mean = lambda t: _scalar(t.mean()) if T else None  # noqa: E731
    return ResponseMetrics(
        num_tokens=T, num_layers=L, num_heads=H, num_blocks=G,
        target_block=target,
        target_source=source,
        attribution=response_attr,
        sink_mass=mean(tokens.sink_mass),
        candidate_mass=mean(tokens.candidate_mass),
        entropy_nats=mean(tokens.entropy_nats),
        block_entropy_nats=mean(tokens.block_entropy_nats),
        pointer_fidelity=None if no_target or not T else _scalar(_ratio(head_target, head_cand, (0, 1, 2))),
        theory=theory,
        tokens=tokens,
        layers=layers,
    )


def response_layout(table: BlockTable, num_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """(candidates [T, G], pinned [G], visible [T, G]) of a response of ``num_tokens`` tokens.

    Token t is produced by the query at prompt length − 1 + t; generated tokens are keys in the
    response block. A query's own block is not one of its candidates (docs/theory.md §1).
    """
    G = table.num_blocks
    prompt = table.block_ids()
    keys = torch.tensor(prompt + [table.response_id] * max(num_tokens - 1, 0), dtype=torch.long)
    if num_tokens > keys.numel():
        raise ValueError(f"num_tokens: {num_tokens} tokens need a prompt of at least one token")
    own = keys[keys.numel() - num_tokens:]
    cand = torch.tensor(table.candidates(), dtype=torch.bool).expand(num_tokens, G).clone()
    cand[torch.arange(num_tokens), own] = False
    return cand, torch.tensor(table.pinned(), dtype=torch.bool), visible_counts(keys, G, num_tokens)


def metrics_for_table(
    stats: BlockStats,
    table: BlockTable,
    target: int | str | None = None,
    rho: float | Sequence[float] | Tensor = 0.0,
    eps: float = DEFAULT_EPS,
) -> ResponseMetrics:
    """:func:`response_metrics` with the layout taken from the request's block table.

    ``target`` may be a block id or a block label.
    """
    if isinstance(target, str):
        try:
            target = table.index(target)
        except KeyError:
            raise ValueError(f"target: no block is labelled {target!r}") from None
    T, L, H, G = stats.mass.shape if stats.mass.dim() == 4 else (stats.mass.shape[0], 0, 0, 0)
    if T == 0 and G != table.num_blocks:  # "no token" stats may come without a block axis
        stats = BlockStats(*(torch.zeros(0, L, H, table.num_blocks) for _ in range(3)))
    cand, pinned, visible = response_layout(table, T)
    return response_metrics(stats, cand, pinned, visible, target, rho, eps)
