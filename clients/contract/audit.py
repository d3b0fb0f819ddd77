"""Audit records, as stored and as returned: what was asked, what came out, the metrics, how to replay it.

A request record's payload has five parts (``request``, ``output``, ``metrics``, ``timestamps``,
``replay``) plus ``error``; the server builds each part as the class below and the store hashes
their JSON. Every part is null once the payload is erased (redaction, retention).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from .base import AuditLevel, DialScope, FinishReason, RecordStatus, RequestModel, WireModel, added_later
from .generation import Usage
from .metrics import BlockInfo, LocalistResult
from .rules import InjectedRule
from .segmentation import Segmentation
from .service import Provenance, ProvenanceDifference

# --------------------------------------------------------------------------- the payload of a request record


class RecordSampling(WireModel):
    """The sampling of the request, as the engine ran it (``seed`` as given: choice i used seed + i)."""

    n: int
    temperature: float
    top_p: float
    seed: int | None
    max_tokens: int
    stop: list[str]
    logprobs: int | None
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float


class RecordRequest(WireModel):
    model: str
    weights_hash: str = Field(description="SHA-256 over the served weight files.")
    endpoint: Literal["chat", "completions", "replay"]
    http_request_id: str | None
    replay_of: str | None = Field(description="The record this request replayed.")
    key_id: str | None = Field(description="The API key used (null in local dev mode).")
    rho: list[float] = Field(description="ρ per layer.")
    preset: str | None
    blocks: list[BlockInfo]
    target_block: int | None = Field(description="The requested target block's id.")
    audit: AuditLevel
    params: RecordSampling
    body: dict[str, Any] = Field(description="The request body as received (null fields left out).")
    rules: list[InjectedRule] | None = added_later("The injected rule versions with their texts (editing or "
                                                   "retiring a rule later changes nothing here).")
    dial_scope: DialScope | None = added_later("The dial scope used (the request's or the model's default); "
                                               "absent in records written before the field existed (they used `all`).")
    provenance: Provenance | None = added_later("The served checkpoint and engine; absent in records written "
                                                "before the field existed.")
    segmentation: Segmentation | None = added_later("`blocks: \"auto\"`: every split decision (position, exact gain, "
                                                    "cost, accepted); absent otherwise.")


class RecordChoice(WireModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None


class RecordOutput(WireModel):
    choices: list[RecordChoice]
    usage: Usage


class RecordMetrics(WireModel):
    fidelity: float | None = Field(description="Choice 0's all-heads pointer fidelity (indexed for filtering).")
    localist: LocalistResult | None = Field(description="The `localist` object returned to the caller; null when "
                                            "the request did not complete.")


class RecordTimestamps(WireModel):
    """Unix seconds."""

    received: float
    first_token: float | None
    finished: float


class ReplaySampling(WireModel):
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str]
    seed: int | None


class RecordReplay(WireModel):
    """What a replay needs to run the request again exactly."""

    prompt_token_ids: list[int]
    block_spans: list[list[int | str]] = Field(description="The block table: [start, end, kind, pinned, evidence, "
                                               "label] per block, over prompt tokens.")
    seed: int | None
    choice_seeds: list[int | None]
    engine_request_ids: list[str]
    sampling_params: list[ReplaySampling] = Field(description="Per choice.")
    localist_params: list[str] = Field(description="Per choice: the JSON the engine received.")
    cache_salt: str | None
    tokenizer_hash: str
    chat_template_hash: str
    versions: dict[str, str]


# --------------------------------------------------------------------------- records as listed and read


class RecordHashes(WireModel):
    payload: str = Field(description="SHA-256 of the payload (request, output, metrics, replay).")
    content: str = Field(description="SHA-256 over the indexed fields and the payload hash.")
    prev: str = Field(description="Chain hash of the previous record.")
    chain: str = Field(description="SHA-256 binding (seq, prev, content).")


class AuditSummary(WireModel):
    """One audit record's header, as listed (hashes and indexed fields)."""

    id: str
    seq: int
    kind: str = Field(description="request | key | rule | redaction | retention")
    tenant: str
    created_us: int
    created_at: str
    status: RecordStatus | None
    model: str | None
    rho_min: float | None
    rho_max: float | None
    fidelity: float | None = Field(description="Choice 0's all-heads pointer fidelity.")
    blocks: list[str] = Field(description="Labels of the request's blocks.")
    redacted: bool = Field(description="The payload was erased (the chain stays valid).")
    hashes: RecordHashes


class AuditRecord(AuditSummary):
    """A full audit record: what was asked, what came out, the metrics, and how to replay it.

    Payload fields are null once redacted."""

    request: RecordRequest | None = Field(None, description="Model, weights hash, dial, blocks, sampling params, "
                                          "messages/prompt as received.")
    output: RecordOutput | None = Field(None, description="Per choice: text, token ids, finish reason; usage.")
    metrics: RecordMetrics | None = Field(None, description="The `localist` object returned to the caller.")
    error: str | None = None
    timestamps: RecordTimestamps | None = None
    replay: RecordReplay | None = Field(None, description="Prompt token ids, block token spans, seed, tokenizer "
                                        "and chat-template hashes, software versions.")

    def localist(self) -> LocalistResult | None:
        """The ``localist`` object the caller got (None for a failed, aborted or redacted record)."""
        return self.metrics.localist if self.metrics is not None else None


class AuditList(WireModel):
    object: Literal["list"] = "list"
    data: list[AuditSummary]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page.")


class BrokenLink(WireModel):
    seq: int
    record_id: str | None
    reason: str


class VerifyResult(WireModel):
    ok: bool
    checked: int = Field(description="Records whose links were checked.")
    head_seq: int
    head_hash: str
    first_broken: BrokenLink | None
    signed_seq: int | None = Field(description="Highest seq covered by a valid trusted signature.")
    signatures_valid: int
    signatures_untrusted: int
    redacted: int


class ReplayChoice(WireModel):
    index: int
    matches: bool
    original_token_ids: list[int]
    replay_token_ids: list[int]


class ReplayResult(WireModel):
    """A stored request re-run on the served model from its replay data (itself stored as a new record)."""

    record_id: str
    replay_id: str = Field(description="Audit id of the replay's own record.")
    provenance_differences: list[ProvenanceDifference] | None = Field(
        description="Where the record's provenance differs from the server that replayed it (empty: none); null "
        "when the record has no provenance (written before the field existed).")
    matches: bool = Field(description="Every choice produced the same tokens.")
    choices: list[ReplayChoice]
    localist: LocalistResult = Field(description="Metrics of the replay.")


class RecordVerification(WireModel):
    """One record checked on its own: its hashes and the links from it up to the next signed checkpoint."""

    ok: bool
    record_id: str
    seq: int
    reason: str | None = Field(description="Why the check failed.")
    redacted: bool
    checkpoint_seq: int | None = Field(description="The trusted signed checkpoint committing to this record; "
                                       "null while none covers it yet.")
    links_checked: int


class AuditReport(WireModel):
    """The JSON form of the compliance report (the HTML report shows the same)."""

    record: AuditRecord
    verification: RecordVerification


class PurgeRequest(RequestModel):
    before: float | str = Field(description="Erase payloads of request records created before this time "
                                "(unix seconds or ISO 8601 with a zone).")
    tenant: str | None = Field(None, min_length=1, max_length=128, description="Only this tenant (default: all).")


class PurgeResult(WireModel):
    erased: int = Field(description="Payloads erased; one retention record lists them.")


class RedactRequest(RequestModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    reason: str = Field(min_length=1, max_length=4096, description="Why the payload is erased (kept in the chain).")
