"""Who is calling: API keys (stored hashed, in the audit store) → tenant, and per-key limits.

With no key configured the server runs in local dev mode: every caller is the admin of tenant
``default`` (logged loudly at start-up). Limits are per key and per process: requests per minute
(sliding window) and concurrent generations; either answers 429 with Retry-After.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from fastapi import Request

from localist.server.errors import ApiError
from localist.server.store import ALL_TENANTS, ApiKey

DEV_TENANT = "default"


@dataclass
class Principal:
    tenant: str
    key_id: str | None
    admin: bool
    key: ApiKey | None = None

    @property
    def scope(self):
        """What the caller may read in the store: an admin sees every tenant."""
        return ALL_TENANTS if self.admin else self.tenant

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}" if self.key_id else "dev-mode"


@dataclass
class _Usage:
    window: deque = field(default_factory=deque)
    active: int = 0


class Limiter:
    """Per-key request rate and concurrency, in this process (replicas each enforce their own)."""

    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}
        self._lock = asyncio.Lock()

    async def admit(self, key: ApiKey | None) -> None:
        """Count one request against the key's rate; 429 with Retry-After when over."""
        if key is None or key.rate_limit_per_min is None:
            return
        now = time.monotonic()
        async with self._lock:
            u = self._usage.setdefault(key.key_id, _Usage())
            while u.window and now - u.window[0] >= 60.0:
                u.window.popleft()
            if len(u.window) >= key.rate_limit_per_min:
                retry = max(1, math.ceil(60.0 - (now - u.window[0])))
                raise ApiError(429, f"rate limit of {key.rate_limit_per_min} requests per minute reached for "
                               f"key {key.key_id}", None, "rate_limit_exceeded", {"Retry-After": str(retry)})
            u.window.append(now)

    async def acquire(self, key: ApiKey | None) -> None:
        """Take one concurrency slot; 429 when the key already runs its maximum."""
        if key is None or key.max_concurrency is None:
            return
        async with self._lock:
            u = self._usage.setdefault(key.key_id, _Usage())
            if u.active >= key.max_concurrency:
                raise ApiError(429, f"key {key.key_id} already runs {u.active} concurrent requests (its limit)",
                               None, "concurrency_limit_exceeded", {"Retry-After": "1"})
            u.active += 1

    def release(self, key: ApiKey | None) -> None:
        if key is None or key.max_concurrency is None:
            return
        self._usage[key.key_id].active -= 1


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


async def principal(request: Request) -> Principal:
    """FastAPI dependency: the caller, or 401; also counts the request against the key's rate."""
    state = request.app.state
    if state.dev_mode:
        return Principal(DEV_TENANT, None, True)
    token = _token(request)
    if token is None:
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", None, "missing_api_key")
    key = await state.store.averify_key(token)
    if key is None:
        raise ApiError(401, "invalid or revoked API key", None, "invalid_api_key")
    await state.limiter.admit(key)
    return Principal(key.tenant, key.key_id, key.admin, key)


def require_admin(p: Principal) -> None:
    if not p.admin:
        raise ApiError(403, "this action needs an admin key", None, "admin_required")
