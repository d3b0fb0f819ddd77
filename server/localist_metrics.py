"""Per-choice attention statistics from the engine, turned into the wire's metric objects.

The statistics come from ``localist.model.vllm_engine.fetch_stats`` (per generated token, [T, L, H, G]);
every number is computed by ``localist.model.metrics`` — this module only fetches, accumulates and
shapes the records for ``schemas``. Metric computation is CPU work on tensors, so it runs in a thread.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from localist.model.attention import BlockStats
from localist.model.metrics import metrics_for_table
from localist.model.vllm_engine import fetch_stats
from localist.server import schemas as S

FIELDS = ("log_mass", "mass", "inner_entropy")


class StatsMissing(RuntimeError):
    """The engine generated tokens but reported no attention statistics for them."""


@dataclass
class ChoiceStats:
    """The statistics of one engine request, fetched incrementally (streaming) and released once."""

    engine_id: str
    parts: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {k: [] for k in FIELDS})
    have: int = 0
    released: bool = False

    async def pull(self, engine, release: bool = False) -> None:
        """Fetch the rows not yet held; with ``release`` the worker frees the request's record."""
        if self.released:
            return
        got = await fetch_stats(engine.llm, self.engine_id, since=self.have, release=release)
        self.released = release
        if got.mass.numel():
            for k in FIELDS:
                self.parts[k].append(getattr(got, k))
            self.have += int(got.mass.shape[0])

    async def release(self, engine) -> None:
        await self.pull(engine, release=True)

    def block_stats(self, num_tokens: int) -> BlockStats:
        if self.have < num_tokens:
            raise StatsMissing(f"engine request {self.engine_id}: statistics for {self.have} of {num_tokens} "
                               "generated tokens")
        return BlockStats(*(torch.cat(self.parts[k])[:num_tokens] for k in FIELDS))


def _metrics_dict(prep, stats: ChoiceStats, level: str, num_tokens: int) -> dict:
    m = metrics_for_table(stats.block_stats(num_tokens), prep.table, prep.target, prep.rho)
    return m.to_dict(level)


def _with_tokens(engine, state, record: dict) -> dict:
    for tok in record.get("tokens") or ():
        tid = state.token_ids[tok["index"]]
        tok["token_id"] = tid
        tok["text"] = engine.tokenizer.decode([tid])
    return record


async def choice_metrics(engine, prep, state, stats: ChoiceStats) -> S.ResponseMetrics:
    """Response-level metrics of one choice at the request's audit level."""
    await stats.pull(engine)
    record = await asyncio.to_thread(_metrics_dict, prep, stats, prep.req.audit, len(state.token_ids))
    return S.ResponseMetrics(index=state.index, **_with_tokens(engine, state, record))


async def stream_tokens(engine, prep, token_ids: list[int], stats: ChoiceStats, start: int, end: int
                        ) -> list[S.TokenAttribution]:
    """Per-token attribution of tokens [start, end) for a streaming delta (pointer fidelity against the
    request's target, or the top candidate block so far)."""
    if end <= start:
        return []
    await stats.pull(engine)
    record = await asyncio.to_thread(_metrics_dict, prep, stats, "per_token", end)
    return [S.TokenAttribution(index=t["index"], token_id=token_ids[t["index"]], attribution=t["attribution"],
                               pointer_fidelity=t["pointer_fidelity"]) for t in record["tokens"][start:end]]
