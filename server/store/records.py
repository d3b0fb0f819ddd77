"""What the store requires of a request record, how it is validated, and the hashes the chain is built from.

A request record is a dict (keys; anything else is an error naming the key):
  tenant, status ("completed" | "aborted" | "failed"), error (required for "failed"), id (a fresh
  uuid when absent; unique in the store), and the payload parts request, output, metrics,
  timestamps, replay.
The server writes the payload parts as the wire contract's ``Record*`` classes
(``localist.clients.contract.audit``); the store reads only what it indexes and checks that: the
model, ρ per layer (``request.rho``, in [0, 1]), the block labels (``request.blocks[*].label``), the
dial scope and the checkpoint's hash in the provenance when present (records written before them lack
them), the pointer fidelity (``metrics.fidelity``), the timestamps, the replay's token ids and hashes.
Everything is hashed as canonical JSON (sorted keys): the payload to ``payload_hash``; the indexed
fields plus ``payload_hash`` to ``content_hash``; and ``(seq, prev_hash, content_hash)`` to
``chain_hash``. The chain therefore covers hashes only, and erasing a payload leaves it valid.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from localist.model.blocks import DIAL_SCOPES

STATUSES = ("completed", "aborted", "failed")
KINDS = ("request", "key", "rule", "redaction", "retention")
RECORD_KEYS = {"tenant", "status", "error", "id", "request", "output", "metrics", "timestamps", "replay"}
MAX_TENANT, MAX_ID, MAX_MODEL, MAX_LABEL = 128, 64, 256, 256


class RecordError(ValueError):
    """A record (or a query argument) is malformed; the message names the offending field."""


class AlreadyRedacted(RecordError):
    """The record's payload was already erased."""


