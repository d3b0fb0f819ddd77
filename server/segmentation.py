"""``blocks: "auto"``: the served weights segment a request's unmarked text (docs/theory.md §6).

The gains are computed by the reference localist model (``model/reference.py``) loaded from the served
model's own folder, float32, once at the first such request (docs/server.md says why it and not the
vLLM engine). The search (``model/segmentation.py``) runs in a worker thread, one request at a time, so
the event loop keeps serving; what it decided becomes the record's ``request.segmentation``.
"""
from __future__ import annotations

import threading

from localist.clients import contract as C
from localist.model.blocks import BlockTable
from localist.model.segmentation import DEFAULT_SHORTLIST, DEFAULT_WINDOW, Segmenter
from localist.server.engine import Engine, weights_sha256

SCORER = "reference localist model (model/reference.py) on the served weights, float32"


class ServedSegmenter:
    """Segments block tables with the served model's weights (loaded lazily, kept for the process)."""

    def __init__(self, engine: Engine, shortlist: int | None = DEFAULT_SHORTLIST, window: int = DEFAULT_WINDOW):
        self.engine, self.shortlist, self.window = engine, shortlist, window
        self._lm = None
        self._weights_hash: str | None = None
        self._lock = threading.Lock()  # one search at a time: each holds [rows, H, T, T] scores in memory

    def _model(self):
        if self._lm is None:
            from localist.model.reference import ReferenceLM

            self._lm = ReferenceLM.from_pretrained(self.engine.model_dir)
            self._weights_hash = weights_sha256(self.engine.model_dir)
        return self._lm

    def __call__(self, table: BlockTable, spec: C.SegmentationSpec, max_blocks: int
                 ) -> tuple[BlockTable, C.Segmentation]:
        with self._lock:
            segmenter = Segmenter(self._model(), spec.rho, self.shortlist, self.window, spec.unit)
            result = segmenter.segment(table, spec.extra_cost, spec.max_splits, max_blocks)
        decisions = [C.SplitDecision(block=d.block, at=d.at, candidates=d.candidates, scored=d.scored,
                                     gain_nats=d.gain_nats, cost_nats=d.cost_nats, accepted=d.accepted)
                     for d in result.decisions]
        return result.table, C.Segmentation(
            rho=spec.rho, unit=spec.unit, extra_cost=spec.extra_cost, scorer=SCORER, weights_hash=self._weights_hash,
            shortlist=self.shortlist, window=self.window, blocks_before=table.num_blocks,
            blocks_after=result.table.num_blocks, decisions=decisions, seconds=round(result.seconds, 3),
            sequences=result.sequences)
