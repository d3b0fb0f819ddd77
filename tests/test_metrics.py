"""docs/theory.md §3 metrics: §7's example through the metrics, hand-computed ratios, properties of metrics
computed from real ``localist_attention`` statistics, permutation invariance, T = 0, the levels."""
from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localist.model.attention import BlockStats, localist_attention
from localist.model.blocks import BlockTable
from localist.model.metrics import metrics_for_table, response_layout, response_metrics, token_pointers
from localist.model.theory import visible_counts
from localist.server.wire import choice_metrics

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LN2 = math.log(2)

S7 = [2.0, 1.0, 0.5, 1.5, -1.0, 0.0, 3.0, 0.2]
B7 = [0, 0, 1, 1, 1, 2, 2, 3]
S7_TABLE = {
    0.0: ([0.259745, 0.166997, 0.541870, 0.031388], 1.472402, 1.089703),
    0.5: ([0.173010, 0.071515, 0.752949, 0.002526], 1.020215, 0.720940),
    0.9: ([0.000640, 0.000008, 0.999352, 0.000000], 0.196566, 0.005446),
    1.0: ([0.0, 0.0, 1.0, 0.0], 0.190865, 0.0),
}


def section7(rho: float) -> BlockStats:
    """§7's query as a response of one token, one layer, one head: stats [1, 1, 1, 4]."""
    q = torch.ones(1, 1, 1, 8)
    k = torch.diag(torch.tensor(S7)).view(1, 1, 8, 8)
    _, s = localist_attention(q, k, k, torch.tensor([B7]), rho, torch.zeros(1, 4, dtype=torch.bool), 1.0)
    return BlockStats(*(t.view(1, 1, 1, 4) for t in (s.log_mass, s.mass, s.inner_entropy)))


def wire(m, level: str = "summary") -> dict:
    """The metrics as the server sends them (its one conversion of the model's results)."""
    return choice_metrics(m, 0, level, [0] * m.num_tokens, lambda _: "").model_dump()


ALL4 = torch.ones(4, dtype=torch.bool)
NONE4 = torch.zeros(4, dtype=torch.bool)
N7 = torch.tensor([[2.0, 3.0, 2.0, 1.0]])


@pytest.mark.parametrize("rho", sorted(S7_TABLE))
def test_section7_through_the_metrics(rho):
    pi, Ha, Hpi = S7_TABLE[rho]
    m = response_metrics(section7(rho), ALL4, NONE4, N7, rho=rho)
    assert m.attribution.tolist() == pytest.approx(pi, abs=1e-5)
    assert m.entropy_nats == pytest.approx(Ha, abs=1e-5)
    assert m.block_entropy_nats == pytest.approx(Hpi, abs=1e-5)
    d = wire(m)
    assert d["entropy"]["total_bits"] == pytest.approx(Ha / LN2, abs=1e-5)
    assert d["entropy"]["block_bits"] == pytest.approx(Hpi / LN2, abs=1e-5)
    # no target given: the top candidate (block 2) is used, and every block is a candidate (c = 1)
    assert d["target_block"] == 2 and d["target_source"] == "top_candidate"
    assert d["pointer_fidelity"] == pytest.approx(pi[2], abs=1e-5)
    assert d["sink_mass"] == 0.0 and d["candidate_mass"] == pytest.approx(1.0, abs=1e-6)
    assert d["theory"]["bound_held_entropy"] == 1.0
    assert d["theory"]["target_not_top"] is None  # the target was not given, so there is nothing to flag


