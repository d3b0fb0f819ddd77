"""Persistent audit store: hash-chained, signed records of every request, and the API keys.

See ``records`` for the record the server fills and how it is hashed, ``store`` for the store.
"""
from .keys import ApiKey
from .records import RecordError, canonical
from .signing import Checkpoint, load_public_key, load_signing_key, public_key_pem, read_checkpoint_log
from .store import ALL_TENANTS, AuditStore, BrokenLink, NotFound, Page, Receipt, RecordProof, VerifyReport

__all__ = [
    "ALL_TENANTS", "ApiKey", "AuditStore", "BrokenLink", "Checkpoint", "NotFound", "Page", "Receipt",
    "RecordError", "RecordProof", "VerifyReport", "canonical", "load_public_key", "load_signing_key", "public_key_pem",
    "read_checkpoint_log",
]
