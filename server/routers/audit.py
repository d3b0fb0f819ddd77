"""Audit endpoints: read, list, report (JSON and HTML), verify, redact.

A tenant sees only its own records (an admin key sees all); a record another tenant owns answers
404, exactly like one that does not exist. Every store call runs off the event loop.
"""
from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from localist.server import schemas as S
from localist.server.auth import Principal, principal, require_admin
from localist.server.errors import ApiError
from localist.server.generation import prepare_replay
from localist.server.routers.openai_api import Aborted, Run, run_to_end
from localist.server.reports import render_html
from localist.server.store import ALL_TENANTS, NotFound, RecordError, load_public_key, public_key_pem

router = APIRouter(prefix="/v1/audit", tags=["audit"])
ERRORS = {code: {"model": S.ErrorResponse} for code in (400, 401, 403, 404, 429)}


def _when(value: str | None, name: str) -> float | None:
    """Unix seconds or an ISO 8601 time with a zone."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(400, f"{name}: not unix seconds nor an ISO 8601 time: {value!r}", name, "invalid_value")
    if parsed.tzinfo is None:
        raise ApiError(400, f"{name}: an ISO 8601 time needs a zone (e.g. Z or +00:00)", name, "invalid_value")
    return parsed.timestamp()


def _store_error(exc: RecordError) -> ApiError:
    message = str(exc)
    return ApiError(400, message, message.split(":", 1)[0] if ":" in message else None, "invalid_value")


async def _record(request: Request, who: Principal, record_id: str) -> dict:
    record = await request.app.state.store.aget_record(record_id, tenant=who.scope)
    if record is None:
        raise ApiError(404, f"audit record {record_id!r} not found", "id", "not_found")
    return record


@router.get("", response_model=S.AuditList, responses=ERRORS)
async def list_records(
    request: Request,
    who: Principal = Depends(principal),
    since: str | None = Query(None, description="Created at or after (unix seconds or ISO 8601)."),
    until: str | None = Query(None, description="Created before (unix seconds or ISO 8601)."),
    model: str | None = None,
    status: S.RecordStatus | None = None,
    rho_min: float | None = Query(None, ge=0.0, le=1.0, description="Every layer's ρ ≥ this."),
    rho_max: float | None = Query(None, ge=0.0, le=1.0, description="Every layer's ρ ≤ this."),
    fidelity_min: float | None = Query(None, ge=0.0, le=1.0),
    fidelity_max: float | None = Query(None, ge=0.0, le=1.0),
    block: str | None = Query(None, description="Only requests with a block of this label."),
    kind: Literal["request", "key", "redaction", "retention"] = "request",
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = None,
):
    """Newest first; pass `next_cursor` back as `cursor` for the next page."""
    if kind != "request":
        require_admin(who)
    try:
        page = await request.app.state.store.alist_records(
            tenant=who.scope, kind=kind, since=_when(since, "since"), until=_when(until, "until"), model=model,
            status=status, rho_min=rho_min, rho_max=rho_max, fidelity_min=fidelity_min,
            fidelity_max=fidelity_max, block=block, limit=limit, cursor=cursor, include_payload=False)
    except RecordError as exc:
        raise _store_error(exc) from None
    return S.AuditList(data=[S.AuditSummary(**r) for r in page.records], has_more=page.next_cursor is not None,
                       next_cursor=page.next_cursor)


@router.post("/verify", response_model=S.VerifyResult, responses=ERRORS)
async def verify(request: Request, who: Principal = Depends(principal)):
    """Check the whole chain (links, hashes, signed checkpoints); returns the first broken link."""
    report = await request.app.state.store.averify()
    return _verify_result(report, who)


def _verify_result(report, who: Principal) -> S.VerifyResult:
    broken = None
    if report.first_broken is not None:
        b = report.first_broken
        # the chain is shared: a tenant learns where it broke, not another tenant's record id
        broken = S.BrokenLink(seq=b.seq, record_id=b.record_id if who.admin else None, reason=b.reason)
    return S.VerifyResult(ok=report.ok, checked=report.checked, head_seq=report.head_seq, head_hash=report.head_hash,
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


@router.get("/{record_id}", response_model=S.AuditRecord, responses=ERRORS)
async def get_record(record_id: str, request: Request, who: Principal = Depends(principal)):
    return S.AuditRecord(**await _record(request, who, record_id))


@router.get("/{record_id}/report", response_model=S.AuditReport, responses={
    **ERRORS, 200: {"content": {"text/html": {"schema": {"type": "string"}}}}})
async def report(record_id: str, request: Request, who: Principal = Depends(principal),
                 format: Literal["json", "html"] | None = Query(
                     None, description="Default: html when the Accept header prefers it, else json.")):
    """The compliance report: block table, attribution heatmap, entropy and fidelity against the theory's
    bounds, and this record's verification (its hashes and the links up to the next signed checkpoint)."""
    store = request.app.state.store
    record = S.AuditRecord(**await _record(request, who, record_id))
    proof = await store.averify_record(record_id, tenant=who.scope)
    body = S.AuditReport(record=record, verification=S.RecordVerification(**dataclasses.asdict(proof)))
    wants_html = format == "html" or (format is None and "text/html" in request.headers.get("accept", ""))
    if wants_html:
        return HTMLResponse(render_html(body))
    return body