def test_section7_with_a_pinned_sink_and_a_requested_target():
    """Block 0 pinned (its mass reported as sink mass), candidates 1..3, the request names block 1."""
    pinned = torch.tensor([True, False, False, False])
    cand = ~pinned
    L = [math.log(sum(math.exp(s) for s, b in zip(S7, B7) if b == g)) for g in range(4)]
    q = torch.ones(1, 1, 1, 8)
    k = torch.diag(torch.tensor(S7)).view(1, 1, 8, 8)
    _, s = localist_attention(q, k, k, torch.tensor([B7]), 0.5, pinned.view(1, 4), 1.0)
    stats = BlockStats(*(t.view(1, 1, 1, 4) for t in (s.log_mass, s.mass, s.inner_entropy)))
    m = response_metrics(stats, cand, pinned, N7, target=1, rho=0.5)
    Z = sum(math.exp(x) for x in L)
    sink = math.exp(L[0]) / Z  # pinned: the base mass
    free = [math.exp(2 * L[g]) for g in (1, 2, 3)]  # (1 + λ) L with λ = 1
    pi1 = (1 - sink) * free[0] / sum(free)
    assert m.sink_mass == pytest.approx(sink, abs=1e-6)
    assert m.candidate_mass == pytest.approx(1 - sink, abs=1e-6)
    assert m.pointer_fidelity == pytest.approx(pi1 / (1 - sink), abs=1e-6)
    assert m.target_source == "request" and m.target_block == 1
    assert m.theory.target_not_top is True  # block 2 is the top candidate
    assert m.theory.wrong_block_share == 1.0


def test_fidelity_is_a_ratio_of_sums_and_null_when_nothing_points():
    """Two layers × two heads; layer 1 head 1 puts everything on the sink (c = 0: null)."""
    mass = torch.tensor([[[[0.2, 0.3, 0.2, 0.3], [0.6, 0.1, 0.3, 0.0]],
                          [[0.5, 0.0, 0.4, 0.1], [1.0, 0.0, 0.0, 0.0]]]])  # [1, 2, 2, 4]
    L = torch.where(mass > 0, mass.log(), -math.inf)
    stats = BlockStats(L, mass, torch.zeros_like(mass))
    cand = torch.tensor([False, True, True, False])
    pinned = torch.tensor([True, False, False, False])
    m = response_metrics(stats, cand, pinned, torch.tensor([[1.0, 1, 1, 1]]), target=1)
    d = wire(m, "per_layer")
    tok = d["tokens"][0]
    # heads: (π(t), c) = (0.3, 0.5), (0.1, 0.4), (0.0, 0.4), (0.0, 0.0)
    assert tok["head_pointer_fidelity"] == [[pytest.approx(0.6), pytest.approx(0.25)], [0.0, None]]
    assert tok["layer_pointer_fidelity"] == [pytest.approx(0.4 / 0.9), pytest.approx(0.0)]
    assert tok["pointer_fidelity"] == pytest.approx(0.4 / 1.3)  # not the mean of the heads' ratios
    assert d["pointer_fidelity"] == pytest.approx(0.4 / 1.3)
    assert tok["sink_mass"] == pytest.approx((0.2 + 0.6 + 0.5 + 1.0) / 4)
    assert tok["layer_sink_mass"] == [pytest.approx(0.4), pytest.approx(0.75)]
    # block entropy of head (0, 0) by hand
    H00 = -sum(p * math.log(p) for p in (0.2, 0.3, 0.2, 0.3))
    assert tok["head_block_entropy_nats"][0][0] == pytest.approx(H00, abs=1e-6)
    assert tok["layers"][1][1] == [1.0, 0.0, 0.0, 0.0]
    json.dumps(d, allow_nan=False)


def test_a_response_that_never_points_has_null_fidelity():
    mass = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    stats = BlockStats(torch.where(mass > 0, 0.0, -math.inf), mass, torch.zeros_like(mass))
    m = response_metrics(stats, torch.tensor([False, True, True, False]), torch.tensor([True, False, False, False]),
                         torch.ones(1, 4), target=2)
    assert m.pointer_fidelity is None and wire(m, "per_token")["tokens"][0]["pointer_fidelity"] is None
    # no candidate mass anywhere and no target: no block can be named
    m = response_metrics(stats, torch.tensor([False, True, True, False]), torch.tensor([True, False, False, False]),
                         torch.ones(1, 4))
    assert m.target_block is None and m.target_source is None and m.pointer_fidelity is None


def test_no_generated_token():
    empty = BlockStats(*(torch.zeros(0, 3, 2, 4) for _ in range(3)))
    for target in (None, 2):
        m = response_metrics(empty, ALL4, NONE4, torch.zeros(0, 4), target=target, rho=0.5)
        for level in ("summary", "per_token", "per_layer"):
            d = wire(m, level)
            json.dumps(d, allow_nan=False)
            assert d["num_tokens"] == 0 and d["attribution"] is None and d["pointer_fidelity"] is None
            assert d["entropy"]["total_nats"] is None and d["theory"]["fidelity_measured"] is None
            assert not d["tokens"]
        assert m.target_block == target
    # the reference model reports "no token" as stats of shape [0, 0, 0, 0]
    table, _ = table_case(1)
    m = metrics_for_table(BlockStats(*(torch.zeros(0, 0, 0, 0) for _ in range(3))), table, target="R1")
    assert m.num_tokens == 0 and m.target_block == 1 and wire(m, "per_layer")["tokens"] == []


