"""The ``localist`` object of a response: the dial, the block table and each choice's metrics with the
theory's bounds beside them (docs/theory.md §3–§4).

Two pointer fidelities appear, and they are different aggregates (docs/theory.md §3):
``ChoiceMetrics.pointer_fidelity`` is the **all-heads** value F_all; ``Theory.fidelity_measured`` is
the **scored-heads** value F_S, the one the fidelity bound belongs to. Wherever a bound is shown, F_S
stands beside it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import AuditLevel, DialScope, WireModel, added_later
from .rules import AnchorCheck, RuleUse


class Dial(WireModel):
    rho: list[float] = Field(description="ρ used at each layer.")
    preset: str | None = Field(None, description="The preset name when the request gave one.")
    scope: DialScope | None = added_later("The dial scope used (the request's or the model's default); absent in "
                                          "records written before the field existed, which all used `all`.")


class BlockInfo(WireModel):
    id: int
    label: str
    kind: str
    start: int = Field(description="First prompt token of the block.")
    end: int = Field(description="One past the last prompt token; the response block ends at the prompt's end "
                     "and also holds every generated token.")
    pinned: bool
    candidate: bool


class Entropy(WireModel):
    total_nats: float | None = Field(description="H(a): attention entropy over tokens (mean over tokens, layers, heads).")
    total_bits: float | None = Field(description="H(a) in bits.")
    block_nats: float | None = Field(description="H(π): entropy of the block distribution.")
    block_bits: float | None = Field(description="H(π) in bits.")


class Theory(WireModel):
    """docs/theory.md §4 next to what was measured, over the scored heads (docs/theory.md §3)."""

    epsilon: float
    target: int | None
    num_heads_scored: int = Field(description="(token, layer, head) with ≥ 2 candidates and candidate mass.")
    lambda_star_median: float | None = Field(description="Candidate-mass-weighted median of λ*(ε) over heads with δ > 0.")
    lambda_star_p90: float | None
    rho_star_median: float | None = Field(description="λ*/(1+λ*) of the median.")
    rho_star_p90: float | None
    wrong_block_share: float | None = Field(description="Candidate-mass share of (token, layer, head) with δ ≤ 0.")
    target_not_top: bool | None = Field(description="The requested target is not the top candidate block.")
    fidelity_measured: float | None = Field(
        description="Scored-heads pointer fidelity F_S (docs/theory.md §3): the aggregate `fidelity_bound` "
                    "belongs to (not the all-heads `pointer_fidelity`).")
    fidelity_predicted: float | None = Field(description="Exact fidelity from the block margins (docs/theory.md §4).")
    fidelity_bound: float | None = Field(description="Candidate-mass-weighted lower bound on the scored-heads "
                                         "pointer fidelity `fidelity_measured`.")
    fidelity_max_abs_error: float | None = Field(description="Largest |measured − exact fidelity| over the scored "
                                                 "heads (float32 rounding when the engine computes docs/theory.md §2).")
    bound_held_fidelity: float | None = Field(description="Fraction of scored heads where the bound held (1.0).")
    entropy_measured_nats: float | None = Field(description="Scored heads' mean candidate-part entropy H(q) + Σ q H(w): "
                                                "the value `entropy_bound_nats` bounds (not the total entropy H(a)).")
    entropy_bound_nats: float | None = Field(description="Mean upper bound on candidate-part entropy.")
    bound_held_entropy: float | None


class TokenMetrics(WireModel):
    """One generated token (audit level per_token / per_layer)."""

    index: int
    token_id: int
    text: str
    attribution: list[float] = Field(description="π over blocks, mean over layers and heads.")
    sink_mass: float
    candidate_mass: float
    entropy_nats: float
    entropy_bits: float
    block_entropy_nats: float
    block_entropy_bits: float
    pointer_fidelity: float | None = Field(description="All-heads pointer fidelity of this token.")
    layers: list[list[list[float]]] | None = Field(None, description="per_layer: π per layer and head, [L][H][G].")
    layer_attribution: list[list[float]] | None = Field(None, description="per_layer: π per layer, [L][G].")
    layer_sink_mass: list[float] | None = None
    layer_entropy_nats: list[float] | None = None
    head_entropy_nats: list[list[float]] | None = None
    layer_block_entropy_nats: list[float] | None = None
    head_block_entropy_nats: list[list[float]] | None = None
    layer_pointer_fidelity: list[float | None] | None = None
    head_pointer_fidelity: list[list[float | None]] | None = None


class ChoiceMetrics(WireModel):
    """Metrics of one generated choice (docs/theory.md §3, §4)."""

    index: int = Field(description="The choice's index.")
    num_tokens: int
    num_layers: int
    num_heads: int
    target_block: int | None
    target_source: Literal["request", "top_candidate"] | None
    attribution: list[float] | None = Field(description="Response-level π over blocks (mean over generated tokens).")
    sink_mass: float | None
    candidate_mass: float | None
    entropy: Entropy
    pointer_fidelity: float | None = Field(
        description="All-heads pointer fidelity F_all (docs/theory.md §3): the target's share of all candidate "
                    "mass. No bound applies to it; `theory.fidelity_measured` is the value beside the bound.")
    theory: Theory
    tokens: list[TokenMetrics] | None = Field(None, description="With `audit` = per_token or per_layer.")


class LocalistResult(WireModel):
    audit_id: str
    audit: AuditLevel
    locality: Dial
    blocks: list[BlockInfo]
    choices: list[ChoiceMetrics] = Field(description="One entry per generated choice, by index.")
    rules: list[RuleUse] | None = added_later("The injected rule versions (`rules` of the request).")
    anchors: list[AnchorCheck] | None = added_later("Anchor probes of the rulebooks used (made when each version "
                                                    "was created) and, with `anchors: check`, of this request's "
                                                    "blocks.")
    warnings: list[str] | None = added_later("E.g. an anchor that is not separable.")


class TokenAttribution(WireModel):
    """Per-token attribution in a streaming chunk."""

    index: int = Field(description="Position of the token in the choice's output.")
    token_id: int
    attribution: list[float] = Field(description="π over blocks, mean over layers and heads.")
    pointer_fidelity: float | None = Field(description="All-heads pointer fidelity against the request's "
                                           "`target_block`; null without one (the default target is known only "
                                           "at the end).")


class LocalistDelta(WireModel):
    tokens: list[TokenAttribution]
