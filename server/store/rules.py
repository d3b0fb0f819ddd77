"""Rules and rulebooks of a tenant: immutable versions, retirement, and a chained record of each action.

A label names a rule or a rulebook (one label space per tenant, so a reference is never ambiguous).
Creating a version and retiring a label each append a ``rule`` record to the chain pinning what was
done, by whom (the key id) and the version's SHA-256; versions are inserted once and never updated,
so what a past request was answered with stays readable after an edit or a retirement, and
verification (:func:`check_rules`) names a version or retirement edited, added or deleted behind the
store's back.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .chain import append, lock_head, now_us
from .records import MAX_TENANT, Entry, NotFound, RecordError, canonical, check_str, make_entry, sha256_hex
from .schema import rule_versions, rules

KINDS = ("rule", "rulebook")


def injected_text(anchor: str, text: str) -> str:
    """The text of a rule's block as a request places it: its anchor header first."""
    return f"{anchor}\n{text}"


def version_sha256(text: str | None, anchor: str | None, members: list[dict] | None) -> str:
    """A rule version's SHA-256 (of its block text as injected) or a rulebook version's (of its members'
    canonical JSON)."""
    return sha256_hex(injected_text(anchor, text).encode() if members is None else canonical(members))


@dataclass(frozen=True)
class StoredVersion:
    version: int
    created_us: int
    created_by: str | None
    sha256: str
    text: str | None
    anchor: str | None
    members: list[dict[str, Any]] | None  # a rulebook's pinned rule versions
    probe: dict[str, Any] | None  # a rulebook's anchor probe


@dataclass(frozen=True)
class StoredRule:
    rule_id: str
    tenant: str
    label: str
    kind: str
    created_us: int
    created_by: str | None
    retired_us: int | None
    retired_by: str | None
    versions: tuple[StoredVersion, ...]  # oldest first

    @property
    def latest(self) -> StoredVersion:
        return self.versions[-1]

    def version(self, number: int) -> StoredVersion | None:
        return next((v for v in self.versions if v.version == number), None)


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _version(row) -> StoredVersion:
    return StoredVersion(row.version, row.created_us, row.created_by, row.sha256, row.text, row.anchor,
                         None if row.members is None else orjson.loads(row.members),
                         None if row.probe is None else orjson.loads(row.probe))


def _load(conn: Connection, rows) -> list[StoredRule]:
    rows = list(rows)
    if not rows:
        return []
    versions: dict[str, list[StoredVersion]] = {}
    for v in conn.execute(sa.select(rule_versions).where(rule_versions.c.rule_id.in_([r.rule_id for r in rows]))
                          .order_by(rule_versions.c.rule_id, rule_versions.c.version)):
        versions.setdefault(v.rule_id, []).append(_version(v))
    return [StoredRule(r.rule_id, r.tenant, r.label, r.kind, r.created_us, r.created_by, r.retired_us, r.retired_by,
                       tuple(versions.get(r.rule_id, ()))) for r in rows]


def _event(action: str, rule: StoredRule, version: StoredVersion | None, actor: str | None) -> Entry:
    """The chained record of a rule action: the label, the kind, the retirement, and (for a version) its
    hash, author and time."""
    suffix = f"v{version.version}" if version is not None else "retired"
    payload = {"action": action,
               "rule": {"id": rule.rule_id, "label": rule.label, "kind": rule.kind, "retired_us": rule.retired_us,
                        "retired_by": rule.retired_by},
               "version": None if version is None else {"version": version.version, "sha256": version.sha256,
                                                        "created_by": version.created_by,
                                                        "created_us": version.created_us},
               "actor": actor}
    return make_entry(f"rule-{rule.rule_id}-{suffix}", "rule", rule.tenant, payload)


def get_rule(conn: Connection, *, tenant: str, label: str) -> StoredRule | None:
    """The tenant's rule or rulebook with this label (None when another tenant's or unknown)."""
    found = _load(conn, conn.execute(sa.select(rules).where(rules.c.tenant == tenant, rules.c.label == label)))
    return found[0] if found else None


def list_rules(conn: Connection, *, tenant: str, include_retired: bool) -> list[StoredRule]:
    q = sa.select(rules).where(rules.c.tenant == check_str(tenant, "tenant", MAX_TENANT)).order_by(rules.c.label)
    if not include_retired:
        q = q.where(rules.c.retired_us.is_(None))
    return _load(conn, conn.execute(q))


