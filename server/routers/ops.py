"""`/health` and `/metrics` (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from localist.clients import contract as C

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=C.Health)
async def health(request: Request, response: Response):
    """503 while the engine is down (it restarts by itself) or the audit store cannot be read."""
    state = request.app.state
    engine = state.engine
    engine_ok = engine.running
    try:
        await state.store.alist_keys(include_revoked=False)
        await state.dev_mode.refresh()
        store_ok = True
    except Exception:  # noqa: BLE001 — any failure means the store is unusable
        store_ok = False
    ok = engine_ok and store_ok
    response.status_code = 200 if ok else 503
    if not engine_ok:
        response.headers["Retry-After"] = str(engine.retry_after())
    return C.Health(status="ok" if ok else "degraded", model=state.engine.name,
                    engine="running" if engine_ok else "restarting",
                    engine_requests=engine.unfinished_requests(),
                    engine_restarts=engine.restarts, engine_down_since=engine.down_since,
                    engine_last_failure=engine.last_failure,
                    audit_store="ok" if store_ok else "error",
                    dev_mode=state.dev_mode.on)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    """Prometheus exposition: requests, tokens, latency, dial and fidelity histograms, engine up and restarts."""
    return Response(generate_latest(request.app.state.prometheus.registry), media_type=CONTENT_TYPE_LATEST)
