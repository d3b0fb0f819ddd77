"""Threshold and bounds of localist attention (docs/theory.md §4), in its symbols.

Everything is about the free candidate blocks C of one (query, layer, head): q^ρ = softmax_C((1+λ)L),
target R ∈ C, block margin δ = L_R − max_{g∈C, g≠R} L_g (nats), B = |C| (candidates with a visible
key). Log-mass tensors may carry −inf for blocks that are not candidates or have no visible key;
such blocks are simply not in C. λ = ρ/(1−ρ) may be +inf (ρ = 1): every function takes the limit
explicitly rather than putting ∞ into a formula.

The per-response aggregation (:func:`predicted_vs_measured`) compares these predictions with the
masses the attention actually produced; the bounds hold by construction, so a held-fraction below
1.0 means a bug (wrong block layout, wrong visible counts, or an engine that is not computing §2).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DEFAULT_EPS = 0.1
NULL_MASS = 1e-6  # docs/theory.md §3: below this candidate mass a head does not point
# float32 statistics: slack allowed when checking a bound that holds exactly in real arithmetic
FIDELITY_TOL = 1e-5
ENTROPY_TOL = 1e-4


def _t(x: Tensor | float | int) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def rho_to_lambda(rho: Tensor | float | Sequence[float]) -> Tensor:
    """λ = ρ/(1−ρ), +inf at ρ = 1; ρ outside [0, 1] is an error naming ``rho``."""
    rho = _t(rho)
    if bool(((rho < 0) | (rho > 1) | rho.isnan()).any()):
        raise ValueError(f"rho: every value must lie in [0, 1], got {rho.tolist()}")
    return torch.where(rho >= 1, math.inf, rho / (1 - rho).clamp(min=1e-300))


def _gather(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, -1, index.expand(x.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def block_margin(L_cand: Tensor, target: int | Tensor) -> Tensor:
    """δ = L_R − max over the other candidates (+inf with no other candidate, −inf if R is absent)."""
    L = _t(L_cand)
    R = torch.as_tensor(target, dtype=torch.long)
    L_R = _gather(L, R)
    is_R = torch.nn.functional.one_hot(R, L.shape[-1]).bool().expand(L.shape)
    others = L.masked_fill(is_R, -math.inf).amax(-1)
    return torch.where(torch.isfinite(L_R), L_R - others, -math.inf)


def candidate_count(L_cand: Tensor) -> Tensor:
    """B = the number of candidates with a visible key."""
    return torch.isfinite(_t(L_cand)).sum(-1)


def exact_fidelity(L_cand: Tensor, target: int | Tensor, lam: Tensor | float) -> Tensor:
    """q^ρ(R) = 1 / (1 + Σ_{g≠R} exp(−(1+λ)(L_R − L_g))); at λ = ∞ the limit (ties split evenly)."""
    L = _t(L_cand)
    R = torch.as_tensor(target, dtype=torch.long)
    lam = _t(lam).unsqueeze(-1)
    d = _gather(L, R).unsqueeze(-1) - L
    other = torch.isfinite(L) & ~torch.nn.functional.one_hot(R, L.shape[-1]).bool().expand(L.shape)
    d = d.masked_fill(~other, 0.0)
    finite = torch.exp(-(1 + lam.masked_fill(torch.isinf(lam), 0.0)) * d)
    limit = torch.where(d > 0, 0.0, torch.where(d == 0, 1.0, math.inf))
    terms = torch.where(torch.isinf(lam), limit, finite).masked_fill(~other, 0.0)
    F = 1 / (1 + terms.sum(-1))
    return torch.where(torch.isfinite(_gather(L, R)), F, 0.0)


def fidelity_lower_bound(delta: Tensor | float, B: Tensor | int, lam: Tensor | float) -> Tensor:
    """1 / (1 + (B−1) e^{−(1+λ)δ}) where δ > 0; elsewhere the trivial bound 0."""
    delta, B, lam = _t(delta), _t(B), _t(lam)
    limit = torch.isinf(lam) | torch.isinf(delta)  # e^{−∞} = 0, taken explicitly
    exponent = (1 + lam.masked_fill(torch.isinf(lam), 0.0)) * delta.masked_fill(torch.isinf(delta), 0.0)
    decay = torch.where(limit, 0.0, torch.exp(-exponent))
    return torch.where(delta > 0, 1 / (1 + (B - 1).clamp(min=0) * decay), 0.0)


def _check_eps(eps: float) -> None:
    if not 0 < eps < 1:
        raise ValueError(f"eps: must lie in (0, 1), got {eps}")


def lambda_star(delta: Tensor | float, B: Tensor | int, eps: float = DEFAULT_EPS) -> Tensor:
    """λ*(ε) = max(0, ln((B−1)(1−ε)/ε)/δ − 1), enough for q^ρ(R) ≥ 1 − ε; +inf when δ ≤ 0."""
    _check_eps(eps)
    delta, B = _t(delta), _t(B)
    need = torch.log((B - 1).clamp(min=0) * (1 - eps) / eps)  # −inf for B = 1: nothing to beat
    lam = (need / delta.masked_fill((delta <= 0) | torch.isinf(delta), 1.0) - 1).clamp(min=0.0)
    lam = torch.where(torch.isinf(delta) | (B < 2), 0.0, lam)  # nothing else to beat
    return torch.where(delta > 0, lam, math.inf)


def rho_star(delta: Tensor | float, B: Tensor | int, eps: float = DEFAULT_EPS) -> Tensor:
    """ρ* = λ*/(1+λ*) (1 where λ* = ∞)."""
    lam = lambda_star(delta, B, eps)
    return torch.where(torch.isinf(lam), 1.0, lam / (1 + lam.masked_fill(torch.isinf(lam), 0.0)))


def binary_entropy(F: Tensor | float) -> Tensor:
    """h(F) = −F ln F − (1−F) ln(1−F), 0 at F ∈ {0, 1}."""
    F = _t(F)
    inside = (F > 0) & (F < 1)
    Fs = F.clamp(1e-300, 1 - 1e-16)
    return torch.where(inside, -Fs * Fs.log() - (1 - Fs) * torch.log1p(-Fs), 0.0)


def entropy_bound(F: Tensor | float, B: Tensor | int, n_g: Tensor, q: Tensor) -> Tensor:
    """h(F) + (1−F) ln(B−1) + Σ_g q(g) ln n_g: bounds H(q^ρ) + Σ_g q^ρ(g) H(w_g) for q(R) = F."""
    F, B, n_g, q = _t(F), _t(B), _t(n_g), _t(q)
    spread = torch.where(B > 1, (1 - F) * torch.log((B - 1).clamp(min=1)), 0.0)
    within = torch.where(q > 0, q * n_g.clamp(min=1).log(), 0.0).sum(-1)
    return binary_entropy(F) + spread + within


def wrong_block(delta: Tensor | float) -> Tensor:
    """δ ≤ 0: another candidate has at least R's log-mass, so q^ρ(R) ≤ ½ at every ρ."""
    return _t(delta) <= 0


