"""Localist attention (docs/theory.md §2): the three forms agree, the dial's properties hold, §7's table.

Attention weights are read through the output by using the identity matrix as the values
(out = probs @ I), so every property is checked on what the one-pass kernel really computes.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localist.model.attention import (
    block_onehot,
    dial_bias,
    dial_mass,
    localist_attention,
    merge_block_partials,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RHO_GRID = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]


def make_case(seed: int, gqa: bool = True, pad: bool = True, scale_logits: float = 1.0):
    """Random q/k/v, block ids (contiguous spans, some −1 padding after key 0), pinned sink block 0."""
    g = torch.Generator().manual_seed(seed)
    B, Hkv = 2, 2
    H = 4 if gqa else Hkv
    Tk = int(torch.randint(3, 12, (1,), generator=g))
    Tq = int(torch.randint(1, Tk + 1, (1,), generator=g))
    D, G = 8, 5
    q = torch.randn(B, H, Tq, D, generator=g) * scale_logits
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    # contiguous spans: block 0 is the one-token sink, then non-decreasing ids in 1..G-1
    rest = torch.sort(torch.randint(1, G, (B, Tk - 1), generator=g), dim=-1).values
    block_ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), rest], dim=-1)
    if pad:
        drop = torch.rand(B, Tk, generator=g) < 0.15
        drop[:, 0] = False
        block_ids = block_ids.masked_fill(drop, -1)
    pinned = torch.zeros(B, G, dtype=torch.bool)
    pinned[:, 0] = True
    return q, k, v, block_ids, pinned


def visibility(block_ids: torch.Tensor, Tq: int) -> torch.Tensor:
    """[B, Tq, Tk] causal visibility, the same convention as localist_attention's default."""
    Tk = block_ids.shape[-1]
    causal = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return causal.unsqueeze(0) & (block_ids >= 0).unsqueeze(1)


def scores64(q, k, block_ids, scale):
    """Plain scores in float64 with −inf where a key is invisible; GQA heads repeated."""
    H = q.shape[1]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    return s.masked_fill(~visibility(block_ids, q.shape[2]).unsqueeze(1), float("-inf"))


def repeat_v(v, H):
    return v.repeat_interleave(H // v.shape[1], dim=1).double()


def probs_of(q, k, block_ids, rho, pinned, scale=0.5):
    """Attention weights [B, H, Tq, Tk] of the one-pass kernel, read through identity values."""
    B, Hkv, Tk, _ = k.shape
    eye = torch.eye(Tk).expand(B, Hkv, Tk, Tk).contiguous()
    probs, stats = localist_attention(q, k, eye, block_ids, rho, pinned, scale)
    return probs, stats


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp(min=1e-300).log()).sum(-1)


# --- the three forms agree ------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rho_seed=st.integers(0, 2**31 - 1), gqa=st.booleans())
def test_three_forms_agree(seed, rho_seed, gqa):
    q, k, v, block_ids, pinned = make_case(seed, gqa=gqa)
    B, H, Tq, _ = q.shape
    G = pinned.shape[-1]
    rg = torch.Generator().manual_seed(rho_seed)
    rho = torch.rand(B, Tq, generator=rg)  # per-query ρ
    rho[0, 0] = 1.0
    scale = 0.5
    out, stats = localist_attention(q, k, v, block_ids, rho, pinned, scale)

    s = scores64(q, k, block_ids, scale)
    onehot = block_onehot(block_ids, G).double().unsqueeze(1).unsqueeze(2)  # [B,1,1,Tk,G]
    in_block = onehot.bool() & torch.isfinite(s).unsqueeze(-1)  # [B,H,Tq,Tk,G]
    s_g = s.unsqueeze(-1).masked_fill(~in_block, float("-inf"))
    L = torch.logsumexp(s_g, dim=-2)  # [B,H,Tq,G]
    present = torch.isfinite(L)
    assert torch.equal(torch.isfinite(stats.log_mass), present)
    assert torch.allclose(stats.log_mass[present].double(), L[present], atol=1e-5)

    # form 2: plain softmax attention inside each block, merged with weights π^ρ
    w_g = torch.where(in_block, torch.exp(s_g - L.unsqueeze(-2).masked_fill(~present.unsqueeze(-2), 0.0)), 0.0)
    partial = torch.einsum("bhqkg,bhkd->bhqgd", w_g, repeat_v(v, H))
    rho4 = rho.view(B, 1, Tq)
    merged, mass2 = merge_block_partials(partial.float(), L.float(), rho4, pinned.view(B, 1, 1, G))
    # float32 errors in L are amplified (1 + λ)-fold by the sharpened merge: the tolerance follows
    lam = torch.where(rho < 1, rho / (1 - rho).clamp(min=1e-12), 0.0).view(B, 1, Tq, 1)
    assert ((merged - out).abs() <= 1e-5 * (1 + lam)).all()
    assert torch.allclose(mass2, stats.mass, atol=1e-6)

    # form 1: softmax(s + β[b(j)]) with the additive per-block bias
    beta = dial_bias(L.float(), rho4, pinned.view(B, 1, 1, G)).double()  # [B,H,Tq,G]
    bias_j = torch.einsum("bhqg,bkg->bhqk", beta.nan_to_num(neginf=-1e300), block_onehot(block_ids, G).double())
    biased = (s + bias_j).clamp(min=-1e300).masked_fill(~torch.isfinite(s), float("-inf"))
    out1 = torch.matmul(torch.softmax(biased, -1), repeat_v(v, H))
    assert torch.allclose(out1.float(), out, atol=1e-5)


