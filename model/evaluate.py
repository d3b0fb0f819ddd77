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


# -- the rulebook task, served through vLLM (docs/data.md) ------------------------------------------
RULEBOOK_COLUMNS = (
    "joint_accuracy", "joint_ci95_low", "joint_ci95_high", "outcome_accuracy", "abstention_accuracy",
    "pointer_fidelity", "fidelity_null_rate", "candidate_mass", "entropy_nats", "block_entropy_nats",
    "wrong_block_share", "rho_star_median",
)
RULEBOOK_MAX_TOKENS = 24  # "Rule: KYC-12. Outcome: investigate." is 12 tokens with SmolLM2's tokenizer


REMOVED = "-target-removed"  # suffix of a case set: the cases with a target rule, that rule taken out


def without_target(case):
    """The faithfulness probe: the case with its target rule removed, so that no rule applies.

    The generator solves every case so that exactly the target applies (docs/data.md); without it
    the right answer is "no rule applies"."""
    from dataclasses import replace

    from localist.model.rulebooks import NO_RULE

    rules = tuple(r for r in case.rules if r.label != case.target)
    return replace(case, id=case.id + REMOVED, rules=rules, outcome=NO_RULE, target=None, logic=(), case=None)


def rulebook_cases(split: str, count: int, seed: int = 0) -> list:
    """The first ``count`` examples of a generated split, the hand-written cases (``handwritten``), or
    either's cases with a target rule with that rule removed (``<split>-target-removed``)."""
    from localist.model.rulebooks import examples as rulebook_examples, handwritten

    if split.endswith(REMOVED):
        return [without_target(c) for c in rulebook_cases(split.removesuffix(REMOVED), count, seed) if c.target]
    cases = handwritten.load() if split == "handwritten" else list(rulebook_examples(seed, split, count))
    return cases[:count]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def majority_baseline(cases: Sequence) -> float:
    """Joint accuracy of always giving the most frequent expected (outcome, rule) answer."""
    from collections import Counter

    counts = Counter((c.outcome, c.target) for c in cases)
    return counts.most_common(1)[0][1] / len(cases)


def answer_scores(case, text: str) -> dict[str, bool]:
    """Joint (outcome and rule label), outcome alone, and abstention (says "no rule applies" exactly when none does)."""
    from localist.model.rulebooks import NO_RULE, parse_answer

    outcome, label = parse_answer(text)
    right_outcome = outcome == case.outcome
    return {"joint": right_outcome and label == case.target, "outcome": right_outcome,
            "abstention": (outcome == NO_RULE) == (case.outcome == NO_RULE)}


class RulebookEngine:
    """One vLLM engine (float32, CPU) serving a model folder as localist, run over cases at one dial value."""

    def __init__(self, model_dir: str | Path, stop_token_ids: Sequence[int] = (), max_num_seqs: int = 16):
        from transformers import AutoTokenizer
        from vllm import LLM

        from localist.model.vllm_engine import engine_kwargs

        self.model_dir = Path(model_dir)
        self.stop_token_ids = list(stop_token_ids)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.llm = LLM(**engine_kwargs(model_dir, dtype="float32", max_model_len=1024, max_num_seqs=max_num_seqs,
                                       seed=0))
        self.num_layers = self.llm.llm_engine.model_config.hf_config.num_hidden_layers

    def close(self) -> None:
        """Stop the engine's core process (dropping the LLM object alone can leave it running)."""
        self.llm.llm_engine.engine_core.shutdown()

    def run(self, cases: Sequence, rho: float, scope: str = "all") -> list[dict]:
        """Per case: the answer, its scores and the response's metrics against the ground-truth target."""
        from vllm import SamplingParams

        from localist.model.blocks import LocalistParams, with_dial_scope
        from localist.model.rulebooks import block_table
        from localist.model.vllm_engine import cache_salt, fetch_stats_sync

        tables = [with_dial_scope(block_table(c, self.tokenizer), scope) for c in cases]
        prompts, samplings, ids = [], [], []
        for k, (case, table) in enumerate(zip(cases, tables)):
            params = LocalistParams(rho=[rho] * self.num_layers, blocks=table.to_wire(), request_id=f"{k}@{rho}@{scope}")
            salt = cache_salt(params)
            prompts.append({"prompt_token_ids": table.token_ids, **({"cache_salt": salt} if salt else {})})
            samplings.append(SamplingParams(max_tokens=RULEBOOK_MAX_TOKENS, temperature=0.0,
                                            stop_token_ids=self.stop_token_ids, extra_args={"localist": params.to_json()}))
            ids.append(params.request_id)
        outputs = self.llm.generate(prompts, samplings, use_tqdm=False)
        results = []
        for case, table, out, rid in zip(cases, tables, outputs, ids):
            text = out.outputs[0].text
            st = fetch_stats_sync(self.llm, rid, release=True)
            target = table.index(case.target) if case.target is not None else None
            m = metrics_for_table(BlockStats(st.log_mass, st.mass, st.inner_entropy), table, target=target, rho=rho)
            results.append({"id": case.id, "answer": text.strip(), **answer_scores(case, text),
                            "has_target": target is not None,
                            "pointer_fidelity": m.pointer_fidelity if target is not None else None,
                            "candidate_mass": m.candidate_mass, "entropy_nats": m.entropy_nats,
                            "block_entropy_nats": m.block_entropy_nats,
                            "wrong_block_share": m.theory.wrong_block_share if target is not None else None,
                            "rho_star_median": m.theory.rho_star_median if target is not None else None})
        return results