# --- metrics from real attention ------------------------------------------------------------

SPANS = [[0, 1, "sink", 1, 0, "sink"], [1, 4, "rule", 0, 0, "R1"], [4, 6, "document", 0, 0, "D1"],
         [6, 8, "rule", 0, 0, "R2"], [8, 10, "user", 0, 0, "question"], [10, 12, "response", 0, 0, "response"]]


def real_stats(key_ids, G, T, rho, seed, pinned=None, L=2, H=3, D=8, head_perm=None, relabel=None):
    """Per-token stats [T, L, H, G] from localist_attention: T queries over the keys, one call a layer.

    ``relabel`` renames the blocks (a permutation of ids), ``head_perm`` reorders the heads; the
    random q/k/v are drawn the same way either way.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([key_ids])
    pin = torch.zeros(1, G, dtype=torch.bool) if pinned is None else pinned.view(1, G).clone()
    if relabel is not None:
        ids = torch.where(ids >= 0, relabel[ids.clamp(min=0)], -1)
        pin = pin[:, torch.argsort(relabel)]
    layers = []
    for _ in range(L):
        q = torch.randn(1, H, T, D, generator=g) * 2.0
        k, v = torch.randn(1, H, len(key_ids), D, generator=g), torch.randn(1, H, len(key_ids), D, generator=g)
        if head_perm is not None:
            q, k, v = q[:, head_perm], k[:, head_perm], v[:, head_perm]
        _, s = localist_attention(q, k, v, ids, rho, pin, D ** -0.5)
        layers.append(s)
    return BlockStats(*(torch.stack([getattr(s, f)[0] for s in layers]).permute(2, 0, 1, 3)
                        for f in ("log_mass", "mass", "inner_entropy")))


def table_case(T: int):
    table = BlockTable.from_wire(SPANS, list(range(12)))
    keys = table.block_ids() + [table.response_id] * (T - 1)
    return table, keys


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 5), rho=st.sampled_from([0.0, 0.4, 0.9, 1.0]),
       target=st.sampled_from([None, 1, 2, 3, "D1"]))
def test_properties_on_real_attention(seed, T, rho, target):
    table, keys = table_case(T)
    stats = real_stats(keys, table.num_blocks, T, rho, seed, pinned=torch.tensor(table.pinned()))
    m = metrics_for_table(stats, table, target=target, rho=rho)
    lay = m.layers
    ones = torch.ones(T)
    assert torch.allclose(m.tokens.attribution.sum(-1), ones, atol=1e-5)  # per token
    assert torch.allclose(lay.attribution.sum(-1), torch.ones(T, 2), atol=1e-5)  # per layer
    assert torch.allclose(lay.head_attribution.sum(-1), torch.ones(T, 2, 3), atol=1e-5)  # per head
    assert sum(m.attribution.tolist()) == pytest.approx(1.0, abs=1e-5)
    # 0 ≤ H(π) ≤ H(a) ≤ ln(visible keys) for every head
    n_keys = torch.tensor([len(keys) - T + 1 + t for t in range(T)], dtype=torch.float32)
    assert (lay.head_block_entropy_nats >= -1e-6).all()
    assert (lay.head_entropy_nats >= lay.head_block_entropy_nats - 1e-5).all()
    assert (lay.head_entropy_nats <= n_keys.log().view(T, 1, 1) + 1e-5).all()
    for F in (lay.head_pointer_fidelity, lay.pointer_fidelity, m.tokens.pointer_fidelity):
        F = F[~F.isnan()]
        assert ((F >= 0) & (F <= 1 + 1e-6)).all()
    assert m.pointer_fidelity is None or 0 <= m.pointer_fidelity <= 1 + 1e-6
    assert m.target_source == ("top_candidate" if target is None else "request")
    th = m.theory
    assert th.bound_held_entropy in (1.0, None) and th.bound_held_fidelity in (1.0, None)
    assert th.fidelity_max_abs_error is None or th.fidelity_max_abs_error < 1e-5
    json.dumps(wire(m, "per_layer"), allow_nan=False)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 5), start=st.integers(0, 4), target=st.sampled_from([None, 2]))
def test_a_streams_token_pointers_are_the_responses_per_token_values(seed, T, start, target):
    """What a stream sends for tokens [start, T) (token_pointers, no theory) equals those tokens'
    per-token values in the whole response's metrics."""
    start = min(start, T - 1)
    table, keys = table_case(T)
    stats = real_stats(keys, table.num_blocks, T, 0.6, seed, pinned=torch.tensor(table.pinned()))
    whole = metrics_for_table(stats, table, target=target, rho=0.6)
    candidates = response_layout(table, T)[0][start:]
    part = BlockStats(*(getattr(stats, f)[start:] for f in ("log_mass", "mass", "inner_entropy")))
    attribution, fidelity = token_pointers(part, candidates, target)
    assert torch.allclose(attribution, whole.tokens.attribution[start:], atol=1e-6)
    if target is None:
        assert fidelity is None
    else:
        assert torch.allclose(fidelity, whole.tokens.pointer_fidelity[start:], equal_nan=True)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 4), rho=st.sampled_from([0.0, 0.6, 1.0]),
       perm_seed=st.integers(0, 1000), target=st.sampled_from([None, 1, 3]))