def test_additive_bias_without_pins_is_lambda_times_L():
    """docs/theory.md §2 form 1: with no pinned block β = λ·L gives the same attention (constants cancel)."""
    q, k, v, block_ids, pinned = make_case(7, pad=False)
    pinned[:] = False
    rho, scale = 0.6, 0.5
    out, stats = localist_attention(q, k, v, block_ids, rho, pinned, scale)
    lam = rho / (1 - rho)
    s = scores64(q, k, block_ids, scale)
    bias = lam * torch.einsum("bhqg,bkg->bhqk", stats.log_mass.double().nan_to_num(neginf=0.0),
                              block_onehot(block_ids, pinned.shape[-1]).double())
    out1 = torch.matmul(torch.softmax(s + bias, -1), repeat_v(v, q.shape[1]))
    assert torch.allclose(out1.float(), out, atol=1e-5)


# --- docs/theory.md §2 properties ---------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), gqa=st.booleans())
def test_rho_zero_is_plain_softmax(seed, gqa):
    q, k, v, block_ids, pinned = make_case(seed, gqa=gqa)
    out, _ = localist_attention(q, k, v, block_ids, 0.0, pinned, 0.5)
    H = q.shape[1]
    kk = k.repeat_interleave(H // k.shape[1], dim=1)
    s = (torch.matmul(q, kk.transpose(-1, -2)) * 0.5).masked_fill(
        ~visibility(block_ids, q.shape[2]).unsqueeze(1), float("-inf"))
    plain = torch.matmul(torch.softmax(s, -1), v.repeat_interleave(H // v.shape[1], dim=1))
    assert (out - plain).abs().max() <= 1e-6


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_dial_properties_over_rho_grid(seed):
    """Within-block weights and pinned masses fixed; top free mass up, free block entropy down."""
    q, k, _, block_ids, pinned = make_case(seed, scale_logits=2.0)
    G = pinned.shape[-1]
    onehot = block_onehot(block_ids, G)  # [B,Tk,G]
    base_probs, base = probs_of(q, k, block_ids, 0.0, pinned)
    free = torch.isfinite(base.log_mass) & ~pinned.view(-1, 1, 1, G)
    prev_top, prev_H = None, None
    for rho in RHO_GRID:
        probs, stats = probs_of(q, k, block_ids, rho, pinned)
        assert torch.isfinite(probs).all()
        assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-5)
        # mass per block agrees with the weights the kernel applied
        assert torch.allclose(torch.einsum("bhqk,bkg->bhqg", probs, onehot), stats.mass, atol=1e-5)
        assert torch.equal(stats.log_mass, base.log_mass)  # the dial never changes L
        assert torch.allclose(stats.mass[..., 0], base.mass[..., 0], atol=1e-6)  # pinned sink
        # within-block weights: probs_j / π(b(j)) unchanged wherever the block keeps some mass
        mass_j = torch.einsum("bhqg,bkg->bhqk", stats.mass, onehot)
        base_j = torch.einsum("bhqg,bkg->bhqk", base.mass, onehot)
        keep = mass_j > 1e-3
        assert torch.allclose((probs / mass_j.clamp(min=1e-30))[keep], (base_probs / base_j.clamp(min=1e-30))[keep],
                              atol=1e-4)
        fm = torch.where(free, stats.mass, 0.0)
        share = fm.sum(-1, keepdim=True)
        qfree = torch.where(share > 0, fm / share.clamp(min=1e-30), 0.0)
        top, H = fm.amax(-1), entropy(qfree.double())
        if prev_top is not None:
            assert (top >= prev_top - 1e-6).all()
            assert (H <= prev_H + 1e-6).all()
        prev_top, prev_H = top, H


def test_rho_one_puts_free_mass_on_argmax_ties_split():
    """Blocks 1 and 2 hold identical keys (an exact tie), block 3 is weaker; sink pinned."""
    D = 4
    q = torch.tensor([1.0, 0.5, -0.3, 0.2]).view(1, 1, 1, D)
    k_top = torch.tensor([1.0, 1.0, 0.0, 0.0])
    k = torch.stack([torch.tensor([0.3, 0.0, 0.0, 1.0]), k_top, k_top, torch.tensor([0.0, 0.0, 1.0, 0.0])])
    k = k.view(1, 1, 4, D)
    block_ids = torch.tensor([[0, 1, 2, 3]])
    pinned = torch.tensor([[True, False, False, False]])
    _, base = localist_attention(q, k, k, block_ids, 0.0, pinned, 1.0)
    _, lim = localist_attention(q, k, k, block_ids, 1.0, pinned, 1.0)
    m0, m1 = base.mass[0, 0, 0], lim.mass[0, 0, 0]
    free_share = 1.0 - m0[0]
    assert m1[0] == pytest.approx(float(m0[0]), abs=1e-7)
    assert m1[1] == pytest.approx(float(free_share) / 2, abs=1e-6)
    assert m1[2] == pytest.approx(float(free_share) / 2, abs=1e-6)
    assert m1[3] == 0.0


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_rho_to_one_is_continuous(seed):
    """ρ = 0.999999 is within float32 reach of the ρ = 1 limit when the top free block is clear."""
    q, k, v, block_ids, pinned = make_case(seed, scale_logits=3.0)
    G = pinned.shape[-1]
    _, base = localist_attention(q, k, v, block_ids, 0.0, pinned, 0.5)
    L = base.log_mass.masked_fill(pinned.view(-1, 1, 1, G), float("-inf"))
    top2 = L.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1] > 1e-3) | ~torch.isfinite(top2[..., 1])
    out_near, near = localist_attention(q, k, v, block_ids, 0.999999, pinned, 0.5)
    out_lim, lim = localist_attention(q, k, v, block_ids, 1.0, pinned, 0.5)
    rows = clear.all(1)  # [B, Tq] where every head has a clear winner
    assert torch.allclose(near.mass[clear], lim.mass[clear], atol=1e-5)
    assert torch.allclose(out_near.permute(0, 2, 1, 3)[rows], out_lim.permute(0, 2, 1, 3)[rows], atol=1e-4)


