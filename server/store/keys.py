"""API keys: random tokens, stored only as hashes, mapped to a tenant, carrying their limits.

Tokens are ``lk_<key_id>_<secret>``: the key id (public) finds the row, the secret's SHA-256 is
compared in constant time. The secret has 256 bits of entropy, so a fast hash is enough (no
password stretching is needed against guessing). Every change to the key table is a chained key
record pinning the key's whole row, so verification notices a key edited, added or swapped.
"""
from __future__ import annotations

import dataclasses
import hmac
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from localist.clients.contract.service import STORED_INT_MAX

from .chain import append, lock_head, now_us
from .query import ALL_TENANTS
from .records import MAX_TENANT, Entry, NotFound, RecordError, check_str, make_entry, sha256_hex
from .schema import api_keys, auth_state

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
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= STORED_INT_MAX:
        raise RecordError(f"{name}: must be an integer in [1, {STORED_INT_MAX}] or null, got {value!r}")
    return value


def key_from_row(row) -> ApiKey:
    return ApiKey(**{f.name: getattr(row, f.name) for f in dataclasses.fields(ApiKey)})


def key_event(action: str, key: ApiKey, stored_hash: str, actor: str | None) -> Entry:
    """The chained record of a key action; it pins the key's whole row (the stored token hash through a
    digest of it)."""
    return make_entry(f"key-{action}-{key.key_id}", "key", key.tenant, {
        "action": action, "key": key.to_dict(), "token_hash_digest": sha256_hex(stored_hash.encode()), "actor": actor})


def create_key(conn: Connection, *, tenant: str, name: str, admin: bool, rate_limit_per_min: int | None,
               max_concurrency: int | None, actor: str | None, token: str | None) -> tuple[str, ApiKey]:
    """A new key for ``tenant``: (token, key). ``token`` imports a configured one (the bootstrap admin
    key); importing the same token again returns the stored key."""
    check_str(tenant, "tenant", MAX_TENANT)
    check_str(name, "name", 256)
    if not isinstance(admin, bool):
        raise RecordError(f"admin: must be true or false, got {admin!r}")
    rate = check_limit(rate_limit_per_min, "rate_limit_per_min")
    conc = check_limit(max_concurrency, "max_concurrency")
    if token is None:
        kid, token = new_token()
    elif (kid := parse_token(token)) is None:
        raise RecordError("token: not a localist key (lk_<16 hex>_<secret of at least 32 characters>)")
    lock_head(conn)
    row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == kid)).first()
    if row is not None:
        if not token_matches(token, row.token_hash):
            raise RecordError(f"token: key id {kid} is taken by another key")
        return token, key_from_row(row)
    key = ApiKey(kid, tenant, name, admin, now_us(), None, rate, conc)
    stored_hash = token_hash(token)
    conn.execute(sa.insert(api_keys).values(token_hash=stored_hash, **key.to_dict()))
    conn.execute(sa.update(auth_state).where(auth_state.c.id == 1, auth_state.c.first_key_us.is_(None))
                 .values(first_key_us=key.created_us))
    append(conn, [key_event("create", key, stored_hash, actor)])
    return token, key


def list_keys(conn: Connection, *, tenant, include_revoked: bool) -> list[ApiKey]:
    q = sa.select(api_keys).order_by(api_keys.c.created_us, api_keys.c.key_id)
    if tenant is not ALL_TENANTS:
        q = q.where(api_keys.c.tenant == check_str(tenant, "tenant", MAX_TENANT))
    if not include_revoked:
        q = q.where(api_keys.c.revoked_us.is_(None))
    return [key_from_row(r) for r in conn.execute(q)]


def revoke_key(conn: Connection, key_id: str, *, tenant, actor: str | None) -> ApiKey:
    """Revoke (idempotent: an already revoked key is returned unchanged, with no new record)."""
    lock_head(conn)
    q = sa.select(api_keys).where(api_keys.c.key_id == key_id)
    if tenant is not ALL_TENANTS:
        q = q.where(api_keys.c.tenant == tenant)
    row = conn.execute(q).first()
    if row is None:
        raise NotFound(f"key {key_id!r} not found", "key_id")
    if row.revoked_us is not None:
        return key_from_row(row)
    key = dataclasses.replace(key_from_row(row), revoked_us=now_us())
    conn.execute(sa.update(api_keys).where(api_keys.c.key_id == key_id).values(revoked_us=key.revoked_us))
    append(conn, [key_event("revoke", key, row.token_hash, actor)])
    return key


def keys_ever_created(conn: Connection) -> bool:
    """Whether the store has ever held an API key, revoked ones included; once true, never false again.
    The mark set with the first key and any row of the key table each count, so clearing one of them
    by hand does not reopen the server's key-less dev mode; no mark row counts too."""
    row = conn.execute(sa.select(auth_state.c.first_key_us, sa.exists(sa.select(api_keys.c.key_id)).label("any_key"))
                       .where(auth_state.c.id == 1)).first()
    return row is None or row.first_key_us is not None or bool(row.any_key)


def verify_key(conn: Connection, token: str) -> ApiKey | None:
    """The active key this token is, or None (unknown, malformed, wrong secret, or revoked)."""
    kid = parse_token(token)
    if kid is None:
        return None
    row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == kid)).first()
    if row is None or row.revoked_us is not None or not token_matches(token, row.token_hash):
        return None
    return key_from_row(row)
