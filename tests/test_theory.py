"""docs/theory.md §4 theory: each formula against arithmetic done by hand here, and the bounds against real
attention statistics from ``localist_attention`` (they must hold at every ρ)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localist.model.attention import BlockStats, dial_mass, localist_attention
from localist.model.theory import (
    binary_entropy,
    block_margin,
    entropy_bound,
    exact_fidelity,
    fidelity_lower_bound,
    lambda_star,
    predicted_vs_measured,
    rho_star,
    rho_to_lambda,
    visible_counts,
    weighted_quantile,
    wrong_block,
    wrong_block_share,
)

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INF = math.inf


def test_rho_to_lambda():
    lam = rho_to_lambda([0.0, 0.5, 0.9, 1.0])
    assert lam[:3].tolist() == pytest.approx([0.0, 1.0, 9.0])
    assert math.isinf(lam[3])
    with pytest.raises(ValueError, match="rho"):
        rho_to_lambda(1.5)


def test_exact_fidelity_by_hand():
    L = torch.tensor([2.0, 1.0, 0.5])
    # λ = 1: 1 / (1 + e^{−2·(2−1)} + e^{−2·(2−0.5)})
    assert float(exact_fidelity(L, 0, 1.0)) == pytest.approx(1 / (1 + math.exp(-2) + math.exp(-3)), abs=1e-12)
    # target 2 (the weakest), λ = 0: its plain softmax share
    expect = math.exp(0.5) / (math.exp(2) + math.exp(1) + math.exp(0.5))
    assert float(exact_fidelity(L, 2, 0.0)) == pytest.approx(expect, abs=1e-12)
    # λ = ∞: all on the top block; a tie splits evenly; a weaker target gets nothing
    assert float(exact_fidelity(L, 0, INF)) == 1.0
    assert float(exact_fidelity(torch.tensor([1.0, 1.0, 0.0]), 1, INF)) == 0.5
    assert float(exact_fidelity(L, 1, INF)) == 0.0
    # absent blocks (−inf) are not candidates
    assert float(exact_fidelity(torch.tensor([2.0, -INF, 1.0]), 0, 0.0)) == pytest.approx(1 / (1 + math.exp(-1)))
    assert float(exact_fidelity(torch.tensor([-INF, 1.0]), 0, 0.0)) == 0.0


@SETTINGS
@given(L=st.lists(st.floats(-8, 8), min_size=2, max_size=6), rho=st.sampled_from([0.0, 0.3, 0.7, 0.95, 1.0]),
       data=st.data())
def test_exact_fidelity_is_what_the_dial_does(L, rho, data):
    """q^ρ(R) of §4 equals the mass dial_mass gives R, renormalised over the candidates."""
    R = data.draw(st.integers(0, len(L) - 1))
    Lt = torch.tensor(L, dtype=torch.float32)
    mass = dial_mass(Lt, rho, torch.zeros(len(L), dtype=torch.bool))
    assert float(exact_fidelity(Lt, R, rho_to_lambda(rho))) == pytest.approx(float(mass[R]), abs=1e-5)


def test_block_margin_and_wrong_block():
    L = torch.tensor([2.0, 1.0, 0.5, -INF])
    assert float(block_margin(L, 0)) == pytest.approx(1.0)
    assert float(block_margin(L, 2)) == pytest.approx(-1.5)
    assert float(block_margin(L, 3)) == -INF
    assert float(block_margin(torch.tensor([0.3, -INF]), 0)) == INF
    assert wrong_block(torch.tensor([1.0, 0.0, -0.2])).tolist() == [False, True, True]


def test_fidelity_lower_bound_by_hand():
    # δ = 1, B = 3, λ = 1: 1 / (1 + 2 e^{−2})
    assert float(fidelity_lower_bound(1.0, 3, 1.0)) == pytest.approx(1 / (1 + 2 * math.exp(-2)), abs=1e-12)
    assert float(fidelity_lower_bound(0.0, 3, 1.0)) == 0.0  # no statement for δ ≤ 0
    assert float(fidelity_lower_bound(0.2, 5, INF)) == 1.0
    # it is below the exact fidelity and above the linear form 1 − (B−1)e^{−(1+λ)δ}
    L = torch.tensor([2.0, 1.0, 0.5])
    for lam in (0.0, 1.0, 4.0):
        lb = float(fidelity_lower_bound(1.0, 3, lam))
        assert lb <= float(exact_fidelity(L, 0, lam)) + 1e-12
        assert lb >= 1 - 2 * math.exp(-(1 + lam) * 1.0)


def test_lambda_star_and_rho_star_by_hand():
    # δ = 0.5, B = 4, ε = 0.1: ln(3 · 0.9 / 0.1) / 0.5 − 1 = 2 ln 27 − 1
    expect = math.log(3 * 0.9 / 0.1) / 0.5 - 1
    assert float(lambda_star(0.5, 4, 0.1)) == pytest.approx(expect, abs=1e-12)
    assert float(rho_star(0.5, 4, 0.1)) == pytest.approx(expect / (1 + expect), abs=1e-12)
    # at λ* the lower bound is exactly 1 − ε
    assert float(fidelity_lower_bound(0.5, 4, expect)) == pytest.approx(0.9, abs=1e-12)
    assert float(lambda_star(10.0, 4, 0.1)) == 0.0  # the base model already points well enough
    assert float(lambda_star(INF, 1, 0.1)) == 0.0  # a lone candidate
    assert math.isinf(lambda_star(-0.3, 4, 0.1)) and float(rho_star(0.0, 4, 0.1)) == 1.0
    with pytest.raises(ValueError, match="eps"):
        lambda_star(0.5, 4, 1.0)


def test_entropy_bound_by_hand():
    F, q, n = 0.7, [0.7, 0.2, 0.1], [4, 2, 5]
    h = -0.7 * math.log(0.7) - 0.3 * math.log(0.3)
    expect = h + 0.3 * math.log(2) + 0.7 * math.log(4) + 0.2 * math.log(2) + 0.1 * math.log(5)
    got = entropy_bound(F, 3, torch.tensor(n), torch.tensor(q, dtype=torch.float64))
    assert float(got) == pytest.approx(expect, abs=1e-12)
    assert float(binary_entropy(0.5)) == pytest.approx(math.log(2))
    assert float(binary_entropy(1.0)) == 0.0 and float(binary_entropy(0.0)) == 0.0
    # F = 1: only the target's inner bound ln n_R remains (the ρ → 1 limit of §4)
    assert float(entropy_bound(1.0, 3, torch.tensor(n), torch.tensor([1.0, 0, 0]))) == pytest.approx(math.log(4))


def test_wrong_block_share_and_weighted_quantile_by_hand():
    delta, c = torch.tensor([1.0, -0.5, 0.0]), torch.tensor([0.2, 0.3, 0.5])
    assert wrong_block_share(delta, c) == pytest.approx(0.3 + 0.5)
    assert wrong_block_share(delta, torch.zeros(3)) is None
    v, w = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.2, 0.5, 0.3])
    assert weighted_quantile(v, w, 0.5) == 1.0  # cumulative 0.5 reached at value 1
    assert weighted_quantile(v, w, 0.9) == 3.0  # 0.5, 0.8, 1.0
    assert weighted_quantile(v, w, 0.6) == 2.0
    assert weighted_quantile(torch.tensor([]), torch.tensor([]), 0.5) is None


def test_visible_counts_follow_the_causal_rule():
    ids = [0, 1, 1, 2, 2, -1, 2]
    n = visible_counts(ids, 3, 3)  # the last three queries see keys ≤ 4, ≤ 5, ≤ 6
    assert n.tolist() == [[1, 2, 2], [1, 2, 2], [1, 2, 3]]
    assert visible_counts(ids, 3, 0).shape == (0, 3)
    with pytest.raises(ValueError, match="num_queries"):
        visible_counts(ids, 3, 8)


# --- per-response aggregation ---------------------------------------------------------------

S7 = [2.0, 1.0, 0.5, 1.5, -1.0, 0.0, 3.0, 0.2]
B7 = [0, 0, 1, 1, 1, 2, 2, 3]


def section7(rho: float) -> BlockStats:
    """docs/theory.md §7's query as a one-token, one-layer, one-head response: stats [1, 1, 1, 4]."""
    q = torch.ones(1, 1, 1, 8)
    k = torch.diag(torch.tensor(S7)).view(1, 1, 8, 8)
    _, s = localist_attention(q, k, k, torch.tensor([B7]), rho, torch.zeros(1, 4, dtype=torch.bool), 1.0)
    return BlockStats(*(t.view(1, 1, 1, 4) for t in (s.log_mass, s.mass, s.inner_entropy)))


