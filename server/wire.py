"""Typed results of the model and the engine → the wire contract: the one place where they are converted.

``localist.model.metrics`` and ``localist.model.theory`` produce dataclasses of tensors and floats
(NaN where a metric is null); the engine produces :class:`~localist.server.engine.Generated`. This
module turns them into the contract's objects (null for NaN), at the audit level a request asked for.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from localist.clients import contract as C
from localist.model.blocks import AUDIT_LEVELS, BlockTable
from localist.model.metrics import ResponseMetrics
from localist.model.theory import TheoryReport
from localist.server.engine import Engine, Generated

LN2 = math.log(2.0)


def _json(t: Tensor) -> Any:
    """Tensor → nested lists of floats, NaN (a null metric) → None."""
    values = t.tolist()
    if not bool(torch.isnan(t).any()):
        return values

    def fix(x):
        return [fix(v) for v in x] if isinstance(x, list) else (None if math.isnan(x) else x)

    return fix(values)


def _null(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _bits(nats: float | None) -> float | None:
    return None if nats is None else nats / LN2


def provenance(engine: Engine) -> C.Provenance:
    """The served checkpoint (its input files) and how the engine runs it: what every record carries."""
    cp = engine.checkpoint
    return C.Provenance(
        checkpoint_sha256=cp.sha256, checkpoint_format=cp.format,
        checkpoint_files=[C.CheckpointFile(name=name, sha256=sha) for name, sha in cp.files],
        dtype=engine.dtype, attention_isa=engine.attention_isa, tensor_parallel_size=engine.tensor_parallel_size,
        vllm_version=engine.versions["vllm"], localist_version=engine.versions["localist"])


def block_infos(table: BlockTable) -> list[C.BlockInfo]:
    return [C.BlockInfo.model_validate(b, from_attributes=True) for b in table.blocks]


def theory(report: TheoryReport) -> C.Theory:
    return C.Theory(**{k: _null(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(report).items()})


def _tokens(m: ResponseMetrics, level: str, token_ids: list[int], token_text: Callable[[int], str]
            ) -> list[C.TokenMetrics]:
    """The per-token detail of ``per_token`` (and the layers and heads of ``per_layer``); layer and head
    entropies in nats only (bits = nats / ln 2)."""
    tok = m.tokens
    columns = {
        "attribution": _json(tok.attribution),
        "sink_mass": _json(tok.sink_mass),
        "candidate_mass": _json(tok.candidate_mass),
        "entropy_nats": _json(tok.entropy_nats),
        "entropy_bits": _json(tok.entropy_nats / LN2),
        "block_entropy_nats": _json(tok.block_entropy_nats),
        "block_entropy_bits": _json(tok.block_entropy_nats / LN2),
        "pointer_fidelity": _json(tok.pointer_fidelity),
    }
    if level == "per_layer":
        lay = m.layers
        columns |= {
            "layers": _json(lay.head_attribution),  # [L][H][G] per token
            "layer_attribution": _json(lay.attribution),
            "layer_sink_mass": _json(lay.sink_mass),
            "layer_entropy_nats": _json(lay.entropy_nats),
            "head_entropy_nats": _json(lay.head_entropy_nats),
            "layer_block_entropy_nats": _json(lay.block_entropy_nats),
            "head_block_entropy_nats": _json(lay.head_block_entropy_nats),
            "layer_pointer_fidelity": _json(lay.pointer_fidelity),
            "head_pointer_fidelity": _json(lay.head_pointer_fidelity),
        }
    return [C.TokenMetrics(index=i, token_id=token_ids[i], text=token_text(token_ids[i]),
                           **{k: v[i] for k, v in columns.items()}) for i in range(m.num_tokens)]


def choice_metrics(m: ResponseMetrics, index: int, level: str, token_ids: list[int],
                   token_text: Callable[[int], str]) -> C.ChoiceMetrics:
    """Choice ``index``'s metrics at audit ``level``; ``token_ids`` are its generated tokens."""
    if level not in AUDIT_LEVELS:
        raise ValueError(f"audit: must be one of {', '.join(AUDIT_LEVELS)}, got {level!r}")
    return C.ChoiceMetrics(
        index=index, num_tokens=m.num_tokens, num_layers=m.num_layers, num_heads=m.num_heads,
        target_block=m.target_block, target_source=m.target_source,
        attribution=None if m.attribution is None else _json(m.attribution),
        sink_mass=m.sink_mass, candidate_mass=m.candidate_mass,
        entropy=C.Entropy(total_nats=m.entropy_nats, total_bits=_bits(m.entropy_nats),
                          block_nats=m.block_entropy_nats, block_bits=_bits(m.block_entropy_nats)),
        pointer_fidelity=m.pointer_fidelity,
        theory=theory(m.theory),
        tokens=None if level == "summary" else _tokens(m, level, token_ids, token_text),
    )


def token_attributions(attribution: Tensor, pointer_fidelity: Tensor | None, token_ids: list[int],
                       start: int) -> list[C.TokenAttribution]:
    """A stream delta's tokens, the first being output token ``start``."""
    fidelity = _json(pointer_fidelity) if pointer_fidelity is not None else [None] * len(attribution)
    return [C.TokenAttribution(index=start + j, token_id=token_ids[start + j], attribution=a, pointer_fidelity=f)
            for j, (a, f) in enumerate(zip(_json(attribution), fidelity))]


def usage(prompt_tokens: int, outputs: list[Generated]) -> C.Usage:
    completion = sum(len(g.token_ids) for g in outputs)
    return C.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _ranked(entry: dict) -> list:
    return sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)


def chat_logprobs(g: Generated, start: int, end: int, top: int, token_text: Callable[[int], str]) -> C.ChatLogprobs:
    content = []
    for pos in range(start, end):
        token_id, entry = g.token_ids[pos], g.logprobs[pos]
        chosen = entry.get(token_id)
        text = chosen.text if chosen is not None else token_text(token_id)
        content.append(C.TokenLogprob(
            token=text, logprob=chosen.logprob if chosen else float("-inf"), bytes=_bytes(text),
            top_logprobs=[C.TopLogprob(token=r.text, logprob=r.logprob, bytes=_bytes(r.text))
                          for _, r in _ranked(entry)[:top]],
        ))
    return C.ChatLogprobs(content=content)


def completion_logprobs(g: Generated, start: int, end: int, top: int, offset: int,
                        token_text: Callable[[int], str]) -> C.CompletionLogprobs:
    tokens, token_lps, tops, offsets = [], [], [], []
    for pos in range(start, end):
        token_id, entry = g.token_ids[pos], g.logprobs[pos]
        chosen = entry.get(token_id)
        text = chosen.text if chosen is not None else token_text(token_id)
        tokens.append(text)
        token_lps.append(chosen.logprob if chosen else None)
        tops.append({r.text: r.logprob for _, r in _ranked(entry)[:top]})
        offsets.append(offset)
        offset += len(text)
    return C.CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops if top else None,
                                text_offset=offsets)
