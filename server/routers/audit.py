"""Audit endpoints: read, list, report (JSON and HTML), verify, redact, replay.

A tenant sees only its own records (an admin key sees all); a record another tenant owns answers
404, exactly like one that does not exist. Every store call runs off the event loop. Stored records
are read with the contract's reader, so records an older server wrote read too.
"""
from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from localist.clients import contract as C
from localist.server.auth import Principal, principal, require_admin
from localist.server.errors import ApiError
from localist.server.exceptions import InvalidRequest
from localist.server.reports import render_html
from localist.server.routers.openai_api import caller_gone
from localist.server.store import ALL_TENANTS, NotFound, load_public_key, public_key_pem

router = APIRouter(prefix="/v1/audit", tags=["audit"])
ERRORS = {code: {"model": C.ErrorResponse} for code in (400, 401, 403, 404, 429)}


_FIRST_SECOND = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()
_LAST_SECOND = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()


def _when(value: str | None, name: str) -> float | None:
    """Unix seconds or an ISO 8601 time with a zone."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # NaN, ±inf and times datetime cannot hold would fail in the store, not here
        if not math.isfinite(seconds) or not _FIRST_SECOND <= seconds <= _LAST_SECOND:
            raise InvalidRequest(name, f"unix seconds out of range (years 1-9999): {value!r}")
        return seconds
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(name, f"not unix seconds nor an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise InvalidRequest(name, "an ISO 8601 time needs a zone (e.g. Z or +00:00)")
    return parsed.timestamp()


async def _record(request: Request, who: Principal, record_id: str) -> C.AuditRecord:
    stored = await request.app.state.store.aget_record(record_id, tenant=who.scope)
    if stored is None:
        raise NotFound(f"audit record {record_id!r} not found", "id")
    return C.read(C.AuditRecord, stored, keep_unknown=False)


@router.get("", response_model=C.AuditList, responses=ERRORS)
async def list_records(
    request: Request,
    who: Principal = Depends(principal),
    since: str | None = Query(None, description="Created at or after (unix seconds or ISO 8601)."),
    until: str | None = Query(None, description="Created before (unix seconds or ISO 8601)."),
    model: str | None = None,
    status: C.RecordStatus | None = None,
    rho_min: float | None = Query(None, ge=0.0, le=1.0, description="Every layer's ρ ≥ this."),
    rho_max: float | None = Query(None, ge=0.0, le=1.0, description="Every layer's ρ ≤ this."),
    fidelity_min: float | None = Query(None, ge=0.0, le=1.0),
    fidelity_max: float | None = Query(None, ge=0.0, le=1.0),
    block: str | None = Query(None, description="Only requests with a block of this label."),
    kind: Literal["request", "key", "rule", "redaction", "retention"] = "request",
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = None,
):
    """Newest first; pass `next_cursor` back as `cursor` for the next page."""
    if kind != "request":
        require_admin(who)
    page = await request.app.state.store.alist_records(
        tenant=who.scope, kind=kind, since=_when(since, "since"), until=_when(until, "until"), model=model,
        status=status, rho_min=rho_min, rho_max=rho_max, fidelity_min=fidelity_min,
        fidelity_max=fidelity_max, block=block, limit=limit, cursor=cursor, include_payload=False)
    return C.AuditList(data=[C.read(C.AuditSummary, r, keep_unknown=False) for r in page.records],
                       has_more=page.next_cursor is not None, next_cursor=page.next_cursor)


@router.post("/verify", response_model=C.VerifyResult, responses=ERRORS)
async def verify(request: Request, who: Principal = Depends(principal)):
    """Check the whole chain (links, hashes, signed checkpoints); returns the first broken link."""
    report = await request.app.state.store.averify()
    return _verify_result(report, who)


def _verify_result(report, who: Principal) -> C.VerifyResult:
    broken = None
    if report.first_broken is not None:
        b = report.first_broken
        # the chain is shared: a tenant learns where it broke, not another tenant's record id
        broken = C.BrokenLink(seq=b.seq, record_id=b.record_id if who.admin else None, reason=b.reason)
    return C.VerifyResult(ok=report.ok, checked=report.checked, head_seq=report.head_seq, head_hash=report.head_hash,
                          first_broken=broken, signed_seq=report.signed_seq,
                          signatures_valid=report.signatures_valid,
                          signatures_untrusted=report.signatures_untrusted, redacted=report.redacted)


@router.get("/public-key", response_class=PlainTextResponse, responses={
    **ERRORS, 200: {"content": {"application/x-pem-file": {"schema": {"type": "string"}}}}})
async def public_key(request: Request, who: Principal = Depends(principal)):
    """The Ed25519 public key that signs the chain head, for verifying checkpoints outside the server."""
    path = request.app.state.settings.signing_key
    if path is None:
        raise ApiError(404, "this server does not sign its audit chain (started with --no-signing)", None,
                       "not_signing")
    return PlainTextResponse(public_key_pem(load_public_key(path)).decode(), media_type="application/x-pem-file")


@router.get("/{record_id}", response_model=C.AuditRecord, responses=ERRORS)
async def get_record(record_id: str, request: Request, who: Principal = Depends(principal)):
    return await _record(request, who, record_id)


@router.get("/{record_id}/report", response_model=C.AuditReport, responses={
    **ERRORS, 200: {"content": {"text/html": {"schema": {"type": "string"}}}}})
async def report(record_id: str, request: Request, who: Principal = Depends(principal),
                 format: Literal["json", "html"] | None = Query(
                     None, description="Default: html when the Accept header prefers it, else json.")):
    """The compliance report: block table, attribution heatmap, entropy and fidelity against the theory's
    bounds, and this record's verification (its hashes and the links up to the next signed checkpoint)."""
    record = await _record(request, who, record_id)
    proof = await request.app.state.store.averify_record(record_id, tenant=who.scope)
    body = C.AuditReport(record=record, verification=C.RecordVerification(**dataclasses.asdict(proof)))
    wants_html = format == "html" or (format is None and "text/html" in request.headers.get("accept", ""))
    if wants_html:
        return HTMLResponse(render_html(body))
    return body


