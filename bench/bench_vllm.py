"""Localist vs stock vLLM on the same random weights, in one run (issue 4, "Speed").

A random Llama of realistic shape (d 768, 12 layers, 12 heads of 64, vocab 16384: ≈ 110 M
parameters, bf16) is written to a temp dir; one engine serves it stock, then one serves it as
``LocalistLlamaForCausalLM`` with mixed ρ and block layouts (statistics kept per token, fetched
and released after each batch, as the server does at summary level). Each configuration
(prompt length × concurrency) runs fresh prompts for 1 + S output tokens; TTFT (the whole batch's
prefill) and the decode step come from vLLM's per-request engine timestamps (see timed_batch), so
prefill never enters the decode figure. Both engines run side by side and alternate, each figure
the minimum over ``--repeats`` batches. Prefix caching is off in both (every prompt is new anyway).

    .venv/bin/python bench/bench_vllm.py            # 512 and 2048 tokens, 1 and 16 concurrent
    .venv/bin/python bench/bench_vllm.py --quick    # 512 tokens only, fewer decode steps

Writes bench/results/vllm_<mode>.json and .md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 16384


def make_model(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=12, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def layout(n: int, i: int) -> list[list]:
    """Eight blocks: rules and documents (one pinned rule) over the prompt."""
    cuts = [1 + (n - 2) * k // 7 for k in range(7)]
    kinds = ["rule", "rule", "document", "rule", "document", "rule"]
    return [[a, b, kinds[k], int(k == (i % 6)), 0] for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def dial(i: int, num_layers: int) -> list[float]:
    """Mixed dials across the batch: 0.5, 0.9, 1, a per-layer ramp and 0 (a lone request gets 0.5)."""
    choices = [0.5, 0.9, 1.0, None, 0.0]
    c = choices[i % len(choices)]
    return [round(l / (num_layers - 1), 3) for l in range(num_layers)] if c is None else [c] * num_layers


def timed_batch(llm, prompts, max_tokens: int, localist: bool, tag: str) -> dict:
    """Run one batch; TTFT and the decode step come from vLLM's per-request engine timestamps.

    TTFT = last first token − first admission (the whole batch's prefill). Decode step = (last
    token − first token) / (tokens − 1) of the request that started decoding last: every step in
    that window decodes the whole batch, and no prefill is subtracted from anything.
    """
    from vllm import SamplingParams

    from localist.model.blocks import LocalistParams
    from localist.model.vllm_engine import fetch_stats_sync

    params, ids = [], []
    for i, p in enumerate(prompts):
        extra = None
        if localist:
            rid = f"{tag}-{i}"
            ids.append(rid)
            extra = {"localist": LocalistParams(dial(i, 12), layout(len(p), i), rid).to_json()}
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                                     extra_args=extra))
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    for rid in ids:  # the server's summary path: fetch every token's statistics, then free them
        stats = fetch_stats_sync(llm, rid, release=True)
        assert stats.mass.shape[0] == max_tokens, (rid, stats.mass.shape)
    m = [o.metrics for o in outs]
    last_start = max(m, key=lambda x: x.first_token_ts)
    return {"wall_s": wall,
            "ttft_s": max(x.first_token_ts for x in m) - min(x.queued_ts for x in m),
            "decode_step_s": (last_start.last_token_ts - last_start.first_token_ts) / (max_tokens - 1)}


def start_engine(model_dir: Path, localist: bool):
    from vllm import LLM

    from localist.model.vllm_engine import engine_kwargs

    kwargs = dict(model=str(model_dir), dtype="bfloat16", max_model_len=2304, gpu_memory_utilization=0.5,
                  enforce_eager=True, enable_prefix_caching=False, skip_tokenizer_init=True, seed=0,
                  max_num_seqs=16, disable_log_stats=False)
    return LLM(**(engine_kwargs(model_dir, **kwargs) if localist else kwargs))


def measure(engines: dict, configs, steps: int, repeats: int, seed: int) -> dict:
    """Both engines stay up and take turns on every measurement, so load from other processes on
    the host hits both alike; each figure is the minimum over ``repeats`` fresh batches."""
    rng = random.Random(seed)
    new_prompts = lambda n, c: [[1] + [rng.randrange(3, VOCAB) for _ in range(n - 1)] for _ in range(c)]  # noqa: E731
    for name, llm in engines.items():
        timed_batch(llm, new_prompts(64, 2), 4, name == "localist", "warm")
    out: dict = {name: {} for name in engines}
    for n, c in configs:
        runs: dict = {name: [] for name in engines}
        for rep in range(repeats):
            for name, llm in engines.items():
                runs[name].append(timed_batch(llm, new_prompts(n, c), 1 + steps, name == "localist", f"{n}-{c}-{rep}"))
        for name in engines:
            ttft = min(r["ttft_s"] for r in runs[name])
            step = min(r["decode_step_s"] for r in runs[name])
            out[name][f"{n}x{c}"] = {"prompt_tokens": n, "concurrency": c, "ttft_s": ttft, "decode_step_s": step,
                                     "decode_tok_s": c / step, "runs": runs[name]}
            print(name, {k: v for k, v in out[name][f"{n}x{c}"].items() if k != "runs"}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512-token prompts only, 16 decode steps")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    configs = [(512, 1), (512, 16)] if args.quick else [(512, 1), (512, 16), (2048, 1), (2048, 16)]
    steps = 16 if args.quick else 32
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "bench-llama")
        engines = {"stock": start_engine(model_dir, False), "localist": start_engine(model_dir, True)}
        result = measure(engines, configs, steps, args.repeats, seed=1)
        del engines
        gc.collect()
    stock, localist = result["stock"], result["localist"]
    rows = []
    for key in stock:
        s, l = stock[key], localist[key]
        rows.append({**{k: s[k] for k in ("prompt_tokens", "concurrency")},
                     "stock": s, "localist": l,
                     "ttft_ratio": s["ttft_s"] / l["ttft_s"], "decode_ratio": s["decode_step_s"] / l["decode_step_s"]})
    mode = "quick" if args.quick else "full"
    command = "VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python bench/bench_vllm.py" + (" --quick" if args.quick else "")
    command += f" --repeats {args.repeats}"
    report = {"command": command, "decode_steps": steps, "repeats": args.repeats,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "host": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "python": sys.version.split()[0], "rows": rows,
              "note": "ratio = stock time / localist time (1.0 = same speed, higher is better for localist)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"vllm_{mode}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# localist vs stock vLLM ({mode})", "", f"`{command}` — {os.cpu_count()} CPUs, bf16, ≈110 M params, "
             f"mixed ρ (16 concurrent: 0.5, 0.9, 1, per-layer ramp, 0 in turn; 1 concurrent: 0.5), 8 blocks, per-token stats fetched and released. "
             f"Host load average (1, 5, 15 min) before {tuple(round(x, 1) for x in load_before)}, after "
             f"{tuple(round(x, 1) for x in report['load_average_after'])}: other jobs shared the 2 cores.", "",
             "| prompt | concurrent | TTFT stock s | TTFT localist s | TTFT ratio | decode step stock ms | "
             "decode step localist ms | decode ratio | decode tok/s stock | decode tok/s localist |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, l = r["stock"], r["localist"]
        lines.append(f"| {r['prompt_tokens']} | {r['concurrency']} | {s['ttft_s']:.2f} | {l['ttft_s']:.2f} | "
                     f"{r['ttft_ratio']:.2f}× | {1000 * s['decode_step_s']:.0f} | {1000 * l['decode_step_s']:.0f} | "
                     f"{r['decode_ratio']:.2f}× | {s['decode_tok_s']:.1f} | {l['decode_tok_s']:.1f} |")
    lines += ["", "Ratio = stock time / localist time (≥ 1 means localist is as fast or faster)."]
    (RESULTS / f"vllm_{mode}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
