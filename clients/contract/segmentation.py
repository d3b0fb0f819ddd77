"""Block recruitment for unmarked text (``blocks: "auto"``, docs/theory.md §6): what a request asks and
what its record keeps.

A request that sends ``blocks: "auto"`` and no blocks has each message (the prompt, for completions)
start as one block; the server splits them greedily at sentence or paragraph ends, accepting a split
only when the prompt's NLL in nats under the served weights at the dial ``rho`` drops by more than the
split's cost ln(#candidate points) + ln B' (+ ``extra_cost``). Every round's decision is stored in the
record, inside the hash chain.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import RequestModel, WireModel

Unit = Literal["sentence", "paragraph"]


class SegmentationSpec(RequestModel):
    """How ``blocks: "auto"`` segments (every field has a default)."""

    rho: float = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False,
                       description="The dial ρ_seg at which gains are measured; > 0, since at ρ = 0 the layout does "
                       "not change attention and every gain is exactly 0.")
    unit: Unit = Field("sentence", description="Candidate split points: `sentence` = after a sentence end (. ? ! ;) "
                       "or a line break; `paragraph` = after a line break only.")
    extra_cost: float = Field(0.0, ge=0.0, le=1e6, allow_inf_nan=False,
                              description="Nats added to every split's cost (a stricter test).")
    max_splits: int = Field(16, ge=1, le=62, description="At most this many accepted splits.")


class SplitDecision(WireModel):
    """One greedy round: the best split point found, its exact gain and its cost, in nats."""

    block: str = Field(description="Label of the block the split cuts (the new block is `label.N`).")
    at: int = Field(description="Prompt token position where the new block would start.")
    candidates: int = Field(description="Split points this round; the cost pays ln of this number.")
    scored: int = Field(description="Points whose exact gain was computed (the others were ranked out by the "
                        "window proxy).")
    gain_nats: float = Field(description="NLL(before) − NLL(after) of the prompt, exact.")
    cost_nats: float = Field(description="ln(candidates) + ln(blocks after the split) + extra_cost.")
    accepted: bool = Field(description="gain_nats > cost_nats.")


class Segmentation(WireModel):
    """What ``blocks: "auto"`` did to a request, as stored in its record."""

    rho: float
    unit: Unit
    extra_cost: float
    scorer: str = Field(description="What computed the gains: the reference localist model (model/reference.py) "
                        "on the served weights, float32.")
    weights_hash: str = Field(description="SHA-256 of the weight files the scorer loaded (the served ones).")
    shortlist: int | None = Field(description="Points scored exactly per round when there are more (ranked by the "
                                  "window proxy); null: every point.")
    window: int = Field(description="Tokens either side of a point in the window proxy.")
    blocks_before: int
    blocks_after: int
    decisions: list[SplitDecision]
    seconds: float = Field(description="Wall time of the search.")
    sequences: int = Field(description="Sequences run through the scorer (proxy windows included).")
