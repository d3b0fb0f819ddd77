"""Block recruitment for unmarked text (model/segmentation.py): boundary F1 on planted segments, and speed.

    python bench/segmentation.py f1 --model models/localist-tiny --docs 12 --rho 0.9 --unit paragraph
    python bench/segmentation.py speed --tokens 2000
    python bench/segmentation.py agreement --model models/localist-tiny --docs 4

``f1``: documents of ``--segments`` topics × ``--paragraphs`` paragraphs (``planted_document``), each
segmented from one block; boundary F1 (a boundary matches within 2 characters) against the baseline
that splits at every paragraph. ``speed``: a 2 000-token document on the small test model
(``make_tiny_checkpoint``, as the server tests serve it), segmented at sentence ends with the default
shortlist. ``agreement``: the shortlisted search (window proxy, default shortlist) against exact
greedy on the same documents at sentence points: how many rounds chose the same point and reached the
same verdict, and whether the final layouts agree. Each run appends its figures, the command and the host (CPU, cores, load average) to
``bench/results/segmentation.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from localist.model.blocks import Piece, table_from_pieces
from localist.model.reference import ReferenceLM
from localist.model.segmentation import (
    DEFAULT_SHORTLIST, Segmenter, block_offsets, boundary_f1, f1, paragraph_starts, planted_document,
)

RESULTS = Path(__file__).parent / "results" / "segmentation.jsonl"


def host() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0], "torch": torch.__version__}


def run_f1(args) -> dict:
    lm = ReferenceLM.from_pretrained(args.model)
    seg = Segmenter(lm, args.rho, shortlist=args.shortlist, unit=args.unit)
    found, base, docs = [0, 0, 0], [0, 0, 0], []
    for seed in range(args.docs):
        text, planted = planted_document(seed, args.segments, args.paragraphs)
        table = table_from_pieces(lm.tokenizer, [Piece(text, "doc", "user")])
        result = seg.segment(table, args.extra_cost)
        counts = boundary_f1(block_offsets(result.table, lm.tokenizer), planted)
        baseline = boundary_f1(paragraph_starts(text), planted)
        found = [a + b for a, b in zip(found, counts)]
        base = [a + b for a, b in zip(base, baseline)]
        docs.append({"seed": seed, "tokens": len(table.token_ids), "planted": planted,
                     "found": block_offsets(result.table, lm.tokenizer), "seconds": round(result.seconds, 2),
                     "decisions": [d.to_dict() for d in result.decisions]})
        print(f"doc {seed}: tp/fp/fn {counts}, {result.seconds:.1f} s", file=sys.stderr)
    return {"bench": "f1", "model": args.model, "rho": args.rho, "unit": args.unit, "shortlist": args.shortlist,
            "extra_cost": args.extra_cost, "segments": args.segments, "paragraphs": args.paragraphs,
            "docs": args.docs, "f1": round(f1(*found), 4), "tp_fp_fn": found,
            "baseline_every_paragraph_f1": round(f1(*base), 4), "baseline_tp_fp_fn": base, "per_doc": docs}


def run_speed(args) -> dict:
    from localist.model.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        lm = ReferenceLM.from_pretrained(make_tiny_checkpoint(Path(tmp) / "tiny"))
    text, seed = "", 0
    while len(lm.tokenizer(text)["input_ids"]) < args.tokens:
        text += planted_document(seed, 4, 3)[0] + "\n"
        seed += 1
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens - 1]
    table = table_from_pieces(lm.tokenizer, [Piece(lm.tokenizer.decode(ids), "doc", "user")])
    seg = Segmenter(lm, args.rho, shortlist=args.shortlist, unit=args.unit)
    result = seg.segment(table, args.extra_cost)
    return {"bench": "speed", "model": "make_tiny_checkpoint (as tests/conftest.py serves)", "tokens":
            len(table.token_ids), "rho": args.rho, "unit": args.unit, "shortlist": args.shortlist,
            "seconds": round(result.seconds, 2), "sequences": result.sequences, "tokens_run": result.tokens,
            "rounds": len(result.decisions), "accepted": sum(d.accepted for d in result.decisions),
            "candidates_first_round": result.decisions[0].candidates if result.decisions else 0,
            "within_60_s": result.seconds <= 60}


def run_agreement(args) -> dict:
    lm = ReferenceLM.from_pretrained(args.model)
    exact = Segmenter(lm, args.rho, shortlist=None, unit=args.unit)
    proxy = Segmenter(lm, args.rho, shortlist=args.shortlist, unit=args.unit)
    docs, same_layout, exact_s, proxy_s = [], 0, 0.0, 0.0
    for seed in range(args.docs):
        table = table_from_pieces(lm.tokenizer, [Piece(planted_document(seed, args.segments, args.paragraphs)[0],
                                                       "doc", "user")])
        a, b = exact.segment(table, args.extra_cost), proxy.segment(table, args.extra_cost)
        exact_s, proxy_s = exact_s + a.seconds, proxy_s + b.seconds
        same = [(d.at, d.accepted) for d in a.decisions] == [(d.at, d.accepted) for d in b.decisions]
        same_layout += same
        docs.append({"seed": seed, "tokens": len(table.token_ids), "same_decisions": same,
                     "exact": [(d.at, round(d.gain_nats, 3), d.accepted) for d in a.decisions],
                     "shortlist": [(d.at, round(d.gain_nats, 3), d.accepted) for d in b.decisions]})
        print(f"doc {seed}: same decisions {same}, {a.seconds:.1f} s exact, {b.seconds:.1f} s shortlist", file=sys.stderr)
    return {"bench": "agreement", "model": args.model, "rho": args.rho, "unit": args.unit, "shortlist": args.shortlist,
            "docs": args.docs, "same_decisions": same_layout, "exact_seconds": round(exact_s, 1),
            "shortlist_seconds": round(proxy_s, 1), "per_doc": docs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["f1", "speed", "agreement"])
    p.add_argument("--model", default="models/localist-tiny")
    p.add_argument("--docs", type=int, default=12)
    p.add_argument("--segments", type=int, default=3)
    p.add_argument("--paragraphs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--unit", choices=["sentence", "paragraph"], default=None)
    p.add_argument("--shortlist", type=int, default=DEFAULT_SHORTLIST, help="0: exact greedy")
    p.add_argument("--extra-cost", type=float, default=0.0)
    args = p.parse_args(argv)
    args.shortlist = args.shortlist or None
    args.unit = args.unit or ("paragraph" if args.what == "f1" else "sentence")
    began = time.time()
    out = {"f1": run_f1, "speed": run_speed, "agreement": run_agreement}[args.what](args)
    out.update(command="python bench/segmentation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               host=host(), wall_s=round(time.time() - began, 1), at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(out) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "per_doc"}, indent=1))


if __name__ == "__main__":
    main()
