"""Rules at serving time: the rulebook API, a request's ``rules`` resolved to blocks, and anchor probes.

A rule version is injected as a ``rule`` block labelled ``label@version`` whose text is its anchor
header, a newline and its text (``store.rules.injected_text``); the SHA-256 of that text is what the
audit record keeps beside the rule's id and version (and the text itself, so a past record's report
still shows it after the rule was edited or retired).

An anchor probe (docs/theory.md §1) asks whether a block's anchor singles it out under the served
model: the blocks are placed, then the query :data:`PROBE_QUERY` naming the anchor, and one token
is generated. At the query's last token (the one that produces that token) the candidate block
distribution q is the response attribution of ``model.metrics`` — π averaged over layers and heads,
exactly as a response's is — restricted to the candidate blocks and renormalised. The anchor carries
ln B − H(q) nats of the ln B needed to name one of B blocks; it is separable when its own block is
q's top block and leads the next one by at least ln 2 nats (twice its share). One engine request
per anchor, run concurrently; a rulebook is probed once, when its version is created.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import torch

from localist.clients import contract as C
from localist.model.attention import BlockStats
from localist.model.blocks import BlockTable
from localist.model.metrics import metrics_for_table, response_layout
from localist.server import planning
from localist.server.attention_stats import ChoiceStats
from localist.server.auth import Principal
from localist.server.exceptions import InvalidRequest
from localist.server.planning import Plan
from localist.server.store import NotFound
from localist.server.store.rules import StoredRule, StoredVersion, injected_text

LN2 = math.log(2.0)
DEFAULT_ANCHOR = "[{label}]"
PROBE_QUERY = "Apply {anchor}"
MIN_SHARE = 1e-30  # q is clamped here before a log, so a block with no mass gives a finite margin


def parse_ref(ref: str, where: str) -> tuple[str, int | None]:
    """``label`` or ``label@version`` → (label, version or None for the latest)."""
    label, at, version = ref.partition("@")
    if not label or (at and not (version.isdigit() and int(version) >= 1)):
        raise InvalidRequest(where, f"{ref!r} is not a rule reference: `label` or `label@version` (version ≥ 1)")
    return label, int(version) if at else None


# --------------------------------------------------------------------------- anchor probes


@dataclass(frozen=True)
class ProbeBlock:
    """A placed block whose anchor is probed."""

    label: str
    anchor: str
    text: str  # as placed (a rule's starts with its anchor)
    kind: str = "rule"
    evidence: bool = False


def anchor_probe(stats: BlockStats, table: BlockTable, label: str, anchor: str) -> C.AnchorProbe:
    """The probe of one anchor from the statistics of the token generated after the query (see module)."""
    m = metrics_for_table(stats, table)
    candidates = response_layout(table, 1)[0][0]
    ids = [b.id for b in table.blocks if bool(candidates[b.id])]
    mass = m.attribution[ids].double()
    total = float(mass.sum())
    q = mass / total if total > 0 else torch.full_like(mass, 1.0 / len(ids))  # no candidate mass: no information
    entropy = float(-torch.special.xlogy(q, q).sum())
    order = torch.argsort(q, descending=True).tolist()
    own = ids.index(table.index(label))
    margin = (math.log(max(float(q[order[0]]), MIN_SHARE) / max(float(q[order[1]]), MIN_SHARE))
              if len(ids) > 1 else None)
    return C.AnchorProbe(
        block=label, anchor=anchor, information_nats=math.log(len(ids)) - entropy, needed_nats=math.log(len(ids)),
        entropy_nats=entropy, own_share=float(q[own]), top_block=table.blocks[ids[order[0]]].label,
        margin_nats=margin, separable=order[0] == own and (margin is None or margin >= LN2))


def warnings(checks: list[C.AnchorCheck], weights_sha256: str) -> list[str]:
    """What a request using these probes is told: every anchor that is not separable, and probes made
    under other weights than the served ones."""
    out = []
    for check in checks:
        if check.weights_sha256 != weights_sha256:
            out.append(f"the anchors of {check.source} were probed under other weights ({check.model}, "
                       f"{check.weights_sha256[:12]}…) than the served model's")
        for a in check.anchors:
            if not a.separable:
                why = (f"its block is not the top block ({a.top_block} is)" if a.top_block != a.block
                       else f"its margin {a.margin_nats:.3f} nats is under ln 2")
                out.append(f"anchor {a.anchor!r} of block {a.block} ({check.source}) is not separable: {why}; "
                           f"it carries {a.information_nats:.3f} of the {a.needed_nats:.3f} nats needed")
    return out


# --------------------------------------------------------------------------- the service


@dataclass
class Injection:
    """A request's ``rules`` resolved: the blocks to place, what the record keeps, the stored probes."""

    blocks: list[C.BlockSpec] = field(default_factory=list)
    uses: list[C.InjectedRule] = field(default_factory=list)
    checks: list[C.AnchorCheck] = field(default_factory=list)