def rulebook_row(rho: float, results: Sequence[dict]) -> dict:
    """One table row from the per-case results at one dial value."""
    n = len(results)
    joint = sum(r["joint"] for r in results)
    low, high = wilson_interval(joint, n)
    targeted = [r for r in results if r["has_target"]]
    fid = [r["pointer_fidelity"] for r in targeted if r["pointer_fidelity"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    present = lambda key, rows: [r[key] for r in rows if r[key] is not None]  # noqa: E731
    rho_stars = sorted(present("rho_star_median", targeted))
    return {"rho": rho, "n": n, "joint_accuracy": joint / n, "joint_ci95_low": low, "joint_ci95_high": high,
            "outcome_accuracy": mean([float(r["outcome"]) for r in results]),
            "abstention_accuracy": mean([float(r["abstention"]) for r in results]),
            "pointer_fidelity": mean(fid), "fidelity_null_rate": 1 - len(fid) / len(targeted) if targeted else None,
            "candidate_mass": mean(present("candidate_mass", results)),
            "entropy_nats": mean(present("entropy_nats", results)),
            "block_entropy_nats": mean(present("block_entropy_nats", results)),
            "wrong_block_share": mean(present("wrong_block_share", targeted)),
            "rho_star_median": rho_stars[len(rho_stars) // 2] if rho_stars else None}


def evaluate_rulebooks(model_dir: str | Path, case_sets: dict[str, Sequence], rhos: Sequence[float] = DEFAULT_RHOS,
                       scopes: Sequence[str] = ("all",), responses: Path | None = None,
                       stop_token_ids: Sequence[int] = ()) -> dict:
    """``{case set: {scope: rows over ρ}}`` for one model folder (one engine for all of them); every
    response is appended to ``responses`` (JSON lines) when given."""
    engine = RulebookEngine(model_dir, stop_token_ids)
    tables: dict[str, dict[str, list]] = {}
    try:
        for set_name, cases in case_sets.items():
            for scope in scopes:
                rows = []
                for rho in rhos:
                    results = engine.run(cases, rho, scope)
                    rows.append(rulebook_row(rho, results))
                    if responses is not None:
                        with responses.open("a") as f:
                            for r in results:
                                f.write(json.dumps({"model": str(model_dir), "cases": set_name, "scope": scope,
                                                    "rho": rho, **r}) + "\n")
                tables.setdefault(set_name, {})[scope] = rows
    finally:
        engine.close()
    return tables


def compare_rulebook_tables(expected: dict, actual: dict, tolerance: float = 0.02) -> list[str]:
    """Every stored number (``{cases: {scope: rows}}``) the re-measured tables miss by more than
    ``tolerance``, for the (cases, scope, ρ) both hold."""
    problems = []
    for cases, scopes in actual.items():
        for scope, rows in scopes.items():
            stored = {r["rho"]: r for r in expected.get(cases, {}).get(scope, [])}
            for got in rows:
                want = stored.get(got["rho"])
                if want is None:
                    problems.append(f"{cases} {scope} rho={got['rho']}: not in the stored table")
                    continue
                for k in RULEBOOK_COLUMNS:
                    a, b = want.get(k), got.get(k)
                    if (a is None) != (b is None) or (a is not None and abs(a - b) > tolerance):
                        problems.append(f"{cases} {scope} rho={got['rho']} {k}: stored {a}, measured {b}")
    return problems


def format_rulebook_table(name: str, rows: Sequence[dict], baseline: float) -> str:
    """Markdown rows of one model's table at one scope."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | ρ | joint acc. [Wilson 95 %] | majority baseline | outcome acc. | abstention acc. | "
             "pointer fidelity (null rate) | candidate mass | H(a) nats | H(π) nats | wrong-block share | median ρ* |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {name} | {r['rho']} | {fmt(r['joint_accuracy'])} [{fmt(r['joint_ci95_low'])}, "
                     f"{fmt(r['joint_ci95_high'])}] | {fmt(baseline)} | {fmt(r['outcome_accuracy'])} | "
                     f"{fmt(r['abstention_accuracy'])} | {fmt(r['pointer_fidelity'])} ({fmt(r['fidelity_null_rate'])}) | "
                     f"{fmt(r['candidate_mass'])} | {fmt(r['entropy_nats'])} | {fmt(r['block_entropy_nats'])} | "
                     f"{fmt(r['wrong_block_share'])} | {fmt(r['rho_star_median'])} |")
    return "\n".join(lines)
