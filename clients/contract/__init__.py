"""The wire contract of the localist server: every request, response, metric and audit record, once.

The server builds and reads these classes, the client reads them, and ``openapi.yaml`` is generated
from them. One definition, two configurations:

- as defined (the server): a response or stored record (:class:`WireModel`) forbids unknown fields,
  so a misspelt field in the server is an error; a request (:class:`RequestModel`) is strict and
  ignores fields it does not know;
- as read (:func:`read`, the client; the server reading stored records): fields another version added
  are tolerated and an absent nullable field is null. The client validates the blocks it sends with
  ``extra="forbid"``, so a misspelt field fails before it is sent.

Only pydantic is needed: the client install has no torch and no vLLM. Modules: ``generation`` (OpenAI's
shapes with the locality extensions), ``metrics`` (the ``localist`` object), ``audit`` (records),
``service`` (errors, models, health, keys), ``rules`` (rules, rulebooks, anchor probes).
"""
from .audit import (
    AuditList,
    AuditRecord,
    AuditReport,
    AuditSummary,
    BrokenLink,
    PurgeRequest,
    PurgeResult,
    RecordChoice,
    RecordHashes,
    RecordMetrics,
    RecordOutput,
    RecordReplay,
    RecordRequest,
    RecordSampling,
    RecordTimestamps,
    RecordVerification,
    RedactRequest,
    ReplayChoice,
    ReplayResult,
    ReplaySampling,
    VerifyResult,
)
from .base import AuditLevel, DialScope, FinishReason, Preset, RecordStatus, RequestModel, WireModel, read
from .generation import (
    AssistantMessage,
    BlockSpec,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    LocalityFields,
    StreamOptions,
    TextContentPart,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .metrics import (
    BlockInfo,
    ChoiceMetrics,
    Dial,
    Entropy,
    LocalistDelta,
    LocalistResult,
    Theory,
    TokenAttribution,
    TokenMetrics,
)
from .rules import AnchorCheck, AnchorProbe, InjectedRule, Rule, RuleCreate, RuleList, RuleMember, RuleUse, RuleVersion
from .segmentation import Segmentation, SegmentationSpec, SplitDecision
from .service import (
    CheckpointFile,
    ErrorBody,
    ErrorResponse,
    Health,
    KeyCreate,
    KeyCreated,
    KeyInfo,
    KeyList,
    ModelInfo,
    ModelList,
    Provenance,
    ProvenanceDifference,
)

__all__ = [
    "Segmentation", "SegmentationSpec", "SplitDecision",
    "AnchorCheck", "AnchorProbe", "AssistantMessage", "AuditLevel", "AuditList", "AuditRecord", "AuditReport",
    "AuditSummary", "BlockInfo", "BlockSpec", "BrokenLink", "ChatChoice", "ChatChunkChoice",
    "ChatCompletionChunk", "ChatCompletionRequest", "ChatCompletionResponse", "ChatDelta", "ChatLogprobs",
    "ChatMessage", "CheckpointFile", "ChoiceMetrics", "CompletionChoice", "CompletionLogprobs",
    "CompletionRequest", "CompletionResponse", "Dial", "DialScope", "Entropy", "ErrorBody", "ErrorResponse",
    "FinishReason", "Health", "InjectedRule", "KeyCreate", "KeyCreated", "KeyInfo", "KeyList", "LocalistDelta",
    "LocalistResult", "LocalityFields", "ModelInfo", "ModelList", "Preset", "Provenance",
    "ProvenanceDifference", "PurgeRequest", "PurgeResult", "RecordChoice", "RecordHashes", "RecordMetrics",
    "RecordOutput", "RecordReplay", "RecordRequest", "RecordSampling", "RecordStatus", "RecordTimestamps",
    "RecordVerification", "RedactRequest", "ReplayChoice", "ReplayResult", "ReplaySampling", "RequestModel",
    "Rule", "RuleCreate", "RuleList", "RuleMember", "RuleUse", "RuleVersion", "StreamOptions",
    "TextContentPart", "Theory", "TokenAttribution", "TokenLogprob", "TokenMetrics", "TopLogprob", "Usage",
    "VerifyResult", "WireModel", "read",
]