@router.post("/purge", response_model=C.PurgeResult, responses=ERRORS)
async def purge(body: C.PurgeRequest, request: Request, who: Principal = Depends(principal)):
    """Retention (admin): erase the payloads of request records created before ``before``; hashes stay, so
    the chain stays valid, and one chained retention record lists what was erased."""
    require_admin(who)
    before = _when(str(body.before), "before")
    erased = await request.app.state.store.apurge_payloads(
        before=before, tenant=ALL_TENANTS if body.tenant is None else body.tenant, actor=who.actor)
    return C.PurgeResult(erased=erased)


@router.post("/{record_id}/redact", response_model=C.AuditSummary, responses=ERRORS)
async def redact(record_id: str, body: C.RedactRequest, request: Request, who: Principal = Depends(principal)):
    """Erase a record's payload (e.g. on a data subject's request); a chained redaction record says who and
    why, and the chain stays valid."""
    await request.app.state.store.aredact(record_id, tenant=who.scope, reason=body.reason, actor=who.actor)
    return C.AuditSummary(**(await _record(request, who, record_id)).model_dump(include=set(C.AuditSummary.model_fields)))


@router.post("/{record_id}/replay", response_model=C.ReplayResult, responses={**ERRORS, 409: {"model": C.ErrorResponse}})
async def replay(record_id: str, request: Request, who: Principal = Depends(principal)):
    """Re-run a stored request on the served model — same prompt token ids, block table, dial, seeds and
    sampling parameters — and say whether every choice reproduced its tokens. The replay is itself
    audited (``request.replay_of`` names the original)."""
    record = await _record(request, who, record_id)
    service = request.app.state.service
    plan = service.plan_replay(record)
    await request.app.state.limiter.acquire(who.key)
    run = service.start(plan, who, getattr(request.state, "request_id", None))
    try:
        await service.complete(run, caller_gone(request))
    finally:
        request.app.state.limiter.release(who.key)
    return service.replay_result(run, record)
