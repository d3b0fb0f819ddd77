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
from localist.model.metrics import metrics_for_table, response_layout, response_metrics
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
        got = await fetch_stats(engine, self.engine_id, since=self.have, release=release)
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
        for k in FIELDS:  # keep one tensor per field: streaming calls this once per delta
            if len(self.parts[k]) > 1:
                self.parts[k] = [torch.cat(self.parts[k])]
        return BlockStats(*(self.parts[k][0][:num_tokens] for k in FIELDS))


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


def _delta_tokens(prep, stats: ChoiceStats, token_ids: list[int], start: int, end: int) -> list[S.TokenAttribution]:
    """Metrics of tokens [start, end) alone: their rows and their slice of the response's layout."""
    rows = stats.block_stats(end)
    cand, pinned, visible = response_layout(prep.table, end)
    cand = cand[start:end]
    # a query's own block is not its candidate: the first token may not point at the last prompt block
    target = prep.target if prep.target is not None and bool(cand[:, prep.target].any()) else None
    m = response_metrics(BlockStats(*(getattr(rows, k)[start:end] for k in FIELDS)), cand, pinned,
                         visible[start:end], target, prep.rho)
    return [S.TokenAttribution(index=start + j, token_id=token_ids[start + j], attribution=t["attribution"],
                               pointer_fidelity=t["pointer_fidelity"] if target is not None else None)
            for j, t in enumerate(m.to_dict("per_token")["tokens"])]


async def stream_tokens(engine, prep, token_ids: list[int], stats: ChoiceStats, start: int, end: int
                        ) -> list[S.TokenAttribution]:
    """Per-token attribution of tokens [start, end) for a streaming delta. Pointer fidelity is against the
    request's ``target_block``; without one it is null here (the response's top candidate block, the
    default target, is only known at the end: the final event carries it)."""
    if end <= start:
        return []
    await stats.pull(engine)
    return await asyncio.to_thread(_delta_tokens, prep, stats, token_ids, start, end)
