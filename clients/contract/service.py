"""Errors, the served model, health and API keys."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import DialScope, RequestModel, WireModel


class ErrorBody(WireModel):
    message: str
    type: str = Field(description="invalid_request_error | authentication_error | permission_error | "
                      "not_found_error | rate_limit_error | server_error")
    param: str | None = Field(None, description="Dotted path of the offending request field, e.g. `locality[2]`.")
    code: str | None = None


class ErrorResponse(WireModel):
    error: ErrorBody


class CheckpointFile(WireModel):
    name: str
    sha256: str


class Provenance(WireModel):
    """What produced an answer: the checkpoint as it was brought to this host, and how the engine ran it.
    Computed once when the engine starts; every audit record carries it."""

    checkpoint_sha256: str = Field(
        description="The checkpoint's identity, from its input files, never from weights converted or merged "
        "on this host: the file's SHA-256 when it is one file (a GGUF file, one `model.safetensors`), else the "
        "SHA-256 of the files' `sha256sum` listing (`<sha256>  <name>` lines sorted by name).")
    checkpoint_format: str = Field(description="`safetensors`, `bin` (PyTorch), `gguf` (converted on this host) or "
                                   "`gguf+lora` (a GGUF base with a LoRA adapter, merged on this host).")
    checkpoint_files: list[CheckpointFile] = Field(description="The input files and their SHA-256, by name.")
    dtype: str = Field(description="The dtype the engine computes in.")
    attention_isa: str = Field(description="The KV-cache layout / kernel ISA vLLM's CPU attention chose "
                               "(`vec`, `vec16`, `amx`; read from the engine's attention layers).")
    tensor_parallel_size: int
    vllm_version: str
    localist_version: str


class ProvenanceDifference(WireModel):
    field: str = Field(description="A `Provenance` field (`checkpoint_files` is covered by `checkpoint_sha256`).")
    recorded: str | int = Field(description="Its value in the record.")
    served: str | int = Field(description="Its value on the server now.")


class ModelInfo(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    num_layers: int
    num_heads: int
    max_model_len: int
    weights_sha256: str
    stand_in: bool = Field(description="True for a generated, untrained stand-in model.")
    dial_scope: DialScope = Field(description="The dial scope a request gets when it gives none (the model "
                                  "folder's `localist.json`, key `dial_scope`; else `all`).")
    provenance: Provenance


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(WireModel):
    status: Literal["ok", "degraded"]
    model: str
    engine: Literal["running", "restarting"] = Field(
        description="`restarting`: the engine died and a new one is starting; generation is answered 503 "
                    "with Retry-After meanwhile.")
    engine_requests: int = Field(description="Requests unfinished in the engine (running or waiting).")
    engine_stats_held: int = Field(description="Attention-statistics records the engine's workers still hold: "
                                   "each request frees its own when it ends, so 0 when the engine is idle.")
    engine_restarts: int = Field(description="Engines started after the engine died, since the server started.")
    engine_down_since: float | None = Field(description="Unix time the current outage began; null while serving.")
    engine_last_failure: str | None = Field(description="Why the engine last died (kept after it is back).")
    audit_store: Literal["ok", "unavailable"] = Field(
        description="`unavailable`: the audit database cannot be used (down, unreachable, disk full); generation "
                    "is answered 503 with Retry-After meanwhile, and the server recovers by itself once it is back.")
    audit_store_down_since: float | None = Field(description="Unix time the store's current outage began; null "
                                                 "while it is usable.")
    audit_store_last_failure: str | None = Field(description="Why the store was last unusable (kept after it is "
                                                 "back).")
    dev_mode: bool = Field(description="Local dev mode: the audit store has never held an API key, so every caller "
                           "is the admin of tenant `default`. False for good once any process created a key.")


STORED_INT_MAX = 2**31 - 1  # the audit store's INTEGER columns (32-bit in PostgreSQL)


class KeyCreate(RequestModel):
    tenant: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, min_length=1, max_length=256)
    admin: bool = Field(False, description="May manage keys and read every tenant's records.")
    rate_limit_per_min: int | None = Field(None, ge=1, le=STORED_INT_MAX,
                                           description="Requests per minute (per server process).")
    max_concurrency: int | None = Field(None, ge=1, le=STORED_INT_MAX,
                                        description="Concurrent generations (per server process).")


class KeyInfo(WireModel):
    key_id: str
    tenant: str
    name: str
    admin: bool
    created_us: int = Field(description="Unix microseconds.")
    revoked_us: int | None = Field(description="Unix microseconds; null while the key is active.")
    rate_limit_per_min: int | None = Field(description="Requests per minute (per server process); null: no limit.")
    max_concurrency: int | None = Field(description="Concurrent generations (per server process); null: no limit.")
    active: bool = Field(description="Not revoked.")


class KeyCreated(WireModel):
    token: str = Field(description="The secret, shown once: send it as `Authorization: Bearer <token>`.")
    key: KeyInfo


class KeyList(WireModel):
    object: Literal["list"] = "list"
    data: list[KeyInfo]
