"""`/v1/rules`: the caller's tenant's rules and rulebooks (versions, retirement); another tenant's label
answers 404, exactly like one that does not exist."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from localist.clients import contract as C
from localist.server.auth import Principal, principal
from localist.server.rules import RuleService

router = APIRouter(prefix="/v1/rules", tags=["rules"])
ERRORS = {code: {"model": C.ErrorResponse} for code in (400, 401, 404, 429)}


def _rules(request: Request) -> RuleService:
    return request.app.state.rules


@router.post("", response_model=C.Rule, responses=ERRORS | {503: {"model": C.ErrorResponse}})
async def create_rule(body: C.RuleCreate, request: Request, who: Principal = Depends(principal)):
    """A rule (`text`) or rulebook (`rules`), or the next version of an existing label. A rulebook version's
    anchors are probed under the served model when it is created, and stored with it."""
    return await _rules(request).create(body, who)


@router.get("", response_model=C.RuleList, responses=ERRORS)
async def list_rules(request: Request, who: Principal = Depends(principal), include_retired: bool = False):
    """The tenant's rules and rulebooks with every version (texts, members, anchor probes)."""
    return await _rules(request).list_rules(who, include_retired)


@router.get("/{label}", response_model=C.Rule, responses=ERRORS)
async def get_rule(label: str, request: Request, who: Principal = Depends(principal)):
    return await _rules(request).get(label, who)


@router.delete("/{label}", response_model=C.Rule, responses=ERRORS)
async def retire_rule(label: str, request: Request, who: Principal = Depends(principal)):
    """Retire a rule or rulebook (idempotent): requests can no longer use it; its versions stay readable,
    and the records of requests that used it are unchanged."""
    return await _rules(request).retire(label, who)