def test_relabelling_blocks_permutes_attribution_only(seed, T, rho, perm_seed, target):
    """Renaming the blocks (in the attention call itself) permutes attribution; scalars stay put."""
    table, keys = table_case(T)
    G = table.num_blocks
    pinned = torch.tensor(table.pinned())
    cand, _, visible = response_layout(table, T)
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(perm_seed))  # old id g → new id perm[g]
    base = real_stats(keys, G, T, rho, seed, pinned=pinned)
    moved = real_stats(keys, G, T, rho, seed, pinned=pinned, relabel=perm)
    inv = torch.argsort(perm)  # new id → old id
    a = response_metrics(base, cand, pinned, visible, target, rho)
    b = response_metrics(moved, cand[:, inv], pinned[inv], visible[:, inv],
                         None if target is None else int(perm[target]), rho)
    assert torch.allclose(b.layers.head_attribution, a.layers.head_attribution[..., inv], atol=1e-6)
    assert torch.allclose(b.attribution, a.attribution[inv], atol=1e-6)
    if a.target_block is None:
        assert b.target_block is None
    else:
        assert b.target_block == int(perm[a.target_block])
    da, db = wire(a, "per_token"), wire(b, "per_token")
    for key in ("sink_mass", "candidate_mass", "pointer_fidelity"):
        assert db[key] == pytest.approx(da[key], abs=1e-5)
    assert db["entropy"] == pytest.approx(da["entropy"], abs=1e-5)
    for ta, tb in zip(da["tokens"], db["tokens"]):
        assert tb["pointer_fidelity"] == pytest.approx(ta["pointer_fidelity"], abs=1e-5)
        assert tb["entropy_nats"] == pytest.approx(ta["entropy_nats"], abs=1e-5)
    ta, tb = dataclasses.asdict(a.theory), dataclasses.asdict(b.theory)
    for key in ("wrong_block_share", "fidelity_measured", "lambda_star_median", "bound_held_entropy"):
        assert (tb[key] is None) == (ta[key] is None)
        if ta[key] is not None:
            assert tb[key] == pytest.approx(ta[key], abs=1e-4, rel=1e-4)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 4), rho=st.sampled_from([0.0, 0.7]),
       perm_seed=st.integers(0, 1000))
def test_permuting_heads_leaves_token_metrics_unchanged(seed, T, rho, perm_seed):
    table, keys = table_case(T)
    pinned = torch.tensor(table.pinned())
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(perm_seed))
    a = metrics_for_table(real_stats(keys, table.num_blocks, T, rho, seed, pinned=pinned), table, rho=rho)
    b = metrics_for_table(real_stats(keys, table.num_blocks, T, rho, seed, pinned=pinned, head_perm=perm),
                          table, rho=rho)
    assert torch.allclose(b.layers.head_attribution, a.layers.head_attribution[:, :, perm], atol=1e-6)
    for f in ("attribution", "sink_mass", "candidate_mass", "entropy_nats", "block_entropy_nats"):
        assert torch.allclose(getattr(b.tokens, f), getattr(a.tokens, f), atol=1e-5)
    fa, fb = a.tokens.pointer_fidelity, b.tokens.pointer_fidelity
    assert torch.equal(fa.isnan(), fb.isnan()) and torch.allclose(fa[~fa.isnan()], fb[~fb.isnan()], atol=1e-5)
    assert a.target_block == b.target_block


