"""Who is calling: API keys (stored hashed, in the audit store) → tenant, and per-key limits.

Local dev mode (``DevMode``): while the audit store has never held an API key, every caller is the
admin of tenant ``default``. It ends for good when any process creates a key in the store. Limits
are per key and per process: requests per minute (sliding window) and concurrent generations; either
answers 429 with Retry-After.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from fastapi import Request

from localist.server.errors import ApiError
from localist.server.store import ALL_TENANTS, ApiKey

log = logging.getLogger("localist.server")

DEV_TENANT = "default"
DEV_MODE_BANNER = (
    "LOCAL DEV MODE: this audit store has never held an API key, so no key is needed and every caller is "
    f"the admin of tenant '{DEV_TENANT}'. Dev mode ends for good the moment any process creates a key in "
    "this store (`localist keys create`, POST /v1/keys, another server on the same database): from then on "
    "every request needs a key, even after every key is revoked.")
DEV_MODE_ENDED = ("LOCAL DEV MODE ENDED: the audit store now holds an API key; every request needs a key from "
                  "now on, even after every key is revoked.")


class DevModeRefused(RuntimeError):
    """Dev mode on an address other than loopback, without allow_on_network."""


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or None (not known): may be reachable from other machines
        return False


def _where(host: str | None) -> str:
    return repr(host) if host is not None else "an address not known to be loopback"


def dev_mode_refusal(host: str | None, allow_on_network: bool) -> str | None:
    """Why dev mode may not serve on ``host`` (None: not known), or None where it may."""
    if is_loopback(host) or allow_on_network:
        return None
    return (f"refusing to start in local dev mode on {_where(host)}: this audit store has never held an API key, "
            "so every caller would be the admin of every tenant, and that address is reachable from other "
            "machines. Create a key first (`localist keys create --tenant admin --admin`, or set "
            "LOCALIST_ADMIN_KEY), serve on 127.0.0.1, or pass --allow-dev-mode-on-network to accept this.")


class DevMode:
    """Whether the server runs in local dev mode: only while its audit store has never held a key.

    Any process may create the first key (this server's API, ``localist keys create`` on the same
    database, another replica), so while dev mode is on the store is asked again on every request (one
    row); once off it is never asked again, because a store never forgets that it has had keys.
    """

    def __init__(self, store, on: bool) -> None:
        self._store = store
        self.on = on

    @classmethod
    async def start(cls, store, *, host: str | None, allow_on_network: bool) -> DevMode:
        """The mode at start-up, said in the log. Dev mode on a non-loopback ``host`` (None: not
        known) raises DevModeRefused unless ``allow_on_network``."""
        dev = cls(store, not await store.akeys_ever_created())
        if not dev.on:
            log.info("authentication on: this audit store has had API keys, so every request needs one")
            return dev
        refusal = dev_mode_refusal(host, allow_on_network)
        if refusal is not None:
            raise DevModeRefused(refusal)
        log.warning("=" * 78)
        log.warning(DEV_MODE_BANNER)
        if not is_loopback(host):
            log.warning("Dev mode is served on %s, reachable from the network (--allow-dev-mode-on-network).",
                        _where(host))
        log.warning("=" * 78)
        return dev

    async def refresh(self) -> bool:
        """Whether dev mode is still on, asking the store unless it already ended."""
        if self.on and await self._store.akeys_ever_created() and self.on:
            self.on = False
            log.warning(DEV_MODE_ENDED)
        return self.on


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
    if await state.dev_mode.refresh():
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
