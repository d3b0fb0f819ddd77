"""The default model's results table over the dial, regenerated from shipped weights.

For every test example and dial value: greedy generation with the reference localist model, exact
match against the generator's answer, whether the answer cites the target block's id (the pointer
alone, whatever outcome follows), and the product's own metrics (docs/theory.md §3, via
:mod:`localist.model.metrics`) with the ground-truth target block — pointer fidelity and attention
entropy. The μ = 0 twin, when present, gets the same rows, so the penalty's effect is measured.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from localist.model.data import citation, encode, examples
from localist.model.attention import BlockStats
from localist.model.blocks import BlockTable
from localist.model.metrics import metrics_for_table
from localist.model.reference import LocalistBatch, ReferenceLM
from localist.model.train import LAYOUT_FILE, load_layout

DEFAULT_RHOS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
MAX_NEW_TOKENS = 16  # answers ("Case: instalment plan [R42]: escalate" + EOS, 10 tokens) are shorter
COLUMNS = ("exact_match", "cited_id", "pointer_fidelity", "entropy_nats", "block_entropy_nats")


@torch.no_grad()
def generate_over_dial(lm: ReferenceLM, table: BlockTable, rhos: Sequence[float], max_new_tokens: int
                       ) -> list[tuple[list[int], BlockStats]]:
    """Greedy generation of one prompt at several dial values at once (one batch row per ρ).

    The same computation as :meth:`ReferenceLM.generate`, batched so that a table over the dial
    costs one pass; each row is cut at its first EOS, stats [T, L, H, G] likewise.
    """
    n, L = len(rhos), lm.num_layers
    batch = LocalistBatch.from_tables([table] * n, [[r] * L for r in rhos])
    input_ids = torch.tensor([table.token_ids] * n)
    response = torch.full((n,), table.response_id)
    past, tokens, per_step = None, [], []
    for _ in range(max_new_tokens):
        out = lm.model(input_ids=input_ids, localist=batch, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].float().argmax(-1)
        per_step.append([batch.stats[layer] for layer in range(L)])
        tokens.append(token)
        if bool((torch.stack(tokens) == lm.tokenizer.eos_token_id).any(0).all()):
            break
        input_ids = token.view(n, 1)
        batch.extend(response)
    results = []
    for row in range(n):
        seq = [int(t[row]) for t in tokens]
        T = seq.index(lm.tokenizer.eos_token_id) + 1 if lm.tokenizer.eos_token_id in seq else len(seq)
        stack = lambda name: torch.stack([torch.stack([getattr(s, name)[row, :, -1] for s in layers])  # noqa: E731
                                          for layers in per_step[:T]])
        results.append((seq[:T], BlockStats(stack("log_mass"), stack("mass"), stack("inner_entropy"))))
    return results


def _training_meta(path: Path) -> dict:
    meta = path / LAYOUT_FILE
    return json.loads(meta.read_text())["training"] if meta.exists() else {}


def evaluate_model(path: str | Path, rhos: Sequence[float], split: str, count: int, seed: int | None = None,
                   progress: bool = False) -> dict:
    """One row per dial value: means over ``count`` examples of ``split``."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model: no config.json in {path}")
    meta = _training_meta(path)
    seed = meta.get("seed", 0) if seed is None else seed
    kw = {k: meta[k] for k in ("min_blocks", "max_blocks") if k in meta}
    lm = ReferenceLM.from_pretrained(path)
    layout = load_layout(path)
    sums = {rho: dict.fromkeys(COLUMNS, 0.0) for rho in rhos}
    counted = {rho: dict.fromkeys(COLUMNS, 0) for rho in rhos}
    for ex in tqdm(list(examples(seed, split, count, **kw)), disable=not progress, desc=path.name):
        enc = encode(ex, lm.tokenizer, layout)
        for rho, (tokens, stats) in zip(rhos, generate_over_dial(lm, enc.table, rhos, MAX_NEW_TOKENS)):
            text = lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            m = metrics_for_table(stats, enc.table, target=enc.target_block, rho=rho)
            # the citation alone: the answer names the target's id (the pointer), right or wrong outcome
            values = {"exact_match": float(text == ex.answer), "cited_id": float(citation(ex.target) in text),
                      "pointer_fidelity": m.pointer_fidelity,
                      "entropy_nats": m.entropy_nats, "block_entropy_nats": m.block_entropy_nats}
            for k, v in values.items():
                if v is not None and not math.isnan(v):
                    sums[rho][k] += v
                    counted[rho][k] += 1
    rows = []
    for rho in rhos:
        row = {"rho": rho}
        row.update({k: (sums[rho][k] / counted[rho][k] if counted[rho][k] else None) for k in COLUMNS})
        rows.append(row)
    return {"model": path.name, "mu": meta.get("mu"), "split": split, "examples": count, "seed": seed, "rows": rows}


def evaluate(model: str | Path, twin: str | None = "auto", rhos: Sequence[float] = DEFAULT_RHOS,
             split: str = "test", count: int = 400, seed: int | None = None, progress: bool = False) -> dict:
    """The card's table: the model and (if any) its μ = 0 twin, at every dial value."""
    model = Path(model)
    for r in rhos:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"rho: every value must lie in [0, 1], got {r}")
    if count < 1:
        raise ValueError(f"examples: must be ≥ 1, got {count}")
    twin_path = model / "mu0" if twin == "auto" else (None if twin in (None, "none") else Path(twin))
    out = {"model": evaluate_model(model, rhos, split, count, seed, progress)}
    if twin_path is not None and (twin_path / "config.json").exists():
        out["twin"] = evaluate_model(twin_path, rhos, split, count, seed, progress)
    elif twin not in ("auto", None, "none"):
        raise FileNotFoundError(f"twin: no config.json in {twin_path}")
    return out


def compare_tables(expected: dict, actual: dict, tolerance: float = 0.02) -> list[str]:
    """Every number of ``expected`` that ``actual`` misses by more than ``tolerance``."""
    problems = []
    for which in ("model", "twin"):
        if which not in expected:
            continue
        if which not in actual:
            problems.append(f"{which}: missing")
            continue
        for want, got in zip(expected[which]["rows"], actual[which]["rows"]):
            for k in COLUMNS:
                a, b = want.get(k), got.get(k)
                if (a is None) != (b is None) or (a is not None and abs(a - b) > tolerance):
                    problems.append(f"{which} rho={want['rho']} {k}: card {a}, measured {b}")
    return problems


def format_table(table: dict) -> str:
    """Markdown rows: model / μ / ρ / exact match / cited id / fidelity / entropy (nats)."""
    lines = ["| model | μ | ρ | exact match | cited id | pointer fidelity | entropy H(a) nats | block entropy H(π) nats |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for which in ("model", "twin"):
        if which not in table:
            continue
        t = table[which]
        for row in t["rows"]:
            lines.append(f"| {t['model']} | {t['mu']} | {row['rho']} | {fmt(row['exact_match'])} | {fmt(row['cited_id'])} | "
                         f"{fmt(row['pointer_fidelity'])} | {fmt(row['entropy_nats'])} | "
                         f"{fmt(row['block_entropy_nats'])} |")
    return "\n".join(lines)