def test_layout_from_the_table():
    table, keys = table_case(3)
    cand, pinned, visible = response_layout(table, 3)
    assert pinned.tolist() == [True, False, False, False, False, False]
    # rules and the document are candidates; the question, the sink and the response are not
    assert cand.tolist() == [[False, True, True, True, False, False]] * 3
    # query of token 0 is the last prompt position (12 keys), then 13 and 14 keys
    assert visible.tolist() == [[1, 3, 2, 2, 2, 2], [1, 3, 2, 2, 2, 3], [1, 3, 2, 2, 2, 4]]
    assert torch.equal(visible, visible_counts(keys, 6, 3))
    # a prompt ending inside a document: that document is not a candidate of the first query
    doc_last = BlockTable.from_wire([[0, 1, "sink", 1, 0, "sink"], [1, 3, "document", 0, 0, "D"],
                                     [3, 5, "document", 0, 0, "E"], [5, 5, "response", 0, 0, "response"]],
                                    list(range(5)))
    cand, _, visible = response_layout(doc_last, 2)
    assert cand.tolist() == [[False, True, False, False], [False, True, True, False]]
    assert visible.tolist() == [[1, 2, 2, 0], [1, 2, 2, 1]]


def test_bad_input_names_the_field():
    stats = section7(0.5)
    table, _ = table_case(1)
    with pytest.raises(ValueError, match="candidates"):
        response_metrics(stats, torch.ones(5, dtype=torch.bool), NONE4, N7)
    with pytest.raises(ValueError, match="pinned"):
        response_metrics(stats, ALL4, torch.zeros(3, dtype=torch.bool), N7)
    with pytest.raises(ValueError, match="target"):
        response_metrics(stats, ALL4, NONE4, N7, target=7)
    with pytest.raises(ValueError, match="target"):
        response_metrics(stats, torch.tensor([False, True, True, True]), NONE4, N7, target=0)
    with pytest.raises(ValueError, match="stats"):
        response_metrics(BlockStats(stats.log_mass, stats.mass[0], stats.inner_entropy), ALL4, NONE4, N7)
    with pytest.raises(ValueError, match="stats.mass"):
        response_metrics(BlockStats(stats.log_mass, stats.mass * math.nan, stats.inner_entropy), ALL4, NONE4, N7)
    with pytest.raises(ValueError, match="audit"):
        wire(response_metrics(stats, ALL4, NONE4, N7), "everything")
    with pytest.raises(ValueError, match="target"):
        metrics_for_table(real_stats(table.block_ids(), 6, 1, 0.0, 0), table, target="nope")
    with pytest.raises(ValueError, match="rho"):
        response_metrics(stats, ALL4, NONE4, N7, rho=[0.1, 0.2])


def test_fast_enough_for_the_server():
    """A 256-token response of a 24-layer, 16-head model over 16 blocks, at the per_token level.

    About 0.1 s on an idle core; the limit leaves room for a loaded machine while still failing for
    a Python loop over the ~98k (token, layer, head) triples.
    """
    T, L, H, G = 256, 24, 16, 16
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, L, H, G, generator=g) * 3
    stats = BlockStats(logits, torch.softmax(logits, -1), torch.rand(T, L, H, G, generator=g))
    cand = torch.zeros(G, dtype=torch.bool)
    cand[1:10] = True
    pinned = torch.zeros(G, dtype=torch.bool)
    pinned[0] = True
    visible = torch.full((T, G), 50.0)
    start = time.perf_counter()
    m = response_metrics(stats, cand, pinned, visible, target=None, rho=0.5)
    wire(m, "per_token")
    elapsed = time.perf_counter() - start
    assert m.theory.num_heads_scored == T * L * H
    assert elapsed < 10.0, elapsed
