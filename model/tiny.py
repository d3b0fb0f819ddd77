"""Tiny random HF checkpoints built on the fly, for tests and for serving before a trained model exists.

The shapes are vLLM-compatible on CPU (head_dim ≥ 32). Weights are random but seeded, so the
same call gives the same checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
    Qwen3ForCausalLM,
)

from localist.model.tokenizer import train_tokenizer

# A small corpus in the product's domain, so the tokenizer has sensible merges.
_CORPUS = [
    "Rule R1: A loan above 50000 EUR requires a second approval by the credit committee.",
    "Rule R2: Customers must present a valid identity document before an account is opened.",
    "Rule R3: Claims filed more than 30 days after the incident are not eligible.",
    "Rule R4: The daily dose of paracetamol must not exceed 4 grams for adults.",
    "Document D1: The applicant earns 3200 EUR per month and requests a loan of 60000 EUR.",
    "Question: Which rule applies to this case, and what is the decision? Answer: approve or reject.",
    "The reviewer checks which rules and documents an answer rests on.",
]

_ARCHES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write config, float32 safetensors and tokenizer to ``path``; return it."""
    if arch not in _ARCHES:
        raise ValueError(f"arch must be one of {sorted(_ARCHES)}, got {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_CORPUS * 20, vocab_size=vocab_size, min_frequency=1)
    config_cls, model_cls = _ARCHES[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
