"""vLLM's paged CPU KV cache, read back as plain keys and values whatever layout the CPU chose.

vLLM's CPU attention keeps one tensor per layer, ``[num_blocks, kv_heads, block_size, 2·D]``: per
cache block and KV head, the first ``block_size·D`` elements hold K and the next ``block_size·D``
hold V, each packed for the kernel vLLM picked for this host (``layer.isa``, chosen by
``vllm/v1/attention/backends/cpu_attn.py::_get_attn_isa``):

- ``vec`` and ``vec16`` (AVX-512 / AVX2 hosts, float32 always, head dims that are multiples of 16
  but not 32): K transposed, ``[D, block_size]``; V plain, ``[block_size, D]``.
- ``amx`` (bfloat16 on CPUs with AMX tiles, block size a multiple of 32): both repacked for the
  tile multiply. K in groups of 16 tokens; within a group, for each pair of head dims, the 16
  tokens' two values side by side: ``[block_size/16, D/2, 16, 2]``. V in groups of 16 head dims;
  within a group, for each pair of tokens, the 16 dims' two values side by side:
  ``[D/16, block_size/2, 16, 2]``.

The layout is taken from ``layer.isa``, never guessed from the data; :meth:`PagedKV.check` verifies
it against what vLLM has just written and fails loudly (the caller then falls back to vLLM's own
kernel for the step). Layouts of other architectures (Arm, Power, …) are refused at engine start
(:func:`require_supported`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_ISAS = ("vec", "vec16", "amx")


class LayoutError(RuntimeError):
    """vLLM's cache holds a layout this reader does not know, or not what vLLM was asked to write."""


def require_supported(isa: str, kv_cache_dtype: str) -> None:
    """Refuse, at engine start, a cache this reader cannot read."""
    if kv_cache_dtype not in ("auto", None):
        raise LayoutError(f"kv_cache_dtype {kv_cache_dtype!r}: localist reads an unquantized KV cache only "
                          "(start without --kv-cache-dtype)")
    if isa not in SUPPORTED_ISAS:
        raise LayoutError(f"vLLM's CPU attention chose the {isa!r} KV-cache layout; localist reads "
                          f"{', '.join(SUPPORTED_ISAS)} (x86 hosts)")


def _unpack_vec(k: Tensor, v: Tensor, bs: int, D: int) -> tuple[Tensor, Tensor]:
    return k.unflatten(-1, (D, bs)).transpose(-1, -2), v.unflatten(-1, (bs, D))


def _unpack_amx(k: Tensor, v: Tensor, bs: int, D: int) -> tuple[Tensor, Tensor]:
    lead = k.shape[:-1]
    n = len(lead)
    # K [bs/16, D/2, 16, 2] → [bs/16, 16, D/2, 2] = [bs, D]
    keys = k.unflatten(-1, (bs // 16, D // 2, 16, 2)).permute(*range(n), n, n + 2, n + 1, n + 3)
    # V [D/16, bs/2, 16, 2] → [bs/2, 2, D/16, 16] = [bs, D]
    values = v.unflatten(-1, (D // 16, bs // 2, 16, 2)).permute(*range(n), n + 1, n + 3, n, n + 2)
    return keys.reshape(*lead, bs, D), values.reshape(*lead, bs, D)


_UNPACK = {"vec": _unpack_vec, "vec16": _unpack_vec, "amx": _unpack_amx}


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged cache (``layer.kv_cache``) with the layout vLLM chose for it (``layer.isa``)."""

    cache: Tensor  # [num_blocks, kv_heads, block_size, 2·D]
    isa: str

    def __post_init__(self) -> None:
        require_supported(self.isa, "auto")

    @property
    def block_size(self) -> int:
        return self.cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.cache.shape[3] // 2

    def raw(self) -> Tensor:
        """[num_blocks, kv_heads, 2, block_size·D]: K's and V's packed storage per block and head."""
        nb, hkv, bs, two_d = self.cache.shape
        return self.cache.view(nb, hkv, 2, bs * (two_d // 2))

    def blocks(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of the cache blocks ``index`` (any shape S), each ``[*S, kv_heads, block_size, D]``."""
        packed = self.raw()[index]
        return _UNPACK[self.isa](packed[..., 0, :], packed[..., 1, :], self.block_size, self.head_dim)

    def tokens(self, block_index: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """K and V of one sequence's first ``length`` tokens (its cache blocks in order): ``[kv_heads, length, D]``."""
        keys, values = self.blocks(block_index)  # [nblk, Hkv, bs, D]
        hkv, D = keys.shape[1], keys.shape[-1]
        # contiguous: torch's CPU flash attention gives wrong results for a K sliced out of a longer one
        # (found by the chunked-prefill reference test; a sliced V is read correctly)
        flat = [x.transpose(0, 1).reshape(hkv, -1, D)[:, :length].contiguous() for x in (keys, values)]
        return flat[0], flat[1]

    def for_kernel(self, block_index: Tensor) -> tuple[Tensor, Tensor]:
        """(cache in the ``vec`` layout, block table into it) for the split-KV kernel, which reads K
        transposed and V plain: the cache itself where it is so, else the blocks in use repacked once."""
        if self.isa != "amx":
            return self.raw(), block_index
        used, table = torch.unique(block_index, return_inverse=True)
        keys, values = self.blocks(used)  # [n, Hkv, bs, D]
        n, hkv = keys.shape[:2]
        packed = torch.stack([keys.transpose(-1, -2).reshape(n, hkv, -1), values.reshape(n, hkv, -1)], 2)
        return packed, table.view(block_index.shape)

    def check(self, key: Tensor, value: Tensor, slot_mapping: Tensor, where: str) -> None:
        """Raise :class:`LayoutError` unless the cache holds ``key``/``value`` [n, Hkv, D] at their slots."""
        slots = slot_mapping[: key.shape[0]].long()
        used, block = torch.unique(slots // self.block_size, return_inverse=True)
        keys, values = self.blocks(used)  # [n blocks, Hkv, bs, D]
        offset = slots % self.block_size
        if not (torch.equal(keys[block, :, offset], key) and torch.equal(values[block, :, offset], value)):
            raise LayoutError(f"{where} (ISA {self.isa}): vLLM's paged cache does not hold the K/V just written "
                              "at their slots in the layout this reader expects")