def _version_wire(rule: StoredRule, v: StoredVersion) -> C.RuleVersion:
    ref = f"{rule.label}@{v.version}"
    return C.RuleVersion(
        version=v.version, ref=ref, created_us=v.created_us, created_by=v.created_by, sha256=v.sha256, text=v.text,
        anchor=v.anchor, members=None if v.members is None else [C.RuleMember(**m) for m in v.members],
        anchors=None if v.probe is None else C.AnchorCheck(source=ref, **v.probe))


def rule_wire(rule: StoredRule) -> C.Rule:
    return C.Rule(id=rule.rule_id, label=rule.label, kind=rule.kind, created_us=rule.created_us,
                  created_by=rule.created_by, retired_us=rule.retired_us, retired_by=rule.retired_by,
                  active=rule.retired_us is None, latest=rule.latest.version,
                  versions=[_version_wire(rule, v) for v in rule.versions])


class RuleService:
    """The rulebook API and rule injection over the audit store, probing with the generation service's
    engine."""

    def __init__(self, store, generation):
        self.store, self.generation = store, generation

    # -- the API ----------------------------------------------------------------------------------

    async def _find(self, tenant: str, ref: str, where: str) -> tuple[StoredRule, StoredVersion]:
        """The rule version a reference names; another tenant's label is unknown here, exactly."""
        label, number = parse_ref(ref, where)
        rule = await self.store.aget_rule(tenant=tenant, label=label)
        if rule is None:
            raise NotFound(f"{where}: no rule or rulebook {label!r}", where)
        version = rule.latest if number is None else rule.version(number)
        if version is None:
            raise NotFound(f"{where}: {label!r} has no version {number} (the latest is {rule.latest.version})", where)
        return rule, version

    async def create(self, body: C.RuleCreate, who: Principal) -> C.Rule:
        """A rule's or rulebook's next version; a rulebook's anchors are probed first (under the served
        model) and stored with it."""
        if (body.text is None) == (body.rules is None):
            raise InvalidRequest("text", "give `text` (a rule) or `rules` (a rulebook), exactly one")
        common = {"tenant": who.tenant, "label": body.label, "key_id": who.key_id, "actor": who.actor}
        if body.text is not None:
            anchor = body.anchor or DEFAULT_ANCHOR.format(label=body.label)
            stored = await self.store.acreate_rule_version(text=body.text, anchor=anchor, **common)
            return rule_wire(stored)
        if body.anchor is not None:
            raise InvalidRequest("anchor", "a rulebook has no anchor of its own: each of its rules has one")
        members, blocks, seen = [], [], {}
        for i, ref in enumerate(body.rules):
            where = f"rules[{i}]"
            rule, version = await self._find(who.tenant, ref, where)
            if rule.kind != "rule":
                raise InvalidRequest(where, f"{rule.label!r} is a rulebook: a rulebook holds rules only")
            if rule.retired_us is not None:
                raise InvalidRequest(where, f"rule {rule.label!r} was retired", "rule_retired")
            if rule.label in seen:
                raise InvalidRequest(where, f"rule {rule.label!r} is already in this rulebook ({seen[rule.label]})")
            seen[rule.label] = where
            members.append({"rule_id": rule.rule_id, "label": rule.label, "version": version.version,
                            "sha256": version.sha256})
            blocks.append(ProbeBlock(f"{rule.label}@{version.version}", version.anchor,
                                     injected_text(version.anchor, version.text)))
        room = self.generation.max_blocks - 3  # the probe's table also holds the sink, the query and the response
        if len(blocks) > room:
            raise InvalidRequest("rules", f"{len(blocks)} rules: a rulebook this server can probe holds at most {room}")
        probe = (await self.probe(blocks, source="")).model_dump(mode="json", exclude={"source"})
        stored = await self.store.acreate_rule_version(members=members, probe=probe, **common)
        return rule_wire(stored)

    async def list_rules(self, who: Principal, include_retired: bool) -> C.RuleList:
        rules = await self.store.alist_rules(tenant=who.tenant, include_retired=include_retired)
        return C.RuleList(data=[rule_wire(r) for r in rules])

    async def get(self, label: str, who: Principal) -> C.Rule:
        rule = await self.store.aget_rule(tenant=who.tenant, label=label)
        if rule is None:
            raise NotFound(f"rule {label!r} not found", "label")
        return rule_wire(rule)

    async def retire(self, label: str, who: Principal) -> C.Rule:
        return rule_wire(await self.store.aretire_rule(tenant=who.tenant, label=label, key_id=who.key_id,
                                                       actor=who.actor))

    # -- injection --------------------------------------------------------------------------------

    async def _members(self, tenant: str, rule: StoredRule, version: StoredVersion, where: str
                       ) -> list[tuple[StoredRule, StoredVersion]]:
        """The rule versions a reference brings: itself, or a rulebook version's pinned rules."""
        if rule.kind == "rule":
            return [(rule, version)]
        out = []
        for m in version.members:
            member = await self.store.aget_rule(tenant=tenant, label=m["label"])
            if member.retired_us is not None:
                raise InvalidRequest(where, f"rulebook {rule.label}@{version.version} holds {m['label']}@"
                                     f"{m['version']}, and rule {m['label']!r} was retired", "rule_retired")
            out.append((member, member.version(m["version"])))
        return out

    async def resolve(self, req: C.ChatCompletionRequest | C.CompletionRequest, tenant: str) -> Injection:
        """The request's ``rules`` as blocks, record entries and stored probes; 404 naming ``rules[i]`` for
        a reference the tenant does not have, 400 for a retired rule or a block label used twice."""
        injection = Injection()
        placed: dict[str, str] = {b.label: f"blocks[{j}]" for j, b in enumerate(req.block_specs())}
        for i, ref in enumerate(req.rules or []):
            where = f"rules[{i}]"
            rule, version = await self._find(tenant, ref, where)
            if rule.retired_us is not None:
                raise InvalidRequest(where, f"{rule.kind} {rule.label!r} was retired", "rule_retired")
            via = f"{rule.label}@{version.version}" if rule.kind == "rulebook" else None
            if version.probe is not None:
                injection.checks.append(C.AnchorCheck(source=via, **version.probe))
            for member, v in await self._members(tenant, rule, version, where):
                label = f"{member.label}@{v.version}"
                if label in placed:
                    raise InvalidRequest(where, f"block {label} is already placed by {placed[label]}")
                placed[label] = where
                text = injected_text(v.anchor, v.text)
                injection.blocks.append(C.BlockSpec(label=label, kind="rule", text=text))
                injection.uses.append(C.InjectedRule(block=label, rule_id=member.rule_id, label=member.label,
                                                     version=v.version, sha256=v.sha256, anchor=v.anchor,
                                                     rulebook=via, text=v.text))
        return injection

    async def plan(self, req: C.ChatCompletionRequest | C.CompletionRequest, endpoint: str, who: Principal) -> Plan:
        """The generation service's plan with the request's rules placed first, the probes it carries
        (and, with ``anchors: check``, a probe of its placed candidate blocks) and their warnings."""
        injection = await self.resolve(req, who.tenant) if req.rules else Injection()
        plan = await self.generation.plan(req, endpoint, injection.blocks)
        plan.rules, plan.anchors = injection.uses, injection.checks
        if req.anchors == "check":
            blocks = [ProbeBlock(b.label, use.anchor, b.text) for b, use in zip(injection.blocks, injection.uses)]
            blocks += [ProbeBlock(b.label, DEFAULT_ANCHOR.format(label=b.label), b.text, b.kind, b.evidence)
                       for b in req.block_specs()
                       if b.text is not None and not b.pinned and (b.evidence or b.kind in ("rule", "document"))]
            if not blocks:
                raise InvalidRequest("anchors", "no placed candidate block (an injected rule, or a text block of "
                                     "kind rule/document or marked evidence) to probe")
            plan.anchors.append(await self.probe(blocks, source="request"))
        plan.warnings = warnings(plan.anchors, self.generation.engine.weights_sha256)
        return plan

    # -- probing ----------------------------------------------------------------------------------

    async def probe(self, blocks: list[ProbeBlock], source: str) -> C.AnchorCheck:
        """Every block's anchor probed among ``blocks`` under the served model (one engine request each)."""
        engine = self.generation.engine
        engine.ensure_serving()
        probes = await asyncio.gather(*(self._probe_one(blocks, k) for k in range(len(blocks))))
        return C.AnchorCheck(source=source, model=engine.name, weights_sha256=engine.weights_sha256,
                             rho=self.generation.default_rho, query=PROBE_QUERY, num_blocks=len(blocks),
                             anchors=list(probes))

    async def _probe_one(self, blocks: list[ProbeBlock], k: int) -> C.AnchorProbe:
        engine, own = self.generation.engine, blocks[k]
        req = C.CompletionRequest(
            model=engine.name, prompt=PROBE_QUERY.format(anchor=own.anchor), max_tokens=1, temperature=0.0,
            blocks=[C.BlockSpec(label=b.label, kind=b.kind, evidence=b.evidence, text=b.text + "\n") for b in blocks])
        plan = planning.plan(engine, req, "completions", self.generation.default_rho, self.generation.max_blocks)
        choice = plan.choices[0]
        stats = ChoiceStats(choice.engine_id)
        try:
            async for _ in engine.generate(plan.prompt_token_ids, choice, plan.cache_salt):
                pass
        finally:
            await stats.release(engine)
        return await asyncio.to_thread(anchor_probe, stats.tokens(0, 1), plan.table, own.label, own.anchor)
