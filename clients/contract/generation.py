"""OpenAI's chat and completion shapes, with the locality extensions of the request.

The request carries ``locality``, ``blocks``, ``target_block`` and ``audit``; the response carries the
``localist`` object (:mod:`.metrics`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import AuditLevel, DialScope, FinishReason, Preset, RequestModel, WireModel
from .metrics import LocalistDelta, LocalistResult
from .segmentation import SegmentationSpec

# --------------------------------------------------------------------------- locality extensions (request)


class BlockSpec(RequestModel):
    """A labelled rule or document to place in the prompt, or a character span marking one.

    Exactly one form per block:
    - ``text``: the text is placed in the prompt as its own block (chat: inside one system message
      put before the conversation; completions: before the prompt), in the order given;
    - ``start``/``end``: a character span ``[start, end)`` inside an existing text — the content of
      ``messages[message]`` (chat) or the prompt (completions).
    """

    label: str = Field(min_length=1, max_length=128, description="Unique name of the block, e.g. `R12`.")
    kind: str = Field("document", min_length=1, max_length=32,
                      description="`rule` and `document` are candidate blocks for pointer fidelity; any other "
                      "kind is context unless `evidence` is set. `sink` and `response` are reserved.")
    text: str | None = Field(None, description="Text of the block, placed in the prompt.")
    message: int | None = Field(None, ge=0, description="Chat only: index of the message holding the span.")
    start: int | None = Field(None, ge=0, description="Character offset where the span starts (inclusive).")
    end: int | None = Field(None, ge=0, description="Character offset where the span ends (exclusive).")
    pinned: bool = Field(False, description="Keep this block's base attention mass whatever the dial.")
    evidence: bool = Field(False, description="Count this block as a candidate whatever its kind.")


class LocalityFields(RequestModel):
    """Extension fields shared by both generation endpoints (send them with `extra_body=`)."""

    locality: float | list[float] | Preset | str | None = Field(
        None,
        description="The dial ρ ∈ [0, 1]: one number for all layers, a list with one value per layer, or a "
        "preset (`distributed` = 0, `balanced` = 0.5, `localist` = 0.9). Default: the server's (0).",
    )
    blocks: list[BlockSpec] | Literal["auto"] | None = Field(
        None, description="Labelled rules/documents. Default: one block per chat message (the prompt for completions). "
        "`auto`: each message (the prompt) starts as one block and is split where the served model gains more "
        "nats than the split costs (docs/theory.md §6; `segmentation` says how; decisions in the record)."
    )
    segmentation: SegmentationSpec | None = Field(
        None, description="With `blocks: \"auto\"`: the dial, split unit and extra cost of the segmentation "
        "(defaults: ρ_seg 0.9, sentence, 0 nats).")
    target_block: str | int | None = Field(
        None, description="Ground-truth block for pointer fidelity: a block label or a block id."
    )
    dial_scope: DialScope | None = Field(
        None,
        description="Which blocks the dial may move mass between (docs/theory.md §2 \"Dial scope\"): `all` = every "
        "block not pinned; `evidence` = every block that is not a candidate is pinned, so the dial only reshuffles "
        "the candidates' base mass. Default: the served model's (`GET /v1/models`).",
    )
    audit: AuditLevel = Field("summary", description="How much detail is returned and stored.")
    rules: list[str] | None = Field(
        None, max_length=64, description="Rules or rulebooks of the caller's tenant to inject (`/v1/rules`): "
        "`label` (latest version) or `label@version`; each rule becomes a `rule` block labelled "
        "`label@version`, placed before the request's own blocks, its text starting with its anchor header.")
    anchors: Literal["check"] | None = Field(
        None, description="`check`: probe the anchor of every placed candidate block (injected rules and text "
        "blocks) under the served model before answering; the result is in `localist.anchors`.")

    def block_specs(self) -> list[BlockSpec]:
        """The blocks the request spells out (none for `auto` or when absent)."""
        return [] if self.blocks is None or self.blocks == "auto" else self.blocks


# --------------------------------------------------------------------------- OpenAI request fields


class StreamOptions(RequestModel):
    include_usage: bool = False


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = Field(None, min_length=1, max_length=128)

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(RequestModel):
    model: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, ge=-(2**62), le=2**62, description="Choice i uses seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence "
                             "(benchmarks, load tests).")


class ChatCompletionRequest(LocalityFields, _Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(LocalityFields, _Sampling):
    prompt: str | list[int] = Field(description="One prompt: a string or a list of token ids.")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


# --------------------------------------------------------------------------- OpenAI responses


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(WireModel):
    content: list[TokenLogprob] | None


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(WireModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class _Completion(WireModel):
    """What every completion object and stream event starts with."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = None


class ChatCompletionResponse(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    localist: LocalistResult

    @property
    def text(self) -> str:
        """The first choice's text, the common case."""
        return self.choices[0].message.content or ""


class ChatDelta(WireModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(WireModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    localist: LocalistDelta | None = None


class ChatCompletionChunk(_Completion):
    """One SSE event. The last event before `[DONE]` has no choices and carries `localist` (and `usage` when
    `stream_options.include_usage`)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    localist: LocalistResult | None = None


class CompletionLogprobs(WireModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(WireModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    localist: LocalistDelta | None = Field(None, description="Streaming only: per-token attribution of this delta.")


class CompletionResponse(_Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = Field(description="Always set on full responses; on the last stream event only.")
    localist: LocalistResult | None = Field(description="Always set on full responses; on the last stream event only.")

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text