def test_empty_and_underflowing_blocks_give_no_nan():
    """Block 2 has no key, block 3 underflows (scores −300 below the rest); padding everywhere else."""
    D = 4
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).view(1, 1, 1, D) * 100.0
    k = torch.zeros(1, 1, 6, D)
    k[0, 0, :, 0] = torch.tensor([0.5, 1.0, 0.8, -2.0, -2.0, 0.0])
    v = torch.randn(1, 1, 6, D)
    block_ids = torch.tensor([[0, 1, 1, 3, 3, -1]])
    pinned = torch.tensor([[True, False, False, False, False]])
    for rho in RHO_GRID:
        out, st_ = localist_attention(q, k, v, block_ids, rho, pinned, 1.0)
        assert torch.isfinite(out).all()
        for t in (st_.mass, st_.inner_entropy):
            assert torch.isfinite(t).all()
        L = st_.log_mass[0, 0, 0]
        assert torch.isinf(L[2]) and torch.isinf(L[3]) and torch.isinf(L[4])  # absent and underflowed
        assert st_.mass[0, 0, 0, 2:].sum() == 0.0
        assert st_.mass.sum() == pytest.approx(1.0, abs=1e-6)
    # a query that sees no key at all (only padding visible) gives zeros, not NaN
    out, st_ = localist_attention(q, k, v, torch.full((1, 6), -1), 0.5, pinned, 1.0)
    assert torch.isfinite(out).all() and (st_.mass == 0).all()


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9, 0.999])
def test_gradients_finite_for_training(rho):
    q, k, v, block_ids, pinned = make_case(3, scale_logits=2.0)
    G = pinned.shape[-1]
    block_ids[:, -1] = -1
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, stats = localist_attention(q, k, v, block_ids, rho, pinned, 0.5)
    free = ~pinned.view(-1, 1, 1, G) & (stats.mass > 0)
    qf = stats.mass / stats.mass.masked_fill(~free, 0).sum(-1, keepdim=True).clamp(min=1e-12)
    penalty = -(qf * qf.clamp(min=1e-12).log()).masked_fill(~free, 0).sum()  # the §5 entropy penalty
    (out.square().sum() + penalty + stats.inner_entropy.sum()).backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