def wrong_block_share(delta: Tensor, c: Tensor) -> float | None:
    """Candidate-mass share of (token, layer, head) with δ ≤ 0; None without candidate mass."""
    c = _t(c)
    total = float(c.sum())
    return float(c[wrong_block(delta)].sum()) / total if total > 0 else None


def weighted_quantile(values: Tensor, weights: Tensor, p: float) -> float | None:
    """Smallest value whose cumulative weight share reaches p (None when the weights sum to 0).

    Shares within 10⁻⁶ of p count as reaching it: the weights are float32 masses.
    """
    values, weights = _t(values).flatten(), _t(weights).flatten()
    total = weights.sum()
    if values.numel() == 0 or not total > 0:
        return None
    order = torch.argsort(values)
    share = torch.cumsum(weights[order], 0) / total
    idx = int(torch.searchsorted(share, torch.tensor(p - 1e-6, dtype=torch.float64)))
    return float(values[order][min(idx, values.numel() - 1)])


def visible_counts(key_block_ids: Tensor | Sequence[int], num_blocks: int, num_queries: int) -> Tensor:
    """n_g per query [Tq, G]: visible keys of each block, with localist_attention's causal rule.

    Query i of the last ``num_queries`` positions sees keys j ≤ Tk − Tq + i; −1 marks padding. For
    a response the keys are the prompt's block ids followed by T − 1 generated tokens (in the
    response block), and the T queries are the last prompt position and the decode positions.
    """
    ids = torch.as_tensor(key_block_ids, dtype=torch.long).flatten()
    Tk = ids.numel()
    if not 0 <= num_queries <= Tk:
        raise ValueError(f"num_queries: must lie in [0, {Tk}] (number of keys), got {num_queries}")
    onehot = torch.nn.functional.one_hot(ids.clamp(min=0), num_blocks) * (ids >= 0).unsqueeze(-1)
    return onehot.cumsum(0)[Tk - num_queries:].to(torch.float64)


def _ratio(num: Tensor, den: Tensor) -> float | None:
    den = float(den.sum())
    return float(num.sum()) / den if den >= NULL_MASS else None


@dataclass
class TheoryReport:
    """docs/theory.md §4 per response: predicted vs measured, with the fraction of heads where each bound held.

    Fidelities are candidate-mass-weighted over the (token, layer, head) that point (c ≥ 10⁻⁶) and
    see the target and another candidate; the entropy is the candidate part H(q) + Σ q H(w) in nats.
    """

    epsilon: float
    target: int | None
    num_heads_scored: int
    lambda_star_median: float | None
    lambda_star_p90: float | None
    rho_star_median: float | None
    rho_star_p90: float | None
    wrong_block_share: float | None
    target_not_top: bool | None
    fidelity_measured: float | None
    fidelity_predicted: float | None
    fidelity_bound: float | None
    fidelity_max_abs_error: float | None
    bound_held_fidelity: float | None
    entropy_measured_nats: float | None
    entropy_bound_nats: float | None
    bound_held_entropy: float | None


