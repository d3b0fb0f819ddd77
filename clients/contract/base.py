"""The two kinds of wire model, and how a reader takes data another version may have written."""
from __future__ import annotations

import types
import typing
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

AuditLevel = Literal["summary", "per_token", "per_layer"]
Preset = Literal["distributed", "balanced", "localist"]
RecordStatus = Literal["completed", "aborted", "failed"]
FinishReason = Literal["stop", "length", "abort"]

M = TypeVar("M", bound=BaseModel)


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


class RequestModel(BaseModel):
    """What the server reads from a caller: strict (no string-to-number coercion, so a wrong type is a
    400 naming the field); unknown fields are ignored, as OpenAI's SDK may send newer ones. The client
    validates what it sends with ``extra="forbid"``, so a misspelt field fails before sending."""

    model_config = ConfigDict(strict=True, extra="ignore")


def read(model: type[M], data: Any, *, keep_unknown: bool = True) -> M:
    """``model`` from data written by another version of the server: fields it does not know are kept
    (``keep_unknown``) or dropped, and an absent nullable field is null. The client reads every answer
    this way; the server reads stored records this way (dropping what it does not know)."""
    return model.model_validate(data, extra="allow" if keep_unknown else "ignore", context=READING)