def test_predicted_vs_measured_on_section7_by_hand():
    stats = section7(0.5)
    L = [math.log(sum(math.exp(s) for s, b in zip(S7, B7) if b == g)) for g in range(4)]
    n = [2, 3, 2, 1]
    rep = predicted_vs_measured(stats, torch.ones(4, dtype=torch.bool), torch.tensor([n]), 0.5, 2,
                                top_candidate=2)
    lam, delta = 1.0, L[2] - L[0]
    F = 1 / (1 + sum(math.exp(-(1 + lam) * (L[2] - L[g])) for g in (0, 1, 3)))
    assert F == pytest.approx(0.752949, abs=1e-6)  # §7's table
    assert rep.fidelity_measured == pytest.approx(F, abs=1e-6)
    assert rep.fidelity_predicted == pytest.approx(F, abs=1e-6)  # L is float32
    assert rep.fidelity_max_abs_error < 1e-6
    assert rep.fidelity_bound == pytest.approx(1 / (1 + 3 * math.exp(-(1 + lam) * delta)), abs=1e-6)
    ls = math.log(3 * 0.9 / 0.1) / delta - 1
    assert rep.lambda_star_median == pytest.approx(ls, abs=1e-5)
    assert rep.lambda_star_p90 == pytest.approx(ls, abs=1e-5)
    assert rep.rho_star_median == pytest.approx(ls / (1 + ls), abs=1e-6)
    assert rep.wrong_block_share == 0.0 and rep.target_not_top is False
    assert rep.entropy_measured_nats == pytest.approx(1.020215, abs=1e-5)  # all blocks are candidates: H(a)
    q = [float(x) for x in stats.mass.flatten()]
    bound = (-F * math.log(F) - (1 - F) * math.log(1 - F) + (1 - F) * math.log(3)
             + sum(qg * math.log(ng) for qg, ng in zip(q, n)))
    assert rep.entropy_bound_nats == pytest.approx(bound, abs=1e-5)
    assert rep.bound_held_fidelity == 1.0 and rep.bound_held_entropy == 1.0
    assert rep.num_heads_scored == 1
    assert rep.target == 2 and rep.epsilon == 0.1


