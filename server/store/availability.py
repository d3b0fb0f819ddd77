"""Whether the database can be used now. An outage (the server down or unreachable, the disk full) is
not a bug: requests are refused with 503 and Retry-After while it lasts, and it ends by itself: a prober
thread tries a write every second and clears the outage once one commits. Nothing restarts.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
RETRY_AFTER_S = 2
# SQLite error names that mean "cannot use the file now", not "this statement is wrong".
_SQLITE_UNAVAILABLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN",
                       "SQLITE_READONLY")


class StoreUnavailable(RuntimeError):
    """The audit store cannot be read or written now (→ 503 with Retry-After); nothing was stored."""

    def __init__(self, reason: str, retry_after: int = RETRY_AFTER_S):
        super().__init__(f"the audit store is unavailable: {reason}")
        self.reason, self.retry_after = reason, retry_after


def is_outage(exc: BaseException) -> bool:
    """Whether a database error means the database is unusable now (rather than a wrong statement)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return False
    name = getattr(exc.orig, "sqlite_errorname", None)
    return name is None or name.startswith(_SQLITE_UNAVAILABLE)  # psycopg: every OperationalError


def _reason(exc: BaseException) -> str:
    """The driver's own message, first line (SQLAlchemy's wrapper adds the statement and a link)."""
    if isinstance(exc, StoreUnavailable):
        return exc.reason
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


@dataclass(frozen=True)
class Outage:
    since: float  # unix time of the first failure
    reason: str  # the latest failure


class Availability:
    """The outage state of one store; ``probe`` is a write that raises while the database is unusable."""

    def __init__(self, probe: Callable[[], None]):
        self._probe = probe
        self._lock = threading.Lock()
        self._outage: Outage | None = None
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        self.outages = 0  # since the store opened
        self.last_failure: str | None = None  # kept after the outage ended
        self.last_outage_s: float | None = None  # how long the last finished outage lasted

    @property
    def outage(self) -> Outage | None:
        return self._outage

    def failed(self, exc: BaseException) -> StoreUnavailable:
        """Note an outage (``exc``: the database error) and start probing; returns the error to raise."""
        reason = _reason(exc)
        with self._lock:
            if self._outage is None:
                self.outages += 1
                log.error("audit store unavailable: %s (requests are refused with 503 until it is back)", reason)
            self._outage = Outage(self._outage.since if self._outage else time.time(), reason)
            self.last_failure = reason
            if (self._prober is None or not self._prober.is_alive()) and not self._closed.is_set():
                self._prober = threading.Thread(target=self._probe_loop, name="localist-audit-prober", daemon=True)
                self._prober.start()
        return StoreUnavailable(reason)

    def ensure_available(self) -> None:
        """Raise StoreUnavailable during an outage (before any work is done for a request)."""
        outage = self._outage
        if outage is not None:
            raise StoreUnavailable(outage.reason)

    def _probe_loop(self) -> None:
        while not self._closed.wait(PROBE_INTERVAL_S):
            try:
                self._probe()
            except Exception as exc:  # noqa: BLE001 — still down: keep the newest reason
                if isinstance(exc, StoreUnavailable) or is_outage(exc):
                    with self._lock:
                        if self._outage is not None:
                            self._outage = Outage(self._outage.since, _reason(exc))
                    continue
                log.exception("probing the audit store failed unexpectedly")
                continue
            with self._lock:
                if self._outage is not None:
                    self.last_outage_s = time.time() - self._outage.since
                    log.warning("audit store available again after %.1f s", self.last_outage_s)
                self._outage = None
                self._prober = None
            return

    def close(self) -> None:
        self._closed.set()
        prober = self._prober
        if prober is not None:
            prober.join()
