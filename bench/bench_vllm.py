"""Localist vs stock vLLM on the same random weights, in one run (issue 4, "Speed"; issue 19).

A random Llama of realistic shape (d 768, 12 layers, 12 heads of 64, vocab 16384: ≈ 110 M
parameters, in ``--dtype``) is written to a temp dir; one engine serves it stock, one serves it as
``LocalistLlamaForCausalLM`` with mixed ρ and block layouts (statistics kept per token, fetched and
released after each batch, as the server does at summary level). Each configuration (prompt length
× concurrency) runs fresh prompts for 1 + S output tokens; TTFT (the whole batch's prefill) and the
decode step come from vLLM's per-request engine timestamps (see timed_batch), so prefill never
enters the decode figure. Prefix caching is off in both engines (every prompt is new anyway).

The host may be shared and noisy, so the two engines take turns: with both alive, batch by batch
(stock, localist, stock, localist, … on the same prompts); when the memory left after starting the
first engine cannot hold a second one, whole measurement rounds alternate instead (one engine
started, every configuration once, stopped; then the other), and the output says which was done.
Each figure is the median over ``--repeats`` batches, with its min and max; every result file
records the host (lscpu model and flags, AMX), the attention ISA vLLM chose in each engine, the
dtype, the thread binding, the load average and the exact command.

    .venv/bin/python bench/bench_vllm.py                   # 512 and 2048 tokens, 1 and 16 concurrent
    .venv/bin/python bench/bench_vllm.py --quick           # 512 tokens only, fewer decode steps
    .venv/bin/python bench/bench_vllm.py --dtype float32

Writes bench/results/vllm_<mode>_<dtype>_<amx|noamx>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 16384
NUM_LAYERS = 12
ENGINES = ("stock", "localist")
# Environment that decides the KV cache size and where vLLM's CPU worker runs its threads.
HOST_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS")
# Left free beyond a second engine's estimated size, for other processes on the host.
MEMORY_HEADROOM_GIB = 2.0
# vLLM's worker busy-polls its message queue for 1 s after its last message (shm_broadcast's
# busy_loop_s), bound to the same core as the other engine's worker: a batch starts after that.
IDLE_SETTLE_S = 1.5


def make_model(path: Path, dtype: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=12, num_key_value_heads=12, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype=dtype,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
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


def prompts_for(n: int, c: int, rep: int) -> list[list[int]]:
    """The batch both engines get for (prompt length, concurrency, repeat): the same in every mode."""
    rng = random.Random(f"{n}-{c}-{rep}")
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(n - 1)] for _ in range(c)]


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
            extra = {"localist": LocalistParams(dial(i, NUM_LAYERS), layout(len(p), i), rid).to_json()}
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                                     extra_args=extra))
    load_1min = os.getloadavg()[0]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    for rid in ids:  # the server's summary path: fetch every token's statistics, then free them
        stats = fetch_stats_sync(llm, rid, release=True)
        assert stats.mass.shape[0] == max_tokens, (rid, stats.mass.shape)
    m = [o.metrics for o in outs]
    last_start = max(m, key=lambda x: x.first_token_ts)
    return {"wall_s": wall, "load_1min_at_start": load_1min,
            "ttft_s": max(x.first_token_ts for x in m) - min(x.queued_ts for x in m),
            "decode_step_s": (last_start.last_token_ts - last_start.first_token_ts) / (max_tokens - 1)}


# --------------------------------------------------------------------------------------------------
# Host and engine facts.


def host_facts() -> dict:
    import torch
    import vllm

    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"})
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)}
    flags = fields.get("Flags", "").split()
    return {"cpu_model": fields.get("Model name", "unknown"), "cpus": os.cpu_count(), "cpu_flags": flags,
            "amx": {"amx_bf16", "amx_tile"} <= set(flags), "avx512_bf16": "avx512_bf16" in flags,
            "python": sys.version.split()[0], "torch": torch.__version__, "vllm": vllm.__version__,
            "env": {k: os.environ.get(k) for k in HOST_ENV}}


def code_version() -> dict:
    """The commit measured and the files of the measured code (model/, bench/ but its results) that differ
    from it."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True,  # noqa: E731
                                    cwd=Path(__file__).resolve().parent).stdout
    status = git("status", "--porcelain", "--", "../model", ".", ":(exclude)results")
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": [line[3:] for line in status.splitlines()]}


def worker_facts(worker) -> dict:
    """Runs inside vLLM's worker (``LLM.collective_rpc``): the ISA its CPU attention set on each layer
    (``layer.isa``), the threads the worker really runs with, and the resident memory of the worker
    and of its parent, the engine core (the KV cache is zero-filled at start, so it is included)."""
    import os

    import psutil
    import torch

    model = worker.get_model()
    rss = sum(psutil.Process(pid).memory_info().rss for pid in (os.getpid(), os.getppid()))
    return {"attention_isa": sorted({m.isa for m in model.modules() if hasattr(m, "isa")}),
            "torch_threads": torch.get_num_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "engine_rss_gib": rss / 2**30}


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def command_line() -> str:
    """The command as typed: the host environment variables that were set, the interpreter, argv."""
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):
        python = python.relative_to(Path.cwd())
    env = [f"{k}={shlex.quote(v)}" for k in HOST_ENV if (v := os.environ.get(k)) is not None]
    return " ".join(env + [shlex.join([str(python), *sys.argv])])