def create_version(conn: Connection, *, tenant: str, label: str, text: str | None = None, anchor: str | None = None,
                   members: list[dict] | None = None, probe: dict | None = None, key_id: str | None,
                   actor: str | None) -> StoredRule:
    """The label's next version (its first creates it): a rule (``text`` and ``anchor``) or a rulebook
    (``members``, ``probe``). Versions are numbered under the append lock, so two writers never take
    the same number. A retired label takes no new version; a label keeps its kind."""
    check_str(tenant, "tenant", MAX_TENANT)
    check_str(label, "label", 128)
    kind = "rule" if members is None else "rulebook"
    if kind == "rule":
        check_str(text, "text", 1 << 20)
        check_str(anchor, "anchor", 256)
    sha256 = version_sha256(text, anchor, members)
    lock_head(conn)
    row = conn.execute(sa.select(rules).where(rules.c.tenant == tenant, rules.c.label == label)).first()
    created = now_us()
    if row is None:
        rule_id = secrets.token_hex(8)
        conn.execute(sa.insert(rules).values(rule_id=rule_id, tenant=tenant, label=label, kind=kind, created_us=created,
                                             created_by=key_id))
        number = 1
    else:
        if row.retired_us is not None:
            raise RecordError(f"label: {label!r} was retired; its versions stay readable but it takes no new one")
        if row.kind != kind:
            raise RecordError(f"{'text' if kind == 'rule' else 'rules'}: {label!r} is a {row.kind}, "
                              f"so its next version must be one too")
        rule_id = row.rule_id
        number = conn.execute(sa.select(sa.func.max(rule_versions.c.version))
                              .where(rule_versions.c.rule_id == rule_id)).scalar_one() + 1
    conn.execute(sa.insert(rule_versions).values(
        rule_id=rule_id, version=number, created_us=created, created_by=key_id, sha256=sha256, text=text,
        anchor=anchor, members=_json(members), probe=_json(probe)))
    rule = get_rule(conn, tenant=tenant, label=label)
    append(conn, [_event("create", rule, rule.latest, actor)])
    return rule


def retire(conn: Connection, *, tenant: str, label: str, key_id: str | None, actor: str | None) -> StoredRule:
    """Retire a label (idempotent: retiring it again changes nothing and appends no record)."""
    lock_head(conn)
    rule = get_rule(conn, tenant=tenant, label=label)
    if rule is None:
        raise NotFound(f"rule {label!r} not found", "label")
    if rule.retired_us is not None:
        return rule
    conn.execute(sa.update(rules).where(rules.c.rule_id == rule.rule_id).values(retired_us=now_us(), retired_by=key_id))
    rule = get_rule(conn, tenant=tenant, label=label)
    append(conn, [_event("retire", rule, None, actor)])
    return rule


def check_rules(conn: Connection, events: list[tuple[int, str, dict]], unknown_seq: int) -> list:
    """The rule tables must be exactly what the chained rule records say (``events``: seq, record id and
    payload of each, in chain order): every version's content still hashes to its SHA-256 and matches
    its record, every retirement has one, and nothing was added or deleted. Returns the problems as
    (seq, record id or None, reason)."""
    versions: dict[tuple[str, int], tuple[int, str, dict]] = {}
    latest: dict[str, tuple[int, str, dict]] = {}
    for seq, rid, event in events:
        latest[event["rule"]["id"]] = (seq, rid, event["rule"])
        if event["version"] is not None:
            versions[(event["rule"]["id"], event["version"]["version"])] = (seq, rid, event["version"])
    issues = []
    for row in conn.execute(sa.select(rule_versions)):
        key = (row.rule_id, row.version)
        if key not in versions:
            issues.append((unknown_seq, None, f"rule {row.rule_id} version {row.version} has no audit record: it was "
                           "added behind the store's back"))
            continue
        seq, rid, recorded = versions.pop(key)
        v = _version(row)
        content = version_sha256(v.text, v.anchor, v.members)
        differ = [k for k in ("sha256", "created_by", "created_us") if recorded[k] != getattr(v, k)]
        if content != v.sha256:
            differ.append("content")
        if differ:
            issues.append((seq, rid, f"rule {row.rule_id} version {row.version}: {', '.join(differ)} differ from "
                           "its audit record"))
    for (rule_id, number), (seq, rid, _) in versions.items():
        issues.append((seq, rid, f"rule {rule_id} version {number} was deleted from the rule tables"))
    for row in conn.execute(sa.select(rules)):
        if row.rule_id not in latest:
            issues.append((unknown_seq, None, f"rule {row.rule_id} has no audit record: it was added behind the "
                           "store's back"))
            continue
        seq, rid, recorded = latest.pop(row.rule_id)
        differ = [k for k in ("label", "kind", "retired_us", "retired_by") if recorded[k] != getattr(row, k)]
        if differ:
            issues.append((seq, rid, f"rule {row.rule_id}: {', '.join(differ)} differ from its audit records"))
    for rule_id, (seq, rid, _) in latest.items():
        issues.append((seq, rid, f"rule {rule_id} was deleted from the rule tables"))
    return issues
