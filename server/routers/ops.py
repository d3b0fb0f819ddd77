"""`/health` and `/metrics` (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from localist.clients import contract as C
from localist.server.store import StoreUnavailable
from localist.server.store.availability import RETRY_AFTER_S

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=C.Health)
async def health(request: Request, response: Response):
    """503 while the engine is down (it restarts by itself) or the audit store cannot be used (the server
    probes it and recovers by itself); either way with Retry-After."""
    state = request.app.state
    engine, store = state.engine, state.store
    engine_ok = engine.running
    try:  # a read reaches the database; an outage the store already knows of is reported as it is
        await store.alist_keys(include_revoked=False)
        await state.dev_mode.refresh()
    except StoreUnavailable:
        pass
    outage = store.availability.outage
    ok = engine_ok and outage is None
    response.status_code = 200 if ok else 503
    if not engine_ok:
        response.headers["Retry-After"] = str(engine.retry_after())
    elif outage is not None:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return C.Health(status="ok" if ok else "degraded", model=engine.name,
                    engine="running" if engine_ok else "restarting",
                    engine_requests=engine.unfinished_requests(), engine_stats_held=await engine.stats_held(),
                    engine_restarts=engine.restarts, engine_down_since=engine.down_since,
                    engine_last_failure=engine.last_failure,
                    audit_store="ok" if outage is None else "unavailable",
                    audit_store_down_since=outage.since if outage is not None else None,
                    audit_store_last_failure=store.availability.last_failure,
                    dev_mode=state.dev_mode.on)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    """Prometheus exposition: requests, tokens, latency, dial and fidelity histograms, engine up and restarts."""
    return Response(generate_latest(request.app.state.prometheus.registry), media_type=CONTENT_TYPE_LATEST)