def test_wrong_target_is_flagged():
    rep = predicted_vs_measured(section7(0.9), torch.ones(4, dtype=torch.bool), torch.tensor([[2, 3, 2, 1]]),
                                0.9, 0, top_candidate=2)
    assert rep.target_not_top is True
    assert rep.wrong_block_share == 1.0  # δ = L_0 − L_2 < 0
    assert rep.lambda_star_median is None and rep.bound_held_fidelity is None
    assert rep.fidelity_bound == 0.0
    assert rep.fidelity_measured == pytest.approx(0.000640, abs=1e-6)  # §7 at ρ = 0.9


def test_no_tokens_and_no_target():
    empty = BlockStats(*(torch.zeros(0, 2, 3, 4) for _ in range(3)))
    rep = predicted_vs_measured(empty, torch.ones(4, dtype=torch.bool), torch.zeros(0, 4), [0.5, 0.5], 1)
    assert rep.num_heads_scored == 0 and rep.fidelity_measured is None and rep.lambda_star_median is None
    rep = predicted_vs_measured(section7(0.5), torch.ones(4, dtype=torch.bool), torch.tensor([[2, 3, 2, 1]]),
                                0.5, None)
    assert rep.target is None and rep.fidelity_measured is None and rep.target_not_top is None
    with pytest.raises(ValueError, match="target"):
        predicted_vs_measured(section7(0.5), torch.ones(4, dtype=torch.bool), torch.ones(1, 4), 0.5, 9)
    with pytest.raises(ValueError, match="rho"):
        predicted_vs_measured(section7(0.5), torch.ones(4, dtype=torch.bool), torch.ones(1, 4), [0.5, 0.5], 1)