class NotFound(LookupError):
    """No such record or key visible to the caller; ``field`` names the argument that named it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace; what every hash is taken over."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def link_hash(seq: int, prev_hash: str, content_hash: str) -> str:
    """The chain hash of record ``seq``: binds its position, its predecessor and its content."""
    return sha256_hex(f"{seq}|{prev_hash}|{content_hash}".encode())


@dataclass(frozen=True)
class Header:
    """The hashed, indexed part of a record (everything but the payload and the chain fields)."""

    record_id: str
    kind: str
    tenant: str
    created_us: int
    status: str | None
    model: str | None
    rho_min: float | None
    rho_max: float | None
    fidelity: float | None
    blocks: tuple[str, ...]
    payload_hash: str

    def content_hash(self) -> str:
        return sha256_hex(
            canonical(
                {
                    "v": 1,
                    "id": self.record_id,
                    "kind": self.kind,
                    "tenant": self.tenant,
                    "created_us": self.created_us,
                    "status": self.status,
                    "model": self.model,
                    "rho_min": self.rho_min,
                    "rho_max": self.rho_max,
                    "fidelity": self.fidelity,
                    "blocks": sorted(self.blocks),
                    "payload_hash": self.payload_hash,
                }
            )
        )


@dataclass(frozen=True)
class Entry:
    """A validated record waiting for its place in the chain: its header (``created_us`` is set under
    the append lock) and its payload."""

    unplaced: Header  # created_us 0
    body: bytes  # canonical JSON of the payload

    def header(self, created_us: int) -> Header:
        return dataclasses.replace(self.unplaced, created_us=created_us)


def check_json(value: Any, path: str) -> None:
    """Reject what canonical JSON cannot carry faithfully (orjson writes NaN as null, silently)."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise RecordError(f"{path}: integer {value} does not fit in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RecordError(f"{path}: must be a finite number, got {value!r}")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecordError(f"{path}: keys must be strings, got {k!r}")
            check_json(v, f"{path}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_json(v, f"{path}[{i}]")
        return
    raise RecordError(f"{path}: {type(value).__name__} is not JSON (convert arrays with .tolist())")


def check_str(value: Any, path: str, max_len: int, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise RecordError(f"{path}: must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise RecordError(f"{path}: longer than {max_len} characters")
    return value


def check_dict(value: Any, path: str, optional: bool = True) -> dict | None:
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise RecordError(f"{path}: must be an object, got {type(value).__name__}")
    return value


def _number(value: Any, path: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RecordError(f"{path}: must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _rho_range(rho: Any) -> tuple[float, float]:
    if isinstance(rho, (list, tuple)):
        if not rho:
            raise RecordError("request.rho: a per-layer list must not be empty")
        values = [_number(r, f"request.rho[{i}]", 0.0, 1.0) for i, r in enumerate(rho)]
        return min(values), max(values)
    value = _number(rho, "request.rho", 0.0, 1.0)
    return value, value


def _block_labels(blocks: Any) -> tuple[str, ...]:
    if blocks is None:
        return ()
    if not isinstance(blocks, (list, tuple)):
        raise RecordError("request.blocks: must be a list of blocks")
    labels = set()
    for i, block in enumerate(blocks):
        block = check_dict(block, f"request.blocks[{i}]", optional=False)
        labels.add(check_str(block.get("label"), f"request.blocks[{i}].label", MAX_LABEL))
    return tuple(sorted(labels))


def _check_replay(replay: dict) -> None:
    ids = replay.get("prompt_token_ids")
    if ids is not None and not (
        isinstance(ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    ):
        raise RecordError("replay.prompt_token_ids: must be a list of non-negative token ids")
    seed = replay.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RecordError(f"replay.seed: must be an integer or null, got {seed!r}")
    for key in ("tokenizer_hash", "chat_template_hash"):
        if replay.get(key) is not None:
            check_str(replay[key], f"replay.{key}", 512)
    versions = check_dict(replay.get("versions"), "replay.versions")
    for name, version in (versions or {}).items():
        check_str(version, f"replay.versions.{name}", 256)


def request_entry(record: Any) -> Entry:
    """Validate a request record (see the module docstring) and compute its payload hash."""
    record = check_dict(record, "record", optional=False)
    unknown = sorted(set(record) - RECORD_KEYS)
    if unknown:
        raise RecordError(f"record.{unknown[0]}: unknown field (allowed: {', '.join(sorted(RECORD_KEYS))})")
    tenant = check_str(record.get("tenant"), "record.tenant", MAX_TENANT)
    status = record.get("status")
    if status not in STATUSES:
        raise RecordError(f"record.status: must be one of {', '.join(STATUSES)}, got {status!r}")
    error = check_str(record.get("error"), "record.error", 1 << 20, optional=status != "failed")
    record_id = check_str(record.get("id"), "record.id", MAX_ID, optional=True) or uuid.uuid4().hex
    request = check_dict(record.get("request"), "request", optional=False)
    model = check_str(request.get("model"), "request.model", MAX_MODEL)
    check_str(request.get("weights_hash"), "request.weights_hash", 512)
    rho_min, rho_max = _rho_range(request.get("rho", 0.0))
    blocks = _block_labels(request.get("blocks"))
    check_dict(request.get("params"), "request.params")
    if request.get("dial_scope") not in (None, *DIAL_SCOPES):
        raise RecordError(f"request.dial_scope: must be one of {', '.join(DIAL_SCOPES)}, got {request['dial_scope']!r}")
    provenance = check_dict(request.get("provenance"), "request.provenance")
    if provenance is not None:
        check_str(provenance.get("checkpoint_sha256"), "request.provenance.checkpoint_sha256", 64)
    check_dict(record.get("output"), "output")
    metrics = check_dict(record.get("metrics"), "metrics") or {}
    fidelity = metrics.get("fidelity")
    fidelity = None if fidelity is None else _number(fidelity, "metrics.fidelity", 0.0, 1.0)
    for name, ts in (check_dict(record.get("timestamps"), "timestamps") or {}).items():
        if ts is not None:
            _number(ts, f"timestamps.{name}", 0.0, math.inf)
    replay = check_dict(record.get("replay"), "replay")
    if replay is not None:
        _check_replay(replay)
    payload = {k: record.get(k) for k in ("request", "output", "metrics", "error", "timestamps", "replay")}
    for key, value in payload.items():
        check_json(value, key)
    return make_entry(record_id, "request", tenant, payload, status=status, model=model,
                      rho_min=rho_min, rho_max=rho_max, fidelity=fidelity, blocks=blocks)


def make_entry(record_id: str, kind: str, tenant: str, payload: dict, *, status: str | None = None,
               model: str | None = None, rho_min: float | None = None, rho_max: float | None = None,
               fidelity: float | None = None, blocks: tuple[str, ...] = ()) -> Entry:
    body = canonical(payload)
    return Entry(Header(record_id, kind, tenant, 0, status, model, rho_min, rho_max, fidelity, blocks, sha256_hex(body)),
                 body)