@pytest.mark.parametrize("rho", [0.0, 0.6, 1.0])
def test_probed_token_weights_are_the_final_weights(rho):
    q, k, _, block_ids, pinned = make_case(5)
    Tq, Tk = q.shape[2], k.shape[2]
    probe = torch.tensor([[b, i, j] for b in range(2) for i in range(Tq) for j in range(Tk)])
    B, Hkv = k.shape[:2]
    eye = torch.eye(Tk).expand(B, Hkv, Tk, Tk).contiguous()
    probs, stats = localist_attention(q, k, eye, block_ids, rho, pinned, 0.5, probe=probe)
    assert torch.equal(stats.token_weights, probs[probe[:, 0], :, probe[:, 1], probe[:, 2]])
    assert stats.token_weights.shape == (len(probe), q.shape[1])


def test_dial_mass_with_every_block_absent_is_zero():
    L = torch.full((2, 3), float("-inf"))
    mass = dial_mass(L, torch.tensor([0.5, 1.0]), torch.tensor([True, False, False]))
    assert torch.equal(mass, torch.zeros(2, 3))


# --- docs/theory.md §7 worked example -----------------------------------------------------------------

S7 = [2.0, 1.0, 0.5, 1.5, -1.0, 0.0, 3.0, 0.2]
B7 = [0, 0, 1, 1, 1, 2, 2, 3]
S7_L = [2.313262, 1.871539, 3.048587, 0.200000]
S7_TABLE = {
    0.0: ([0.259745, 0.166997, 0.541870, 0.031388], 1.472402, 1.089703),
    0.5: ([0.173010, 0.071515, 0.752949, 0.002526], 1.020215, 0.720940),
    0.9: ([0.000640, 0.000008, 0.999352, 0.000000], 0.196566, 0.005446),
    1.0: ([0.0, 0.0, 1.0, 0.0], 0.190865, 0.0),
}


def section7_stats(rho: float):
    """One query whose scores are exactly §7's s: q = 1, k = diag(s), scale 1."""
    s = torch.tensor(S7)
    q = torch.ones(1, 1, 1, 8)
    k = torch.diag(s).view(1, 1, 8, 8)
    eye = torch.eye(8).view(1, 1, 8, 8)
    probs, stats = localist_attention(q, k, eye, torch.tensor([B7]), rho, torch.zeros(1, 4, dtype=torch.bool), 1.0)
    return probs[0, 0, 0], stats


@pytest.mark.parametrize("rho", sorted(S7_TABLE))
def test_section7_worked_example(rho):
    probs, stats = section7_stats(rho)
    pi_expected, Ha, Hpi = S7_TABLE[rho]
    L = stats.log_mass[0, 0, 0]
    assert L.tolist() == pytest.approx(S7_L, abs=1e-5)
    # L by hand: logsumexp of each block's scores
    for g, Lg in enumerate(S7_L):
        assert Lg == pytest.approx(math.log(sum(math.exp(s) for s, b in zip(S7, B7) if b == g)), abs=1e-6)
    pi = stats.mass[0, 0, 0]
    assert pi.tolist() == pytest.approx(pi_expected, abs=1e-5)
    H_pi = float(entropy(pi.double()))
    H_a_from_stats = H_pi + float((pi * stats.inner_entropy[0, 0, 0]).sum())
    H_a_from_probs = float(entropy(probs.double()))
    assert H_pi == pytest.approx(Hpi, abs=1e-5)
    assert H_a_from_stats == pytest.approx(Ha, abs=1e-5)
    assert H_a_from_probs == pytest.approx(Ha, abs=1e-5)
