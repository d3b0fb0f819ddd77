"""Block recruitment for unmarked text (model/segmentation.py, docs/theory.md §6) on real checkpoints:
the small test model (make_tiny_checkpoint) and the default model (models/localist-tiny)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from localist.model.blocks import Piece, table_from_pieces
from localist.model.recruitment import split_block, split_cost, split_points
from localist.model.reference import ReferenceLM
from localist.model.segmentation import (
    Segmenter, block_offsets, boundary_f1, clip, f1, paragraph_starts, planted_document,
)

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "localist-tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ReferenceLM:
    from localist.model.tiny import make_tiny_checkpoint

    return ReferenceLM.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("seg") / "tiny"))


@pytest.fixture(scope="module")
def default_lm() -> ReferenceLM:
    return ReferenceLM.from_pretrained(DEFAULT_MODEL)


def doc_table(lm, seed=0, segments=2, paragraphs=3):
    text, planted = planted_document(seed, segments, paragraphs)
    return table_from_pieces(lm.tokenizer, [Piece(text, "doc", "user")]), text, planted


def test_split_points_by_unit(tiny):
    table, text, _ = doc_table(tiny)
    tok = tiny.tokenizer
    paragraphs = split_points(table, tok, 1, "paragraph")
    sentences = split_points(table, tok, 1, "sentence")
    # a point after each blank line (not the last paragraph's end), moved past the line breaks
    assert [len(tok.decode(table.token_ids[:p], skip_special_tokens=True)) for p in paragraphs] == paragraph_starts(text)
    assert set(paragraphs) < set(sentences)
    assert all(tok.decode([table.token_ids[p]]).strip() for p in sentences)  # no block starts with whitespace
    assert split_points(table, tok, 0, "sentence") == [] and split_points(table, tok, 2, "sentence") == []
    with pytest.raises(ValueError, match="unit"):
        split_points(table, tok, 1, "word")


def test_every_gain_is_exactly_zero_at_rho_0(tiny):
    table, _, _ = doc_table(tiny)
    points = split_points(table, tiny.tokenizer, 1, "sentence")
    seg = Segmenter(tiny, 0.0, shortlist=None)
    assert len(points) > 5
    assert seg.exact_gains(table, [(1, p) for p in points]) == [0.0] * len(points)
    assert seg.proxy_gains(table, [(1, p) for p in points]) == [0.0] * len(points)
    result = seg.segment(table)
    assert result.table.num_blocks == table.num_blocks
    assert [d.accepted for d in result.decisions] == [False] and result.decisions[0].gain_nats == 0.0


def test_decisions_follow_the_exact_criterion(tiny):
    """Every recorded gain is NLL(before) − NLL(after) recomputed by full forwards; a split is accepted iff
    its gain beats ln(#points) + ln B'; accepted splits are applied in order; the count obeys the
    termination bound NLL₀ / ln 2."""
    table, _, _ = doc_table(tiny, seed=1, segments=3)
    seg = Segmenter(tiny, 0.9, shortlist=3, unit="sentence")
    result = seg.segment(table, max_splits=4)
    current, nll0 = table, seg.nll([table])[0]
    assert result.decisions
    for d in result.decisions:
        g = next(b.id for b in current.blocks if b.label == d.block)
        points = [p for h in range(current.num_blocks) for p in split_points(current, tiny.tokenizer, h, "sentence")]
        assert d.candidates == len(points) and d.scored == min(3, len(points))
        assert d.cost_nats == pytest.approx(split_cost(len(points), current.num_blocks + 1))
        assert d.gain_nats == pytest.approx(seg.exact_gains(current, [(g, d.at)])[0], abs=1e-6)
        assert d.accepted == (d.gain_nats > d.cost_nats)
        if d.accepted:
            current = split_block(current, g, d.at)
    assert [b.label for b in current.blocks] == [b.label for b in result.table.blocks]
    assert sum(d.accepted for d in result.decisions) <= nll0 / math.log(2)
    assert result.decisions[-1].accepted is False or len(result.decisions) == 4


def test_shortlist_covering_every_point_is_exact_greedy(tiny):
    table, _, _ = doc_table(tiny, seed=2)
    exact = Segmenter(tiny, 0.9, shortlist=None, unit="paragraph").segment(table)
    covering = Segmenter(tiny, 0.9, shortlist=64, unit="paragraph").segment(table)
    assert [(d.at, d.gain_nats, d.accepted) for d in exact.decisions] == [
        (d.at, d.gain_nats, d.accepted) for d in covering.decisions]


def test_clip_keeps_the_sink_and_the_blocks_inside_the_window(tiny):
    table, _, _ = doc_table(tiny)
    p = split_points(table, tiny.tokenizer, 1, "paragraph")[0]
    split = split_block(table, 1, p)
    window = clip(split, p - 5, p + 7)
    assert window.token_ids == [table.token_ids[0], *table.token_ids[p - 5:p + 7]]
    assert [(b.kind, b.start, b.end) for b in window.blocks] == [
        ("sink", 0, 1), ("user", 1, 6), ("user", 6, 13), ("response", 13, 13)]


def test_boundary_scoring():
    assert boundary_f1([10, 50], [11, 80]) == (1, 1, 1)
    assert f1(1, 1, 1) == pytest.approx(0.5) and f1(0, 3, 2) == 0.0
    text, planted = planted_document(3, 3, 3)
    starts = paragraph_starts(text)
    assert len(starts) == 8 and set(planted) < set(starts)
    assert f1(*boundary_f1(starts, planted)) == pytest.approx(2 * 2 / (2 * 2 + 6))  # the every-paragraph baseline


@pytest.mark.xfail(strict=True, reason="measured (bench/results/segmentation.jsonl): the default model's NLL at "
                   "ρ_seg does not single out planted topic boundaries; boundary F1 stays far below 0.9")
def test_planted_boundaries_found_by_the_default_model(default_lm):
    found, base = [0, 0, 0], [0, 0, 0]
    seg = Segmenter(default_lm, 0.9, shortlist=None, unit="paragraph")
    for seed in range(4):
        table, text, planted = doc_table(default_lm, seed, segments=3, paragraphs=3)
        result = seg.segment(table)
        found = [a + b for a, b in zip(found, boundary_f1(block_offsets(result.table, default_lm.tokenizer), planted))]
        base = [a + b for a, b in zip(base, boundary_f1(paragraph_starts(text), planted))]
    assert f1(*found) >= 0.9 and f1(*found) > f1(*base)