# --------------------------------------------------------------------------------------------------
# Engines and the two alternation schedules.


class Bench:
    def __init__(self, model_dir: Path, dtype: str, configs: list[tuple[int, int]], steps: int, repeats: int):
        self.model_dir, self.dtype, self.configs, self.steps, self.repeats = model_dir, dtype, configs, steps, repeats
        self.runs: dict = {name: {f"{n}x{c}": [] for n, c in configs} for name in ENGINES}
        self.engine_facts: dict = {}

    def start(self, name: str):
        from vllm import LLM

        from localist.model.vllm_engine import engine_kwargs

        kwargs = dict(model=str(self.model_dir), dtype=self.dtype, max_model_len=2304, gpu_memory_utilization=0.5,
                      enforce_eager=True, enable_prefix_caching=False, skip_tokenizer_init=True, seed=0,
                      max_num_seqs=16, disable_log_stats=False)
        llm = LLM(**(engine_kwargs(self.model_dir, **kwargs) if name == "localist" else kwargs))
        self.check_cache_holds_batches(llm)
        self.engine_facts.setdefault(name, llm.collective_rpc(worker_facts)[0])
        timed_batch(llm, prompts_for(64, 2, -1), 4, name == "localist", "warm")
        return llm

    def check_cache_holds_batches(self, llm) -> None:
        """A batch that does not fit the KV cache would queue or be preempted, and its TTFT and
        step would measure the scheduler, not attention: refuse to measure then."""
        cache = llm.llm_engine.vllm_config.cache_config
        need = max(c * -(-(n + 1 + self.steps) // cache.block_size) for n, c in self.configs)
        if cache.num_gpu_blocks < need:
            raise SystemExit(f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB holds "
                             f"{cache.num_gpu_blocks} cache blocks of {cache.block_size} {self.dtype} tokens; the "
                             f"largest batch needs {need}: raise VLLM_CPU_KVCACHE_SPACE")

    @staticmethod
    def stop(llm) -> None:
        llm.llm_engine.engine_core.shutdown()

    def batch(self, name: str, llm, n: int, c: int, rep: int) -> None:
        time.sleep(IDLE_SETTLE_S)
        run = timed_batch(llm, prompts_for(n, c, rep), 1 + self.steps, name == "localist", f"{n}-{c}-{rep}")
        self.runs[name][f"{n}x{c}"].append(run)
        print(f"{name} {n}x{c} repeat {rep}: TTFT {run['ttft_s']:.3f} s, decode step "
              f"{1000 * run['decode_step_s']:.1f} ms, load {run['load_1min_at_start']:.1f}", flush=True)

    def start_both(self) -> tuple[dict | None, str]:
        """Both engines if the memory available after starting the first holds a second one of the
        same resident size plus headroom, else None."""
        first = self.start("stock")
        available = mem_available_gib()
        need = self.engine_facts["stock"]["engine_rss_gib"] + MEMORY_HEADROOM_GIB
        facts = (f"{available:.1f} GiB available after starting the first engine; a second one needs "
                 f"≈ {need:.1f} GiB: its resident size with {MEMORY_HEADROOM_GIB:.0f} GiB headroom")
        if available < need:
            self.stop(first)
            return None, facts
        return {"stock": first, "localist": self.start("localist")}, facts

    def alternate_batches(self, engines: dict) -> None:
        for n, c in self.configs:
            for rep in range(self.repeats):
                for name in ENGINES:
                    self.batch(name, engines[name], n, c, rep)
        for llm in engines.values():
            self.stop(llm)

    def alternate_rounds(self) -> None:
        for rep in range(self.repeats):
            for name in ENGINES:
                llm = self.start(name)
                for n, c in self.configs:
                    self.batch(name, llm, n, c, rep)
                self.stop(llm)

    def measure(self, alternate: str) -> str:
        """Run every batch; returns how the engines alternated and why."""
        if alternate == "rounds":
            self.alternate_rounds()
            return "whole rounds alternate (asked with --alternate rounds)"
        engines, memory = self.start_both()
        if engines is None:
            self.alternate_rounds()
            return f"whole rounds alternate: two engines do not fit at once ({memory})"
        self.alternate_batches(engines)
        return f"batch by batch, both engines alive ({memory})"


# --------------------------------------------------------------------------------------------------
# Summary and result files.


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary_row(n: int, c: int, stock: list[dict], localist: list[dict]) -> dict:
    """Medians with min/max per engine, and the ratio stock / localist of each repeat's two batches
    (same prompts, run one after the other, so a load change between repeats cancels out)."""
    row: dict = {"prompt_tokens": n, "concurrency": c}
    for metric in ("ttft_s", "decode_step_s"):
        ratios = [a[metric] / b[metric] for a, b in zip(stock, localist)]
        row[metric] = {"stock": spread([r[metric] for r in stock]), "localist": spread([r[metric] for r in localist]),
                       "ratio": spread(ratios)}
    row["runs"] = {"stock": stock, "localist": localist}
    return row


def fmt(s: dict, scale: float, digits: int) -> str:
    return f"{scale * s['median']:.{digits}f} [{scale * s['min']:.{digits}f}–{scale * s['max']:.{digits}f}]"


def fmt_ratio(ratio: dict) -> str:
    return f"{ratio['median']:.2f}× [{ratio['min']:.2f}–{ratio['max']:.2f}]"


def markdown(report: dict) -> str:
    host, eng = report["host"], report["engines"]
    env = ", ".join(f"{k}={v if v is not None else 'unset'}" for k, v in host["env"].items())
    load = lambda x: ", ".join(f"{v:.1f}" for v in x)  # noqa: E731
    lines = [
        f"# localist vs stock vLLM ({report['mode']}, {report['dtype']}, {'AMX' if host['amx'] else 'no AMX'})", "",
        f"Command: `{report['command']}` (commit {report['code']['commit'][:10]}; uncommitted changes in "
        f"{', '.join(report['code']['uncommitted']) or 'none'})", "",
        f"- Host: {host['cpu_model']}, {host['cpus']} CPUs; AMX (amx_bf16, amx_tile): "
        f"{'yes' if host['amx'] else 'no'}; avx512_bf16: {'yes' if host['avx512_bf16'] else 'no'}. "
        f"Python {host['python']}, torch {host['torch']}, vLLM {host['vllm']}.",
        f"- Attention ISA vLLM chose (`layer.isa`): stock {', '.join(eng['stock']['attention_isa'])}, "
        f"localist {', '.join(eng['localist']['attention_isa'])}. dtype {report['dtype']}.",
        f"- Threads: {env}; vLLM's worker ran {eng['stock']['torch_threads']} torch thread(s) on CPU(s) "
        f"{eng['stock']['cpu_affinity']} (stock), {eng['localist']['torch_threads']} on "
        f"{eng['localist']['cpu_affinity']} (localist).",
        f"- Load average (1, 5, 15 min): before {load(report['load_average_before'])}, after "
        f"{load(report['load_average_after'])}; other processes shared the CPUs.",
        f"- Alternation: {report['alternation']}. {report['repeats']} repeats, {report['decode_steps']} decode "
        f"steps per request. ≈110 M-parameter random Llama; mixed ρ (16 concurrent: 0.5, 0.9, 1, per-layer "
        f"ramp, 0 in turn; 1 concurrent: 0.5), 8 blocks, per-token statistics fetched and released.", "",
        "Median [min–max] over the repeats. Ratio = stock time / localist time of each repeat's two batches "
        "(≥ 1: localist as fast or faster), median [min–max].", "",
        "| prompt | concurrent | TTFT stock s | TTFT localist s | TTFT ratio | decode step stock ms | "
        "decode step localist ms | decode ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        t, d = r["ttft_s"], r["decode_step_s"]
        lines.append(f"| {r['prompt_tokens']} | {r['concurrency']} | {fmt(t['stock'], 1, 2)} | {fmt(t['localist'], 1, 2)} "
                     f"| {fmt_ratio(t['ratio'])} | {fmt(d['stock'], 1000, 1)} | {fmt(d['localist'], 1000, 1)} | {fmt_ratio(d['ratio'])} |")
    lines += ["", f"CPU flags (lscpu): {' '.join(host['cpu_flags'])}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512-token prompts only, 16 decode steps")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="batches per engine and configuration (at least 3)")
    ap.add_argument("--alternate", choices=("auto", "rounds"), default="auto",
                    help="auto: batch by batch when both engines fit in memory, else whole rounds")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats: at least 3, for a median with a spread")
    command = command_line()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # collective_rpc sends worker_facts to vLLM's engine process by pickle; both processes are this run's own.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    configs = [(512, 1), (512, 16)] if args.quick else [(512, 1), (512, 16), (2048, 1), (2048, 16)]
    steps = 16 if args.quick else 32
    host, code = host_facts(), code_version()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(make_model(Path(tmp) / "bench-llama", args.dtype), args.dtype, configs, steps, args.repeats)
        alternation = bench.measure(args.alternate)
    mode = "quick" if args.quick else "full"
    report = {"mode": mode, "command": command, "dtype": args.dtype, "decode_steps": steps, "repeats": args.repeats,
              "alternation": alternation, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "host": host, "code": code, "engines": bench.engine_facts,
              "rows": [summary_row(n, c, bench.runs["stock"][f"{n}x{c}"], bench.runs["localist"][f"{n}x{c}"])
                       for n, c in configs],
              "note": "ratio = stock time / localist time per repeat (1.0 = same speed, higher is better for localist)"}
    stem = f"vllm_{mode}_{args.dtype}_{'amx' if host['amx'] else 'noamx'}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
