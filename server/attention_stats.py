"""The attention statistics of one choice, pulled from the engine as it generates and released once."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from localist.model.attention import BlockStats
from localist.server.engine import Engine

FIELDS = ("log_mass", "mass", "inner_entropy")


class StatsMissing(RuntimeError):
    """The engine generated tokens but reported no attention statistics for them."""


@dataclass
class ChoiceStats:
    """Statistics [T, L, H, G] of one engine request, fetched incrementally (streaming) and released once."""

    engine_id: str
    parts: list[BlockStats] = field(default_factory=list)
    have: int = 0
    released: bool = False

    async def pull(self, engine: Engine, release: bool = False) -> None:
        """Fetch the rows not yet held; with ``release`` the workers free the request's record."""
        if self.released:
            return
        got = await engine.fetch_stats(self.engine_id, since=self.have, release=release)
        self.released = release
        if got.mass.numel():
            self.parts.append(got)
            self.have += int(got.mass.shape[0])

    async def release(self, engine: Engine) -> None:
        await self.pull(engine, release=True)

    def tokens(self, start: int, end: int) -> BlockStats:
        """The statistics of generated tokens [start, end)."""
        if self.have < end:
            raise StatsMissing(f"engine request {self.engine_id}: statistics for {self.have} of {end} "
                               "generated tokens")
        if not self.parts:  # no token yet: metrics_for_table takes [0, 0, 0, 0]
            return BlockStats(*(torch.zeros(0, 0, 0, 0) for _ in FIELDS))
        if len(self.parts) > 1:  # keep one tensor per field: streaming reads once per delta
            self.parts = [BlockStats(*(torch.cat([getattr(p, k) for p in self.parts]) for k in FIELDS))]
        whole = self.parts[0]
        return BlockStats(*(getattr(whole, k)[start:end] for k in FIELDS))