def random_response(seed: int, rho: float, layers: int = 2):
    """Real localist attention over a random prompt: queries = the last T positions, one call a layer.

    Block 0 is the pinned sink, blocks 1..G−2 are candidates, the last block is the response.
    """
    g = torch.Generator().manual_seed(seed)
    G, H, D = 6, 3, 8
    sizes = torch.randint(1, 5, (G - 1,), generator=g).tolist()
    T = int(torch.randint(1, 5, (1,), generator=g))
    ids = [0] + [b for i, s in enumerate(sizes) for b in [i + 1] * s] + [G - 1] * (T - 1)
    Tk = len(ids)
    pinned = torch.zeros(1, G, dtype=torch.bool)
    pinned[0, 0] = True
    per_layer = []
    for _ in range(layers):
        q = torch.randn(1, H, T, D, generator=g) * 2.5
        k, v = torch.randn(1, H, Tk, D, generator=g), torch.randn(1, H, Tk, D, generator=g)
        _, s = localist_attention(q, k, v, torch.tensor([ids]), rho, pinned, D ** -0.5)
        per_layer.append(s)
    stats = BlockStats(*(torch.stack([getattr(s, f)[0] for s in per_layer]).permute(2, 0, 1, 3)
                         for f in ("log_mass", "mass", "inner_entropy")))  # [T, L, H, G]
    cand = torch.tensor([False] + [True] * (G - 2) + [False])
    return stats, cand, visible_counts(ids, G, T)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rho=st.sampled_from([0.0, 0.25, 0.5, 0.8, 0.95, 0.999, 1.0]),
       target=st.integers(1, 4))
def test_bounds_hold_on_real_attention(seed, rho, target):
    stats, cand, visible = random_response(seed, rho)
    rep = predicted_vs_measured(stats, cand, visible, rho, target)
    assert rep.num_heads_scored > 0
    assert rep.bound_held_entropy == 1.0
    assert rep.bound_held_fidelity in (1.0, None)
    assert rep.fidelity_max_abs_error < 1e-5  # the engine's masses are §4's q^ρ
    assert rep.fidelity_bound <= rep.fidelity_measured + 1e-6
    assert 0.0 <= rep.wrong_block_share <= 1.0
    if rep.lambda_star_median is not None:
        assert 0.0 <= rep.lambda_star_median <= rep.lambda_star_p90


def test_bound_check_catches_wrong_visible_counts():
    """Claiming one visible key per block makes Σ q ln n_g = 0: the entropy bound must then fail somewhere."""
    stats, cand, visible = random_response(11, 0.0)
    assert visible.max() > 1
    rep = predicted_vs_measured(stats, cand, torch.ones_like(visible), 0.0, 1)
    assert rep.bound_held_entropy < 1.0


def test_per_layer_rho():
    stats, cand, visible = random_response(5, 0.0)
    same = predicted_vs_measured(stats, cand, visible, [0.0, 0.0], 2)
    assert same.fidelity_max_abs_error < 1e-5
    # claiming a different dial than the one used shows up as a prediction error
    wrong = predicted_vs_measured(stats, cand, visible, [0.9, 0.9], 2)
    assert wrong.fidelity_max_abs_error > 1e-3
