"""vLLM plugin entry points (declared in pyproject.toml).

``register`` runs in every vLLM process (front end, engine core, workers) through the
``vllm.general_plugins`` group, so both the localist server and plain vLLM serving resolve the
localist architectures. The state processor (``vllm.logits_processors`` group) is loaded by vLLM
itself for every engine; it only reads requests that carry ``extra_args["localist"]``.
"""
from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from localist.model.vllm_engine import ARCHITECTURES

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"localist.model.vllm_model:{name}")
