"""Versioned rules and rulebooks (issue 21): the store on SQLite and a real PostgreSQL, and the server
(conftest's session server on the tiny model): versions and retirement with their authors, tenant
walls, injection as `label@version` rule blocks named in attribution and kept in the hash chain,
a rule edit leaving old records and their reports intact, anchor probes stored and warned about."""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import uuid

import httpx
import pytest

from localist.clients import AsyncClient, Client, NotFoundError
from localist.server.rules import LN2, PROBE_QUERY
from localist.server.store import ALL_TENANTS, AuditStore, RecordError

# --------------------------------------------------------------------------- the store, on both databases


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
        return
    from pg import fresh_database, postgres_server

    with postgres_server() as admin_url:
        yield fresh_database(admin_url)


def _rule(store, tenant, label, text, key_id):
    return store.create_rule_version(tenant=tenant, label=label, text=text, anchor=f"[{label}]", key_id=key_id,
                                     actor=f"key:{key_id}")


def test_store_versions_retirement_and_tenants(store_url):
    with AuditStore(store_url) as store:
        v1 = _rule(store, "acme", "KYC-2", "Verify identity.", "k1")
        v2 = _rule(store, "acme", "KYC-2", "Verify identity twice.", "k2")
        assert (v1.rule_id, [v.version for v in v2.versions]) == (v2.rule_id, [1, 2])
        assert [(v.created_by, v.text) for v in v2.versions] == [("k1", "Verify identity."), ("k2", "Verify identity twice.")]
        assert store.get_rule(tenant="globex", label="KYC-2") is None  # another tenant's label is not there
        other = _rule(store, "globex", "KYC-2", "Their own text.", "g1")
        assert other.rule_id != v1.rule_id and other.latest.version == 1
        with pytest.raises(RecordError, match="^rules: 'KYC-2' is a rule"):
            store.create_rule_version(tenant="acme", label="KYC-2", members=[], key_id="k1", actor="key:k1")
        retired = store.retire_rule(tenant="acme", label="KYC-2", key_id="k3", actor="key:k3")
        assert retired.retired_by == "k3" and retired.retired_us is not None
        assert store.retire_rule(tenant="acme", label="KYC-2", key_id="k4", actor="key:k4") == retired  # idempotent
        assert [v.text for v in store.get_rule(tenant="acme", label="KYC-2").versions] == [
            "Verify identity.", "Verify identity twice."]  # versions stay readable
        with pytest.raises(RecordError, match="^label: 'KYC-2' was retired"):
            _rule(store, "acme", "KYC-2", "again", "k1")
        assert [r.label for r in store.list_rules(tenant="acme")] == []
        assert [r.label for r in store.list_rules(tenant="acme", include_retired=True)] == ["KYC-2"]
        events = store.list_records(tenant=ALL_TENANTS, kind="rule").records
        assert sorted(e["id"].rsplit("-", 1)[1] for e in events) == ["retired", "v1", "v1", "v2"]
        assert v2.versions[1].sha256 == hashlib.sha256(b"[KYC-2]\nVerify identity twice.").hexdigest()
        assert store.verify().ok


@pytest.mark.parametrize("tamper, reason", [
    ("UPDATE rule_versions SET text = 'Skip identity checks.' WHERE version = 2", "version 2: content differ"),
    ("UPDATE rule_versions SET created_by = 'mallory' WHERE version = 1", "version 1: created_by differ"),
    ("UPDATE rules SET retired_us = NULL, retired_by = NULL", "retired_us, retired_by differ"),
    ("DELETE FROM rule_versions WHERE version = 2", "version 2 was deleted from the rule tables"),
    ("INSERT INTO rule_versions (rule_id, version, created_us, created_by, sha256, text, anchor) "
     "SELECT rule_id, 3, created_us, created_by, sha256, text, anchor FROM rule_versions WHERE version = 1",
     "version 3 has no audit record"),
])
def test_verification_names_rule_tables_edited_behind_the_stores_back(tmp_path, tamper, reason):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    with AuditStore(url) as store:
        _rule(store, "acme", "KYC-2", "Verify identity.", "k1")
        _rule(store, "acme", "KYC-2", "Verify identity twice.", "k1")
        store.retire_rule(tenant="acme", label="KYC-2", key_id="k1", actor="key:k1")
        assert store.verify().ok
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(tamper))
        engine.dispose()
        report = store.verify()
        assert not report.ok and reason in report.first_broken.reason, report.first_broken


