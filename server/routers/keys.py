"""`/v1/keys`: API key management with an admin key (each action is itself an audit record)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from localist.clients import contract as C
from localist.server.auth import Principal, principal, require_admin

router = APIRouter(prefix="/v1/keys", tags=["keys"])
ERRORS = {code: {"model": C.ErrorResponse} for code in (400, 401, 403, 404, 429)}


def _info(key) -> C.KeyInfo:
    return C.KeyInfo(**key.to_dict(), active=key.active)


@router.post("", response_model=C.KeyCreated, responses=ERRORS)
async def create_key(body: C.KeyCreate, request: Request, who: Principal = Depends(principal)):
    """Create a key; its token is returned once and stored only as a hash."""
    require_admin(who)
    token, key = await request.app.state.store.acreate_key(
        tenant=body.tenant, name=body.name or f"{body.tenant} key", admin=body.admin,
        rate_limit_per_min=body.rate_limit_per_min, max_concurrency=body.max_concurrency, actor=who.actor)
    return C.KeyCreated(token=token, key=_info(key))


@router.get("", response_model=C.KeyList, responses=ERRORS)
async def list_keys(request: Request, who: Principal = Depends(principal), include_revoked: bool = False):
    require_admin(who)
    keys = await request.app.state.store.alist_keys(include_revoked=include_revoked)
    return C.KeyList(data=[_info(k) for k in keys])


@router.delete("/{key_id}", response_model=C.KeyInfo, responses=ERRORS)
async def revoke_key(key_id: str, request: Request, who: Principal = Depends(principal)):
    """Revoke a key (idempotent)."""
    require_admin(who)
    return _info(await request.app.state.store.arevoke_key(key_id, actor=who.actor))
