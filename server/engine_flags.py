"""vLLM's engine flags on ``localist serve``, taken from vLLM's own argument definitions.

``localist serve`` accepts what ``vllm serve`` accepts for the engine (``--tensor-parallel-size``,
``--max-num-seqs``, ``--enable-prefix-caching``, ``--kv-cache-memory-bytes``, …), grouped as vLLM
groups them in ``--help``. ``--model``, ``--dtype`` and ``--max-model-len`` are localist's own flags
(the model may be a GGUF file), parsed before these; a few flags cannot be honoured by the localist
attention and are refused at start with the reason, before anything is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

# field → why the localist model cannot run with a non-default value of it.
REFUSED = {
    "speculative_config": "speculative decoding: draft tokens would bypass the localist attention and its statistics",
    "spec_method": "speculative decoding: draft tokens would bypass the localist attention and its statistics",
    "spec_model": "speculative decoding: draft tokens would bypass the localist attention and its statistics",
    "spec_tokens": "speculative decoding: draft tokens would bypass the localist attention and its statistics",
    "compilation_config": "torch.compile / CUDA graphs: the localist attention runs eagerly (enforce_eager)",
    "optimization_level": "torch.compile / CUDA graphs: the localist attention runs eagerly (enforce_eager)",
    "cudagraph_capture_sizes": "CUDA graphs: the localist attention runs eagerly (enforce_eager)",
    "max_cudagraph_capture_size": "CUDA graphs: the localist attention runs eagerly (enforce_eager)",
    "kv_cache_dtype": "a quantized KV cache: localist reads the unquantized cache only",
    "pipeline_parallel_size": "pipeline parallelism: use --tensor-parallel-size (every rank then holds every layer)",
    "data_parallel_size": "data parallelism: run one localist server per replica instead",
    "hf_overrides": "localist sets the architecture override itself (the checkpoint's class, served as localist)",
    "model_impl": "the localist classes are vLLM's own model implementations",
    "worker_extension_cls": "localist's worker extension returns the attention statistics",
    "enable_prompt_embeds": "localist requests need prompt token ids (the block table is over tokens)",
    "attention_backend": "localist takes over vLLM's CPU attention layer",
    "served_model_name": "the served name is --name (the name audit records carry)",
}


def engine_parser() -> argparse.ArgumentParser:
    """vLLM's engine arguments as a parent parser (no help of its own)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def engine_overrides(argv: list[str]) -> dict[str, Any]:
    """The engine fields set by ``argv`` (the command line's flags beyond localist's own) where they
    differ from vLLM's defaults; ValueError naming the flag and the reason for one the model cannot
    honour, or for an unknown flag."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = engine_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # argparse has printed the flag and why
        raise ValueError(f"engine flags {' '.join(argv)!r} are not vLLM's (see localist serve --help)") from None
    defaults = parser.parse_args([])
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    overrides = {}
    for name in sorted(fields):
        if not hasattr(args, name) or getattr(args, name) == getattr(defaults, name, None):
            continue
        if name == "enforce_eager":
            continue  # localist forces it on; the flag can only ask for what is done anyway
        if name in REFUSED:
            raise ValueError(f"--{name.replace('_', '-')}: {REFUSED[name]}")
        overrides[name] = getattr(args, name)
    return overrides
