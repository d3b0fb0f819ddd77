"""Audit records written before the wire contract was redesigned still verify, list and render.

``tests/data/audit_store_v1`` was written through a real server by the code of commit b99e3b7
(``write_store.py`` there says how): records of every kind and status, every audit level, a stream, a
replay, a redaction and a retention, with signed checkpoints. The code at hand opens a copy of it.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from localist.clients import contract as C
from localist.clients.commands import render_record
from localist.server.reports import render_html
from localist.server.store import ALL_TENANTS, AuditStore, read_checkpoint_log

FIXTURE = Path(__file__).parent / "data" / "audit_store_v1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    copy = tmp_path_factory.mktemp("audit-store-v1") / "audit.sqlite"
    shutil.copy(FIXTURE / "audit.sqlite", copy)  # opening a store may migrate it: never the committed file
    with AuditStore(f"sqlite:///{copy}") as opened:
        yield opened


@pytest.fixture(scope="module")
def listed(store) -> list[C.AuditSummary]:
    page = store.list_records(tenant=ALL_TENANTS, kind=None, limit=1000, include_payload=False)
    assert page.next_cursor is None
    return [C.read(C.AuditSummary, r, keep_unknown=False) for r in page.records]


def test_the_chain_and_its_signatures_verify(store):
    report = store.verify(public_keys=[FIXTURE / "signing-public-key.pem"],
                          checkpoints=read_checkpoint_log(FIXTURE / "checkpoints.jsonl"))
    assert report.ok, report.first_broken
    assert report.checked == report.head_seq == 15
    assert report.signatures_valid >= 3 and report.signed_seq == 15 and report.redacted == 2


def test_records_of_every_kind_and_status_list(listed):
    assert {r.kind for r in listed} == {"request", "key", "redaction", "retention"}
    assert {r.status for r in listed if r.kind == "request"} == {"completed", "aborted", "failed"}
    assert sum(r.redacted for r in listed) == 2


def request_records(store, listed) -> list[C.AuditRecord]:
    return [C.read(C.AuditRecord, store.get_record(r.id, tenant=ALL_TENANTS), keep_unknown=False)
            for r in listed if r.kind == "request"]


def test_stored_payloads_read_as_the_typed_contract(store, listed):
    """Every payload part reads into its contract class as defined (unknown fields refused) and gives
    back exactly the JSON that was hashed."""
    for summary in listed:
        if summary.kind != "request" or summary.redacted:
            continue
        stored = store.get_record(summary.id, tenant=ALL_TENANTS)
        record = C.AuditRecord.model_validate(stored)
        for part in ("request", "output", "metrics", "timestamps", "replay"):
            assert getattr(record, part).model_dump(mode="json") == stored[part], (summary.id, part)
    levels = {r.localist().audit for r in request_records(store, listed) if r.localist()}
    assert levels == {"summary", "per_token", "per_layer"}


def test_reports_render_with_the_scored_heads_fidelity_beside_its_bound(store, listed):
    for record in request_records(store, listed):
        proof = store.verify_record(record.id, tenant=ALL_TENANTS, public_keys=[FIXTURE / "signing-public-key.pem"])
        assert proof.ok, proof.reason
        page = render_html(C.AuditReport(record=record, verification=C.RecordVerification(**dataclasses.asdict(proof))))
        assert "✔ record verified" in page and record.id in page
        metrics = record.localist().choices[0] if record.localist() else None
        row = re.search(r"<tr><th>Pointer fidelity, scored heads F<sub>S</sub></th><td>([^<]*)</td>"
                        r"<td>≥ ([^<]*) \(bound\)", page)
        assert row, page
        if metrics is None:
            assert row.groups() == ("—", "—") and "No metrics were recorded" in page
            continue
        theory = metrics.theory
        shown = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        assert row.groups() == (shown(theory.fidelity_measured), shown(theory.fidelity_bound))
        assert f"(no bound applies)</th><td>{shown(metrics.pointer_fidelity)}</td>" in page
        if record.localist().audit != "summary":
            assert page.count("<rect ") >= len(metrics.tokens) * len(record.localist().blocks)


def test_the_cli_renders_every_request_record(store, listed):
    for record in request_records(store, listed):
        text = render_record(record)
        assert text.startswith(f"record {record.id}")
        if record.output is not None:
            assert json.dumps(record.output.choices[0].text, ensure_ascii=False) in text
        if record.localist() is not None:
            theory = record.localist().choices[0].theory
            measured = "—" if theory.fidelity_measured is None else f"{theory.fidelity_measured:.3f}"
            assert re.search(rf"scored heads {re.escape(measured)}  bound ≥ ", text), text
