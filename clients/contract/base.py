"""The two kinds of wire model, and how a reader takes data another version may have written."""
from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

AuditLevel = Literal["summary", "per_token", "per_layer"]
Preset = Literal["distributed", "balanced", "localist"]
RecordStatus = Literal["completed", "aborted", "failed"]
FinishReason = Literal["stop", "length", "abort"]
DialScope = Literal["all", "evidence"]

M = TypeVar("M", bound=BaseModel)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a pair decodes to one character outside this range


class _Reading:
    """Validation context of :func:`read` (compared by identity)."""


READING = _Reading()


def _nullable(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


class WireModel(BaseModel):
    """What the server sends or stores: an unknown field is an error where it is built."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _absent_is_null(cls, data: Any, info: ValidationInfo) -> Any:
        """Under :func:`read`, an absent nullable field is null: streamed events leave nulls out, as
        OpenAI's do."""
        if info.context is READING and isinstance(data, dict):
            absent = [name for name, f in cls.model_fields.items()
                      if f.is_required() and name not in data and _nullable(f.annotation)]
            if absent:
                data = {**data, **dict.fromkeys(absent)}
        return data


def added_later(description: str) -> Any:
    """A stored field that records written before it existed lack: read as null there, and left out of
    the JSON while null, so an older record reads back as exactly the JSON that was hashed."""
    return Field(None, description=description, exclude_if=lambda value: value is None)


class RequestModel(BaseModel):
    """What the server reads from a caller: strict (no string-to-number coercion, so a wrong type is a
    400 naming the field); unknown fields are ignored, as OpenAI's SDK may send newer ones. The client
    validates what it sends with ``extra="forbid"``, so a misspelt field fails before sending."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*")
    @classmethod
    def _no_lone_surrogates(cls, value: Any) -> Any:
        """JSON escapes ``\\ud800``-``\\udfff`` outside a pair decode to lone UTF-16 surrogates: not
        Unicode text, which no tokenizer or database takes, so the field naming them is refused here."""
        for text in value if isinstance(value, list) else (value,):
            if isinstance(text, str) and LONE_SURROGATE.search(text):
                raise ValueError("contains a lone UTF-16 surrogate (an escape \\ud800-\\udfff outside a pair), "
                                 "which is not Unicode text")
        return value


def read(model: type[M], data: Any, *, keep_unknown: bool = True) -> M:
    """``model`` from data written by another version of the server: fields it does not know are kept
    (``keep_unknown``) or dropped, and an absent nullable field is null. The client reads every answer
    this way; the server reads stored records this way (dropping what it does not know)."""
    return model.model_validate(data, extra="allow" if keep_unknown else "ignore", context=READING)
