"""The vLLM engine inside the server: one AsyncLLM per process, plus what the audit needs about it.

The server talks to vLLM through this wrapper only, so the HTTP layer never depends on vLLM's
internals: prompts go in as token ids (the block table decides tokenisation, SPEC §1), outputs come
back as vLLM ``RequestOutput`` objects, and the per-token attention statistics of a request come back
through ``localist.model.vllm_engine.fetch_stats`` on :attr:`Engine.llm`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from localist.model.tokenizer import tokenizer_fingerprint

log = logging.getLogger("localist.server")


def weights_sha256(model_dir: Path) -> str:
    """One hash over every weight file (sorted by name), so a record pins the exact weights."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    import fastapi
    import torch
    import transformers
    import vllm

    from importlib.metadata import PackageNotFoundError, version

    try:
        localist_version = version("localist")
    except PackageNotFoundError:
        localist_version = "unknown"
    return {
        "localist": localist_version, "vllm": vllm.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "fastapi": fastapi.__version__,
        "python": platform.python_version(),
    }


@dataclass
class EngineConfig:
    model_dir: Path
    name: str
    max_model_len: int = 2048
    stand_in: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Engine:
    """AsyncLLM with the served model's identity (name, hashes, shape) attached."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.name = config.name
        self.model_dir = Path(config.model_dir)
        hf = json.loads((self.model_dir / "config.json").read_text())
        self.num_layers = int(hf["num_hidden_layers"])
        self.num_heads = int(hf["num_attention_heads"])
        self.max_model_len = min(config.max_model_len, int(hf.get("max_position_embeddings", config.max_model_len)))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.weights_sha256 = weights_sha256(self.model_dir)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.versions = software_versions()
        self._llm = None

    def start(self) -> None:
        """Start the engine core (tens of seconds on CPU)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from localist.model.vllm_engine import engine_args

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args = engine_args(
            self.model_dir,
            served_model_name=self.name,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=0.3,
            seed=self.config.seed,
            **self.config.extra,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        log.info("engine started: model %s from %s (%d layers, %d heads, max_model_len %d)",
                 self.name, self.model_dir, self.num_layers, self.num_heads, self.max_model_len)

    @property
    def llm(self):
        if self._llm is None:
            raise RuntimeError("engine not started")
        return self._llm

    @property
    def running(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def generate(self, prompt_token_ids: list[int], params, request_id: str, cache_salt: str | None = None
                 ) -> AsyncIterator[Any]:
        """Cumulative ``RequestOutput`` objects; cancelling the iteration aborts the request in vLLM."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(prompt_token_ids)}
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        return self.llm.generate(prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
