"""Request ids and Prometheus metrics.

Each app owns its registry (not the process-global one that vLLM also writes to), so two apps in one
process — as in tests — do not collide. The engine's own state (up or restarting, restarts) is read
from the engine at each scrape, so the metrics cannot disagree with ``/health``.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("localist.server")

_RID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
UNIT = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Prometheus:
    """The app's Prometheus registry and its series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("localist_requests", "Generation requests by endpoint and outcome",
                                ["endpoint", "status"], registry=r)
        self.http = Counter("localist_http_responses", "HTTP responses by status code", ["code"], registry=r)
        self.tokens = Counter("localist_tokens", "Tokens processed", ["kind"], registry=r)
        self.latency = Histogram("localist_request_latency_seconds", "Generation request latency",
                                 ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.dial = Histogram("localist_dial_rho", "Mean dial ρ of generation requests", registry=r, buckets=UNIT)
        self.fidelity = Histogram("localist_pointer_fidelity", "Response-level pointer fidelity",
                                  registry=r, buckets=UNIT)

    def watch_engine(self, engine) -> None:
        self.registry.register(EngineCollector(engine))


class EngineCollector(Collector):
    """``localist_engine_up`` (1 serving, 0 down or restarting) and ``localist_engine_restarts_total``."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        yield GaugeMetricFamily("localist_engine_up", "1 while the engine serves, 0 while it is down or restarting",
                                value=1 if self.engine.running else 0)
        yield CounterMetricFamily("localist_engine_restarts", "Engines started after the engine died",
                                  value=self.engine.restarts)


class RequestIdMiddleware:
    """Takes the caller's ``x-request-id`` (if sane) or makes one; echoes it and logs each request."""

    def __init__(self, app: ASGIApp, prometheus: Prometheus):
        self.app, self.prometheus = app, prometheus

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else "req-" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                if not any(k.lower() == b"x-request-id" for k, _ in message["headers"]):
                    message["headers"].append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.prometheus.http.labels(str(status["code"])).inc()
            log.info("%s %s %s -> %s in %.1f ms", rid, scope["method"], scope["path"], status["code"],
                     (time.perf_counter() - start) * 1000)
