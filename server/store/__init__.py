"""Persistent audit store: hash-chained, signed records of every request, and the API keys.

See ``records`` for what a record must hold and how it is hashed, ``store`` for the store.
"""
from .availability import Outage, StoreUnavailable
from .chain import Receipt
from .keys import ApiKey
from .query import ALL_TENANTS, Page
from .records import AlreadyRedacted, NotFound, RecordError, canonical
from .signing import Checkpoint, load_public_key, load_signing_key, public_key_pem, read_checkpoint_log
from .store import AuditStore
from .verification import BrokenLink, RecordProof, VerifyReport

__all__ = [
    "ALL_TENANTS", "AlreadyRedacted", "ApiKey", "AuditStore", "BrokenLink", "Checkpoint", "NotFound", "Outage", "Page",
    "Receipt", "RecordError", "RecordProof", "StoreUnavailable", "VerifyReport", "canonical", "load_public_key",
    "load_signing_key", "public_key_pem", "read_checkpoint_log",
]