@router.post("/purge", response_model=S.PurgeResult, responses=ERRORS)
async def purge(body: S.PurgeRequest, request: Request, who: Principal = Depends(principal)):
    """Retention (admin): erase the payloads of request records created before ``before``; hashes stay, so
    the chain stays valid, and one chained retention record lists what was erased."""
    require_admin(who)
    before = _when(str(body.before), "before")
    try:
        erased = await request.app.state.store.apurge_payloads(
            before=before, tenant=ALL_TENANTS if body.tenant is None else body.tenant, actor=who.actor)
    except RecordError as exc:
        raise _store_error(exc) from None
    return S.PurgeResult(erased=erased)


class RedactRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    reason: str = Field(min_length=1, max_length=4096, description="Why the payload is erased (kept in the chain).")


@router.post("/{record_id}/redact", response_model=S.AuditSummary, responses=ERRORS)
async def redact(record_id: str, body: RedactRequest, request: Request, who: Principal = Depends(principal)):
    """Erase a record's payload (e.g. on a data subject's request); a chained redaction record says who and
    why, and the chain stays valid."""
    store = request.app.state.store
    try:
        await store.aredact(record_id, tenant=who.scope, reason=body.reason, actor=who.actor)
    except NotFound:
        raise ApiError(404, f"audit record {record_id!r} not found", "id", "not_found") from None
    except RecordError as exc:
        raise ApiError(409, str(exc), "id", "already_redacted") from None
    return S.AuditSummary(**await _record(request, who, record_id))


@router.post("/{record_id}/replay", response_model=S.ReplayResult, responses={**ERRORS, 409: {"model": S.ErrorResponse}})
async def replay(record_id: str, request: Request, who: Principal = Depends(principal)):
    """Re-run a stored request on the served model — same prompt token ids, block table, dial, seeds and
    sampling parameters — and say whether every choice reproduced its tokens. The replay is itself
    audited (``request.replay_of`` names the original)."""
    record = await _record(request, who, record_id)
    if record["kind"] != "request":
        raise ApiError(409, f"record {record_id!r} is a {record['kind']} record, not a request", "id",
                       "not_replayable")
    request.app.state.engine.ensure_serving()  # while the engine restarts: 503 + Retry-After, nothing stored
    prep = prepare_replay(request.app.state.engine, record)
    await request.app.state.limiter.acquire(who.key)
    run = Run(request, who, prep)
    try:
        await run_to_end(run)
    except Aborted:
        raise ApiError(499, "client disconnected", None, "client_disconnected") from None
    finally:
        request.app.state.limiter.release(who.key)
    original = record["output"]["choices"]
    choices = [S.ReplayChoice(index=s.index, original_token_ids=o["token_ids"], replay_token_ids=s.token_ids,
                              matches=o["token_ids"] == s.token_ids) for s, o in zip(run.states, original)]
    return S.ReplayResult(record_id=record_id, replay_id=prep.request_id, matches=all(c.matches for c in choices),
                          choices=choices, localist=run.result)