# --------------------------------------------------------------------------- the probe's arithmetic


def _probe_table():
    from localist.model.blocks import BlockTable

    spans = [[0, 1, "sink", 1, 0, "sink"], [1, 3, "rule", 0, 0, "A@1"], [3, 5, "rule", 0, 0, "B@1"],
             [5, 6, "document", 0, 0, "C@1"], [6, 8, "text", 0, 0, "prompt"], [8, 8, "response", 0, 0, "response"]]
    return BlockTable.from_wire(spans, list(range(8)))


@pytest.mark.parametrize("heads, own, top, separable", [
    # π per head over (sink, A, B, C, prompt, response); the probe token is the query at the prompt's end
    ([[0.2, 0.5, 0.1, 0.1, 0.1, 0.0], [0.4, 0.3, 0.1, 0.1, 0.1, 0.0]], "A@1", "A@1", True),  # q_A/q_B = 4
    ([[0.2, 0.3, 0.2, 0.1, 0.2, 0.0], [0.2, 0.3, 0.2, 0.1, 0.2, 0.0]], "A@1", "A@1", False),  # ratio 1.5 < 2
    ([[0.2, 0.1, 0.5, 0.1, 0.1, 0.0], [0.2, 0.1, 0.5, 0.1, 0.1, 0.0]], "A@1", "B@1", False),  # another block on top
])
def test_anchor_probe_is_the_response_attribution_over_candidates(heads, own, top, separable):
    """q is π averaged over layers and heads (model.metrics' response attribution) restricted to the
    candidate blocks and renormalised; the figures follow from it."""
    import torch

    from localist.model.attention import BlockStats
    from localist.server.rules import anchor_probe

    mass = torch.tensor(heads, dtype=torch.float32).view(1, 1, 2, 6).expand(1, 3, 2, 6).clone()  # T=1, L=3, H=2
    probe = anchor_probe(BlockStats(mass.log(), mass, torch.zeros_like(mass)), _probe_table(), own, "[A]")
    pi = torch.tensor(heads, dtype=torch.float64).mean(0)[1:4]
    q = pi / pi.sum()
    H = float(-(q * q.log()).sum())
    ranked = sorted(q.tolist(), reverse=True)
    assert (probe.top_block, probe.separable) == (top, separable)
    assert probe.needed_nats == pytest.approx(math.log(3))
    assert probe.entropy_nats == pytest.approx(H, abs=1e-6)
    assert probe.information_nats == pytest.approx(math.log(3) - H, abs=1e-6)
    assert probe.own_share == pytest.approx(float(q[0]), abs=1e-6)
    assert probe.margin_nats == pytest.approx(math.log(ranked[0] / ranked[1]), abs=1e-6)


# --------------------------------------------------------------------------- the server


def _kid(token: str) -> str:
    return token.split("_")[1]


@pytest.fixture
def acme(localist_server):
    with Client(localist_server.base_url, localist_server.tenant_key) as client:
        yield client


@pytest.fixture
def admin(localist_server):
    with Client(localist_server.base_url, localist_server.admin_key) as client:
        yield client


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _post(server, key, path, body):
    return httpx.post(server.base_url + path, json=body, headers=server.headers(key), timeout=120)


