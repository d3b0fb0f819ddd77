"""Server-sent event streams of a generation: the sync and async twins share one decoder."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx

from .contract import ChatCompletionChunk, LocalistResult, TokenAttribution, Usage, read
from .errors import error_from_body



@dataclass
class StreamDelta:
    """One streamed piece of a choice: its text and the generated tokens it carries, each with its
    attribution over the blocks (``LocalistResult.blocks`` gives their labels once the stream ends)."""

    choice: int
    text: str
    tokens: list[TokenAttribution]
    finish_reason: str | None = None


@dataclass
class _StreamState:
    """Decodes SSE lines into deltas; identical for the sync and async streams."""

    chunk_model: type
    texts: dict[int, str] = field(default_factory=dict)
    localist: LocalistResult | None = None
    usage: Usage | None = None
    id: str | None = None
    done: bool = False
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> list[StreamDelta]:
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return []
        if line or not self._data:  # comments, other fields, or a blank line between events
            return []
        data, self._data = "\n".join(self._data), []
        if data == "[DONE]":
            self.done = True
            return []
        payload = json.loads(data)
        if "error" in payload and "choices" not in payload:
            raise error_from_body(payload, status_code=None)
        chunk = read(self.chunk_model, payload)
        self.id = chunk.id
        self.usage = chunk.usage or self.usage
        self.localist = chunk.localist or self.localist
        deltas = []
        for choice in chunk.choices:
            text = (choice.delta.content or "") if isinstance(chunk, ChatCompletionChunk) else choice.text
            self.texts[choice.index] = self.texts.get(choice.index, "") + text
            tokens = choice.localist.tokens if choice.localist else []
            if text or tokens or choice.finish_reason:
                deltas.append(StreamDelta(choice.index, text, list(tokens), choice.finish_reason))
        return deltas

    def text(self, choice: int = 0) -> str:
        return self.texts.get(choice, "")

    @property
    def audit_id(self) -> str | None:
        return self.localist.audit_id if self.localist else None


class Stream(_StreamState):
    """Iterate for :class:`StreamDelta` items; afterwards ``localist``, ``usage``, ``text()`` and
    ``audit_id`` hold the whole response. Closing early (``close()`` or leaving a ``with``) aborts
    the generation on the server."""

    def __init__(self, response: httpx.Response, chunk_model: type):
        super().__init__(chunk_model)
        self._response = response

    def __iter__(self) -> Iterator[StreamDelta]:
        try:
            for line in self._response.iter_lines():
                yield from self.feed(line)
                if self.done:
                    break
        finally:
            self.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncStream(_StreamState):
    """The async twin of :class:`Stream` (``async for``, ``async with``)."""

    def __init__(self, response: httpx.Response, chunk_model: type):
        super().__init__(chunk_model)
        self._response = response

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        try:
            async for line in self._response.aiter_lines():
                for delta in self.feed(line):
                    yield delta
                if self.done:
                    break
        finally:
            await self.close()

    async def close(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