def _lam_of(rho: Tensor | float | Sequence[float], T: int, L: int) -> Tensor:
    """ρ per request (scalar), per layer ([L]) or per token and layer ([T, L]) → λ [T, L, 1]."""
    lam = rho_to_lambda(rho)
    if lam.dim() == 1 and lam.numel() != L:
        raise ValueError(f"rho: a per-layer list needs one value a layer ({L}), got {lam.numel()}")
    if lam.dim() > 2:
        raise ValueError(f"rho: expected a scalar, [L] or [T, L], got shape {list(lam.shape)}")
    return lam.expand(T, L).unsqueeze(-1)


def predicted_vs_measured(
    stats: Any,
    candidates: Tensor,
    visible: Tensor,
    rho: Tensor | float | Sequence[float],
    target: int | None,
    top_candidate: int | None = None,
    eps: float = DEFAULT_EPS,
) -> TheoryReport:
    """docs/theory.md §4 for one response from its per-token statistics (``log_mass``/``mass``/``inner_entropy``
    [T, L, H, G]).

    ``candidates`` [G] or [T, G] bool; ``visible`` n_g [T, G] (or [G]) — visible keys per block for
    each query, e.g. from :func:`visible_counts` (the entropy bound needs them; block ids alone do
    not say how many keys a query saw). ``rho`` is the dial the response ran at (scalar, per layer
    or [T, L]). ``top_candidate``, when the target came from the request, is the response's top
    candidate block: the flag ``target_not_top`` says whether they differ.
    """
    _check_eps(eps)
    T, L, H, G = stats.log_mass.shape
    cand = torch.as_tensor(candidates, dtype=torch.bool).expand(T, G)
    lam = _lam_of(rho, T, L)
    if target is not None and not 0 <= target < G:
        raise ValueError(f"target: block {target} is outside the table's {G} blocks")
    flag = None if top_candidate is None or target is None else target != top_candidate
    cols = cand.any(0)  # only candidate columns matter: the work scales with |C|, not G
    if target is None or T == 0 or not bool(cols[target]):
        return TheoryReport(eps, target, 0, *([None] * 6), flag, *([None] * 7))
    R = int(cols[:target].sum())  # the target's column among the candidate columns
    cand = cand[:, cols].reshape(T, 1, 1, -1)
    n_g = _t(visible).expand(T, G)[:, cols].reshape(T, 1, 1, -1)

    Lc = stats.log_mass[..., cols].to(torch.float64).masked_fill(~cand, -math.inf)
    mass = stats.mass[..., cols].to(torch.float64) * cand
    c = mass.sum(-1)
    B = candidate_count(Lc)
    delta = block_margin(Lc, R)
    scored = (B >= 2) & torch.isfinite(Lc[..., R]) & (c >= NULL_MASS)
    q = mass / c.clamp(min=1e-300).unsqueeze(-1)
    F_meas = q[..., R]
    F_pred = exact_fidelity(Lc, R, lam)
    F_low = fidelity_lower_bound(delta, B, lam)
    H_q = -torch.special.xlogy(q, q).sum(-1)
    H_meas = H_q + (q * stats.inner_entropy[..., cols].to(torch.float64)).sum(-1)
    H_bound = entropy_bound(F_meas, B, n_g, q)

    pos = scored & (delta > 0)
    w = torch.where(scored, c, 0.0)
    lam_s = lambda_star(delta[pos], B[pos], eps)
    med, p90 = weighted_quantile(lam_s, c[pos], 0.5), weighted_quantile(lam_s, c[pos], 0.9)
    to_rho = lambda x: None if x is None else x / (1 + x)  # noqa: E731
    n = int(scored.sum())
    mean = lambda x: float(x[scored].mean()) if n else None  # noqa: E731
    return TheoryReport(
        epsilon=eps,
        target=target,
        num_heads_scored=n,
        lambda_star_median=med,
        lambda_star_p90=p90,
        rho_star_median=to_rho(med),
        rho_star_p90=to_rho(p90),
        wrong_block_share=wrong_block_share(delta[scored], c[scored]),
        target_not_top=flag,
        fidelity_measured=_ratio(w * F_meas, w),
        fidelity_predicted=_ratio(w * F_pred, w),
        fidelity_bound=_ratio(w * F_low, w),
        fidelity_max_abs_error=float((F_meas - F_pred)[scored].abs().max()) if n else None,
        bound_held_fidelity=float((F_meas >= F_low - FIDELITY_TOL)[pos].double().mean()) if bool(pos.any()) else None,
        entropy_measured_nats=mean(H_meas),
        entropy_bound_nats=mean(H_bound),
        bound_held_entropy=float((H_meas <= H_bound + ENTROPY_TOL)[scored].double().mean()) if n else None,
    )
