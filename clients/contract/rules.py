"""Rules and rulebooks: tenant-scoped, immutably versioned texts a request injects by reference, and the
anchor probe that says whether a block's anchor header singles it out under the served model.

A **rule** has a label, a text and an optional anchor header (default ``[label]``); a **rulebook** is
a named set of pinned rule versions. Both share one label space per tenant and both are versioned:
posting an existing label makes its next version, and a reference names a label (its latest
version) or ``label@version``. A request's ``rules: ["KYC-2", "lending@3"]`` places each rule as a
``rule`` block labelled ``label@version`` whose text starts with its anchor header.

An **anchor probe** (docs/theory.md §1) places a short query naming the anchor after the blocks and
reads, at the query's last token, the candidate block distribution q (the response attribution,
mean over layers and heads, restricted to the candidate blocks and renormalised). Singling out one
of B blocks takes ln B nats; the anchor carries ln B − H(q). It is *not separable* when its own block
is not q's top block, or when the top block beats the next by less than ln 2 nats (a factor of 2).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import RequestModel, WireModel

RuleKind = Literal["rule", "rulebook"]
LABEL_PATTERN = r"^[^@\s/]+$"  # `@` separates the version in a reference; `/` would break the URL path


class RuleCreate(RequestModel):
    """A new rule, a new rulebook, or the next version of either (same label). Give `text` for a rule or
    `rules` for a rulebook."""

    label: str = Field(min_length=1, max_length=120, pattern=LABEL_PATTERN,
                       description="Name of the rule or rulebook, unique per tenant (no `@`, `/` or spaces).")
    text: str | None = Field(None, min_length=1, max_length=65536, description="A rule's text.")
    anchor: str | None = Field(None, min_length=1, max_length=256,
                               description="A rule's anchor header, placed first in its block (default `[label]`).")
    rules: list[str] | None = Field(None, min_length=1, max_length=64,
                                    description="A rulebook's rules: `label` (its latest version, pinned now) "
                                    "or `label@version`.")


class AnchorProbe(WireModel):
    """One anchor probed among the blocks (docs/theory.md §1)."""

    block: str = Field(description="Label of the anchor's own block.")
    anchor: str
    separable: bool = Field(description="Its own block is q's top block and leads the next by ≥ ln 2 nats.")
    information_nats: float = Field(description="ln B − H(q): what the anchor tells about which block is meant.")
    needed_nats: float = Field(description="ln B: what singling out one of B blocks takes.")
    entropy_nats: float = Field(description="H(q) of the candidate block distribution at the query's last token.")
    own_share: float = Field(description="q of the anchor's own block.")
    top_block: str = Field(description="Label of q's top block.")
    margin_nats: float | None = Field(description="ln(q_top / q_next); null with a single block.")


class AnchorCheck(WireModel):
    """The anchors of a set of blocks, each probed under one model."""

    source: str = Field(description="`request` (the request's own blocks) or the rulebook version, e.g. `lending@3`.")
    model: str
    weights_sha256: str
    rho: float = Field(description="The dial the probes ran at.")
    query: str = Field(description="The probe query placed after the blocks; `{anchor}` is the anchor.")
    num_blocks: int = Field(description="B: the candidate blocks.")
    anchors: list[AnchorProbe]


class RuleMember(WireModel):
    """A rule version pinned by a rulebook version."""

    rule_id: str
    label: str
    version: int
    sha256: str


class RuleVersion(WireModel):
    version: int
    ref: str = Field(description="`label@version`, as a request names it.")
    created_us: int = Field(description="Unix microseconds.")
    created_by: str | None = Field(description="Key id that created it (null in local dev mode).")
    sha256: str = Field(description="Rule: SHA-256 of the block text as injected (anchor header, newline, text). "
                        "Rulebook: SHA-256 of its members' canonical JSON.")
    text: str | None = Field(description="A rule's text.")
    anchor: str | None = Field(description="A rule's anchor header.")
    members: list[RuleMember] | None = Field(description="A rulebook's pinned rule versions.")
    anchors: AnchorCheck | None = Field(description="A rulebook's anchor probe, made when the version was created.")


class Rule(WireModel):
    """A rule or rulebook with every version (versions never change; retiring keeps them readable)."""

    id: str
    label: str
    kind: RuleKind
    created_us: int
    created_by: str | None = Field(description="Key id that created the first version.")
    retired_us: int | None
    retired_by: str | None = Field(description="Key id that retired it.")
    active: bool = Field(description="Not retired: requests may use it.")
    latest: int = Field(description="The newest version.")
    versions: list[RuleVersion]


class RuleList(WireModel):
    object: Literal["list"] = "list"
    data: list[Rule]


class RuleUse(WireModel):
    """A rule version a request injected."""

    block: str = Field(description="Label of its block (`label@version`): attribution names it.")
    rule_id: str
    label: str
    version: int
    sha256: str = Field(description="SHA-256 of the injected block text.")
    anchor: str
    rulebook: str | None = Field(description="The rulebook version it came through (`lending@3`), if any.")


class InjectedRule(RuleUse):
    """A rule use as the audit record keeps it: with the text it was answered with."""

    text: str
