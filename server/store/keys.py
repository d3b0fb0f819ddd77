"""API keys: random tokens, stored only as hashes, mapped to a tenant, carrying their limits.

Tokens are ``lk_<key_id>_<secret>``: the key id (public) finds the row, the secret's SHA-256 is
compared in constant time. The secret has 256 bits of entropy, so a fast hash is enough (no
password stretching is needed against guessing).
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from .records import RecordError, sha256_hex

PREFIX = "lk"


@dataclass(frozen=True)
class ApiKey:
    """A key as stored (never its token). Limits are enforced by the server; None means unlimited."""

    key_id: str
    tenant: str
    name: str
    admin: bool
    created_us: int
    revoked_us: int | None
    rate_limit_per_min: int | None
    max_concurrency: int | None

    @property
    def active(self) -> bool:
        return self.revoked_us is None

    def to_dict(self) -> dict:
        return {
            "key_id": self.key_id, "tenant": self.tenant, "name": self.name, "admin": self.admin,
            "created_us": self.created_us, "revoked_us": self.revoked_us,
            "rate_limit_per_min": self.rate_limit_per_min, "max_concurrency": self.max_concurrency,
        }


def new_token() -> tuple[str, str]:
    """(key_id, token) for a fresh key."""
    kid = secrets.token_hex(8)
    return kid, f"{PREFIX}_{kid}_{secrets.token_urlsafe(32)}"


def parse_token(token: str) -> str | None:
    """The key id a token names, or None when it is not shaped like one of ours."""
    if not isinstance(token, str):
        return None
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or len(parts[1]) != 16 or len(parts[2]) < 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1]


def token_hash(token: str) -> str:
    return sha256_hex(token.encode())


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(token_hash(token), stored_hash)


def check_limit(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecordError(f"{name}: must be a positive integer or null, got {value!r}")
    return value