def _chat(server, key, **fields):
    body = {"model": server.model, "messages": [{"role": "user", "content": "Which rule applies?"}],
            "max_tokens": 4, "temperature": 0.0, **fields}
    return _post(server, key, "/v1/chat/completions", body)


def _sha(anchor: str, text: str) -> str:
    return hashlib.sha256(f"{anchor}\n{text}".encode()).hexdigest()


def _verify(server) -> None:
    result = _post(server, server.admin_key, "/v1/audit/verify", None).json()
    assert result["ok"], result


def test_versions_authors_and_tenant_walls(localist_server, acme, admin):
    s, label = localist_server, _unique("KYC")
    first = acme.rules.create(label, "Verify the customer's identity.")
    assert (first.kind, first.latest, first.created_by, first.active) == ("rule", 1, _kid(s.tenant_key), True)
    assert first.versions[0].sha256 == _sha(f"[{label}]", "Verify the customer's identity.")
    second = admin.rules.create(_unique("ADM"), "An admin tenant's rule.")  # tenant admin's own label space
    assert second.latest == 1
    edited = acme.rules.create(label, "Verify identity with two documents.", anchor="[KYC two]")
    assert [(v.ref, v.anchor, v.created_by) for v in edited.versions] == [
        (f"{label}@1", f"[{label}]", _kid(s.tenant_key)), (f"{label}@2", "[KYC two]", _kid(s.tenant_key))]
    assert label in {r.label for r in acme.rules.list().data}

    # another tenant (even an admin key's) sees nothing, exactly as for a label that does not exist
    missing = _unique("NOPE")
    for path in (f"/v1/rules/{label}", f"/v1/rules/{missing}"):
        r = httpx.get(s.base_url + path, headers=s.headers(s.admin_key), timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "label"
    foreign, unknown = (_chat(s, s.admin_key, rules=[name]) for name in (label, missing))
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"] | {"message": None} == unknown.json()["error"] | {"message": None}
    assert foreign.json()["error"]["message"].replace(label, missing) == unknown.json()["error"]["message"]
    assert foreign.json()["error"]["param"] == "rules[0]"
    assert label not in {r.label for r in admin.rules.list(include_retired=True).data}
    with pytest.raises(NotFoundError):
        admin.rules.retire(label)
    assert acme.rules.get(label).active  # the foreign DELETE changed nothing

    # references and bodies that cannot be served name their field
    for ref, status in ((f"{label}@0", 400), (f"{label}@9", 404), ("@1", 400)):
        r = _chat(s, s.tenant_key, rules=[ref])
        assert (r.status_code, r.json()["error"]["param"]) == (status, "rules[0]"), r.text
    r = _chat(s, s.tenant_key, rules=[label], blocks=[{"label": f"{label}@2", "kind": "rule", "text": "clash"}])
    assert (r.status_code, r.json()["error"]["param"]) == (400, "rules[0]")
    for body, param in (({"label": "a@b", "text": "t"}, "label"), ({"label": "x", "text": "t", "rules": ["y"]}, "text"),
                        ({"label": "x"}, "text"), ({"label": _unique("BK"), "rules": [missing]}, "rules[0]")):
        r = _post(s, s.tenant_key, "/v1/rules", body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    _verify(s)


def test_injection_attribution_edit_and_retirement(localist_server, acme):
    s, label = localist_server, _unique("REFUND")
    old_text, new_text = "Refunds need a receipt.", "Refunds need a receipt and a signature."
    acme.rules.create(label, old_text, anchor="[Refund rule]")
    answer = _chat(s, s.tenant_key, rules=[label], audit="per_token")
    assert answer.status_code == 200, answer.text
    result = answer.json()["localist"]
    block = next(b for b in result["blocks"] if b["label"] == f"{label}@1")
    assert (block["kind"], block["candidate"]) == ("rule", True)
    user = next(b for b in result["blocks"] if b["kind"] == "user")
    assert block["id"] < user["id"]  # placed before the conversation
    use = result["rules"][0]
    assert (use["block"], use["label"], use["version"], use["rulebook"]) == (f"{label}@1", label, 1, None)
    assert use["sha256"] == _sha("[Refund rule]", old_text)
    attribution = result["choices"][0]["attribution"]
    assert len(attribution) == len(result["blocks"]) and attribution[block["id"]] > 0
    assert all(len(t["attribution"]) == len(result["blocks"]) for t in result["choices"][0]["tokens"])

    record_id = result["audit_id"]
    record = httpx.get(f"{s.base_url}/v1/audit/{record_id}", headers=s.headers(s.tenant_key), timeout=30).json()
    kept = record["request"]["rules"][0]
    assert (kept["text"], kept["anchor"], kept["sha256"], kept["rule_id"]) == (
        old_text, "[Refund rule]", use["sha256"], acme.rules.get(label).id)
    assert f"{label}@1" in record["blocks"]  # indexed: `GET /v1/audit?block=` finds it
    report = httpx.get(f"{s.base_url}/v1/audit/{record_id}/report?format=html", headers=s.headers(s.tenant_key),
                       timeout=30).text
    assert old_text in report

    # a replay runs the same prompt, so the same rule versions: its record names them too
    replay = _post(s, s.tenant_key, f"/v1/audit/{record_id}/replay", None).json()
    assert replay["matches"] and replay["localist"]["rules"] == result["rules"]

    # streamed and completions requests inject the same way; a token-id prompt cannot take rules
    with httpx.stream("POST", s.base_url + "/v1/chat/completions", headers=s.headers(s.tenant_key), timeout=120,
                      json={"model": s.model, "messages": [{"role": "user", "content": "Which rule?"}], "rules": [label],
                            "max_tokens": 3, "stream": True}) as streamed:
        events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = httpx.Response(200, content=events[-2]).json()["localist"]
    assert final["rules"] == [{k: v for k, v in u.items() if v is not None} for u in result["rules"]]  # nulls left out
    completion = _post(s, s.tenant_key, "/v1/completions",
                       {"model": s.model, "prompt": "Answer:", "rules": [label], "max_tokens": 2}).json()
    assert completion["localist"]["rules"] == result["rules"]
    assert completion["localist"]["blocks"][1]["label"] == f"{label}@1"  # before the prompt
    ids = _post(s, s.tenant_key, "/v1/completions", {"model": s.model, "prompt": [1, 2, 3], "rules": [label]})
    assert (ids.status_code, ids.json()["error"]["param"]) == (400, "rules")

    # an edit makes version 2; the record and its report are unchanged, and @1 stays usable
    acme.rules.create(label, new_text, anchor="[Refund rule]")
    again = httpx.get(f"{s.base_url}/v1/audit/{record_id}", headers=s.headers(s.tenant_key), timeout=30).json()
    assert again == record
    report_after = httpx.get(f"{s.base_url}/v1/audit/{record_id}/report?format=html",
                             headers=s.headers(s.tenant_key), timeout=30).text
    assert old_text in report_after and new_text not in report_after
    latest = _chat(s, s.tenant_key, rules=[label]).json()["localist"]["rules"][0]
    pinned = _chat(s, s.tenant_key, rules=[f"{label}@1"]).json()["localist"]["rules"][0]
    assert (latest["version"], latest["sha256"]) == (2, _sha("[Refund rule]", new_text))
    assert (pinned["version"], pinned["sha256"]) == (1, use["sha256"])
    _verify(s)

    # retiring: requests are refused, versions stay readable, the old record is untouched
    retired = acme.rules.retire(label)
    assert (retired.active, retired.retired_by) == (False, _kid(s.tenant_key))
    assert [v.text for v in acme.rules.get(label).versions] == [old_text, new_text]
    refused = _chat(s, s.tenant_key, rules=[f"{label}@1"])
    assert (refused.status_code, refused.json()["error"]["param"], refused.json()["error"]["code"]) == (
        400, "rules[0]", "rule_retired")
    assert httpx.get(f"{s.base_url}/v1/audit/{record_id}", headers=s.headers(s.tenant_key), timeout=30).json() == record
    events = httpx.get(f"{s.base_url}/v1/audit", params={"kind": "rule", "limit": 1000},
                       headers=s.headers(s.admin_key), timeout=30).json()["data"]
    rule_id = acme.rules.get(label).id
    assert sorted(e["id"] for e in events if rule_id in e["id"]) == [
        f"rule-{rule_id}-retired", f"rule-{rule_id}-v1", f"rule-{rule_id}-v2"]
    _verify(s)


def _check_probe(check: dict, blocks: list[str]) -> None:
    """Each anchor's figures as defined: information = ln B − H(q), separable ⇔ own block on top by ≥ ln 2."""
    B = len(blocks)
    assert (check["num_blocks"], [a["block"] for a in check["anchors"]]) == (B, blocks)
    assert check["query"] == PROBE_QUERY
    for a in check["anchors"]:
        assert a["needed_nats"] == pytest.approx(math.log(B))
        assert a["information_nats"] == pytest.approx(math.log(B) - a["entropy_nats"], abs=1e-9)
        assert -1e-9 <= a["entropy_nats"] <= math.log(B) + 1e-9 and 0 <= a["own_share"] <= 1
        assert a["separable"] == (a["top_block"] == a["block"] and a["margin_nats"] >= LN2)


def test_rulebook_anchors_stored_carried_and_warned(localist_server, acme):
    s = localist_server
    a, b, c, book = (_unique(p) for p in ("TWIN-A", "TWIN-B", "OTHER", "lending"))
    # A and B share their anchor and text: both probes place the same prompt, so q is the same for both
    # and at most one of them can be its top block — at least one anchor is not separable, on any model
    acme.rules.create(a, "Loans above 10k need approval.", anchor="[TWIN]")
    acme.rules.create(b, "Loans above 10k need approval.", anchor="[TWIN]")
    acme.rules.create(c, "Interest is fixed for the first year.")
    created = acme.rules.create(book, rules=[a, f"{b}@1", c])
    version = created.versions[-1]
    assert [m.label for m in version.members] == [a, b, c] and version.ref == f"{book}@1"
    check = version.anchors.model_dump(mode="json")
    assert (check["source"], check["model"], check["rho"]) == (f"{book}@1", s.model, 0.0)
    _check_probe(check, [f"{a}@1", f"{b}@1", f"{c}@1"])
    twins = check["anchors"][:2]
    assert twins[0]["entropy_nats"] == pytest.approx(twins[1]["entropy_nats"], abs=1e-6)
    assert twins[0]["top_block"] == twins[1]["top_block"]
    assert not all(t["separable"] for t in twins)
    listed = next(r for r in acme.rules.list().data if r.label == book)
    assert listed.versions[-1].anchors == version.anchors  # shown by GET /v1/rules

    answer = _chat(s, s.tenant_key, rules=[book])
    assert answer.status_code == 200, answer.text
    result = answer.json()["localist"]
    assert [(u["block"], u["rulebook"]) for u in result["rules"]] == [
        (f"{x}@1", f"{book}@1") for x in (a, b, c)]
    assert result["anchors"] == [check]  # carried into the response and so into the record
    not_separable = [p for p in check["anchors"] if not p["separable"]]
    assert len(result["warnings"]) == len(not_separable)
    assert all(p["anchor"] in w and p["block"] in w for p, w in zip(not_separable, result["warnings"]))
    record = httpx.get(f"{s.base_url}/v1/audit/{result['audit_id']}", headers=s.headers(s.tenant_key),
                       timeout=30).json()
    assert record["metrics"]["localist"]["anchors"] == [check]
    assert record["metrics"]["localist"]["warnings"] == result["warnings"]

    # a rulebook holds rules only; a second version probes again
    nested = _post(s, s.tenant_key, "/v1/rules", {"label": _unique("outer"), "rules": [book]})
    assert (nested.status_code, nested.json()["error"]["param"]) == (400, "rules[0]")
    v2 = acme.rules.create(book, rules=[c])
    assert (v2.latest, v2.versions[-1].anchors.num_blocks) == (2, 1)
    assert v2.versions[-1].anchors.anchors[0].separable  # one block: nothing to confuse it with
    _verify(s)


def test_inline_blocks_anchor_check(localist_server):
    s = localist_server
    blocks = [{"label": "D1", "kind": "document", "text": "[D1] The warehouse opens at nine."},
              {"label": "D2", "kind": "document", "text": "[D2] Returns close at five."},
              {"label": "note", "kind": "context", "text": "Not a candidate."}]
    answer = _chat(s, s.tenant_key, blocks=blocks, anchors="check")
    assert answer.status_code == 200, answer.text
    result = answer.json()["localist"]
    check = result["anchors"][-1]
    assert check["source"] == "request"
    _check_probe(check, ["D1", "D2"])
    assert [a["anchor"] for a in check["anchors"]] == ["[D1]", "[D2]"]
    assert len(result.get("warnings") or []) == sum(not a["separable"] for a in check["anchors"])
    plain = _chat(s, s.tenant_key, blocks=blocks).json()["localist"]
    assert plain.get("anchors") is None  # probing is asked for, never implied
    nothing = _chat(s, s.tenant_key, blocks=blocks[2:], anchors="check")
    assert (nothing.status_code, nothing.json()["error"]["param"]) == (400, "anchors")


def test_concurrent_versions_and_rulebook_size(localist_server, acme):
    """Versions are numbered under the append lock: 8 writers at once get 8 distinct numbers. A rulebook
    larger than the probe's block table can hold is refused naming `rules`."""
    from concurrent.futures import ThreadPoolExecutor

    s, label = localist_server, _unique("RACE")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _post(s, s.tenant_key, "/v1/rules", {"label": label, "text": f"text {i}"}),
                                range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert sorted(a.json()["latest"] for a in answers) == list(range(1, 9))
    assert sorted(v.text for v in acme.rules.get(label).versions) == sorted(f"text {i}" for i in range(8))
    many = [acme.rules.create(_unique("M"), f"rule {i}").label for i in range(62)]  # --max-blocks 64 − 3 = 61
    r = _post(s, s.tenant_key, "/v1/rules", {"label": _unique("BIG"), "rules": many})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "rules"), r.text
    _verify(s)


async def test_async_client_and_cli(localist_server):
    s, label = localist_server, _unique("CLI")
    async with AsyncClient(s.base_url, s.tenant_key) as client:
        made = await client.rules.create(label, "Async text.")
        assert (await client.rules.get(label)).versions == made.versions
    cli = [sys.executable, "-m", "localist.clients.cli", "rules"]
    conn = ["--url", s.base_url, "--api-key", s.tenant_key]
    shown = subprocess.run([*cli, "show", label, *conn], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "Async text." in shown.stdout and f"{label}@1" in shown.stdout, shown.stderr
    chat = subprocess.run([sys.executable, "-m", "localist.clients.cli", "chat", "Which rule?", "--use-rule", label,
                           "--max-tokens", "2", *conn], capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and f"rule               {label}@1 (rule {label} version 1" in chat.stdout, chat.stderr
    retired = subprocess.run([*cli, "retire", label, *conn], capture_output=True, text=True, timeout=120)
    assert retired.returncode == 0 and "retired by" in retired.stdout
    listed = subprocess.run([*cli, "list", "--all", *conn], capture_output=True, text=True, timeout=120)
    assert any(line.startswith(label) and "retired" in line for line in listed.stdout.splitlines())
