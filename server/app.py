"""The app factory: FastAPI front, vLLM engine and audit store in one process.

``create_app(settings)`` builds the app without starting anything (so ``app.openapi()`` works
anywhere); the lifespan opens the store, starts with keys or in dev mode, and starts the engine.
"""
from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from localist.model.blocks import MAX_BLOCKS
from localist.server import errors, transport
from localist.server.auth import DevMode, Limiter
from localist.server.observability import Prometheus, RequestIdMiddleware
from localist.server.routers import audit, keys, ops, openai_api, rules

log = logging.getLogger("localist.server")

DESCRIPTION = (
    "OpenAI-compatible inference with a per-request locality dial. Generation requests accept the "
    "extension fields `locality`, `blocks`, `target_block` and `audit`; responses carry a `localist` "
    "object (block attribution, attention entropy, pointer fidelity, theory bounds, `audit_id`). "
    "Every request is stored in a hash-chained, signed audit log."
)


@dataclass
class Settings:
    model_dir: Path
    model_name: str
    db_url: str
    signing_key: Path | None = None
    checkpoint_log: Path | None = None
    sign_interval_s: float = 60.0
    stand_in: bool = False
    max_model_len: int = 2048
    default_rho: float = 0.0
    max_blocks: int = MAX_BLOCKS
    admin_token: str | None = None  # imported as an admin key at start-up (LOCALIST_ADMIN_KEY)
    host: str | None = None  # the address served on; None (not known) counts as reachable from the network
    allow_dev_mode_on_network: bool = False  # else dev mode on a non-loopback host refuses to start
    seed: int = 0
    max_header_bytes: int = transport.MAX_HEADER_BYTES  # request line and headers; 431 above
    max_body_bytes: int = transport.MAX_BODY_BYTES  # 413 above
    ready_message: str | None = None  # printed once the engine is up (how to call the server)
    engine_overrides: dict = field(default_factory=dict)  # vLLM engine flags given to `localist serve`


def _open_store(settings: Settings):
    from localist.server.store import AuditStore

    return AuditStore(
        settings.db_url,
        signing_key_path=settings.signing_key,
        create_signing_key=settings.signing_key is not None,
        checkpoint_log=settings.checkpoint_log,
        sign_interval_s=settings.sign_interval_s if settings.signing_key is not None else None,
    )


async def start_auth(store, settings: Settings) -> DevMode:
    """Import the bootstrap admin key if configured, then start with keys or in dev mode (auth.DevMode)."""
    if settings.admin_token:
        await store.acreate_key(tenant="admin", name="bootstrap admin (LOCALIST_ADMIN_KEY)", admin=True,
                                token=settings.admin_token, actor="startup")
    return await DevMode.start(store, host=settings.host, allow_on_network=settings.allow_dev_mode_on_network)


@asynccontextmanager
async def lifespan(app: FastAPI):
    from localist.server.engine import Engine, EngineConfig
    from localist.server.rules import RuleService
    from localist.server.service import GenerationService

    settings: Settings = app.state.settings
    store = _open_store(settings)
    app.state.store = store
    try:
        app.state.dev_mode = await start_auth(store, settings)
    except BaseException:
        store.close()  # a refused start leaves no signer thread behind
        raise
    engine = Engine(EngineConfig(settings.model_dir, settings.model_name, settings.max_model_len,
                                 settings.stand_in, settings.seed, settings.engine_overrides))
    engine.start()
    try:
        await engine.read_engine_setup()
    except BaseException:
        engine.shutdown()  # no engine core left behind by a refused start
        raise
    app.state.engine = engine
    app.state.prometheus.watch_engine(engine)
    app.state.service = GenerationService(engine, store, app.state.prometheus, settings.default_rho, settings.max_blocks)
    app.state.rules = RuleService(store, app.state.service)
    supervisor = asyncio.get_running_loop().create_task(engine.supervise(), name="engine supervisor")
    if settings.stand_in:
        log.warning("SERVING AN UNTRAINED STAND-IN MODEL (%s): random weights, outputs are noise.",
                    settings.model_dir)
    if settings.ready_message:
        print(settings.ready_message, flush=True)
    try:
        yield
    finally:
        supervisor.cancel()
        await app.state.service.drain()
        engine.shutdown()
        store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="localist", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan if settings is not None else None)
    app.state.settings = settings
    app.state.prometheus = Prometheus()
    app.state.limiter = Limiter()
    errors.install(app)
    transport.install(app, settings.max_header_bytes if settings else transport.MAX_HEADER_BYTES,
                      settings.max_body_bytes if settings else transport.MAX_BODY_BYTES)
    app.add_middleware(RequestIdMiddleware, prometheus=app.state.prometheus)  # outermost: ids every answer
    for router in (openai_api.router, audit.router, keys.router, rules.router, ops.router):
        app.include_router(router, responses=transport.RESPONSES)
    return app


def settings_from_env() -> Settings:
    """For ``uvicorn --factory localist.server.app:app_from_env`` (the CLI sets these)."""
    env = os.environ
    return Settings(
        model_dir=Path(env["LOCALIST_MODEL_DIR"]),
        model_name=env.get("LOCALIST_MODEL_NAME") or Path(env["LOCALIST_MODEL_DIR"]).name,
        db_url=env["LOCALIST_DB_URL"],
        signing_key=Path(env["LOCALIST_SIGNING_KEY"]) if env.get("LOCALIST_SIGNING_KEY") else None,
        checkpoint_log=Path(env["LOCALIST_CHECKPOINT_LOG"]) if env.get("LOCALIST_CHECKPOINT_LOG") else None,
        sign_interval_s=float(env.get("LOCALIST_SIGN_INTERVAL_S", "60")),
        stand_in=env.get("LOCALIST_STAND_IN") == "1",
        max_model_len=int(env.get("LOCALIST_MAX_MODEL_LEN", "2048")),
        default_rho=float(env.get("LOCALIST_DEFAULT_RHO", "0")),
        max_blocks=int(env.get("LOCALIST_MAX_BLOCKS", str(MAX_BLOCKS))),
        admin_token=env.get("LOCALIST_ADMIN_KEY") or None,
        host=env.get("LOCALIST_HOST") or None,
        allow_dev_mode_on_network=env.get("LOCALIST_ALLOW_DEV_MODE_ON_NETWORK") == "1",
        max_header_bytes=int(env.get("LOCALIST_MAX_HEADER_BYTES", str(transport.MAX_HEADER_BYTES))),
        max_body_bytes=int(env.get("LOCALIST_MAX_BODY_BYTES", str(transport.MAX_BODY_BYTES))),
    )


def app_from_env() -> FastAPI:
    return create_app(settings_from_env())
