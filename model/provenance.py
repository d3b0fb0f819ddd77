"""The identity of a served checkpoint: the SHA-256 of the files it was brought as, never of weights made here.

A Hugging Face folder is identified by its weight files. A folder this host wrote from other files
carries ``provenance.json`` naming them with their hashes (``localist import`` and ``localist serve
--model FILE.gguf`` convert a GGUF file, :mod:`localist.model.gguf_import`; the fine-tuned default
model merges a LoRA adapter into a GGUF base, :func:`localist.model.finetune.merge_adapter`), and
the identity is theirs: converted or merged float32 weights round differently on different CPUs,
the input files do not.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localist.model.gguf_import import PROVENANCE_FILE, file_sha256

WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".bin": "bin", ".pt": "bin"}


@dataclass(frozen=True)
class Checkpoint:
    """The input files of a checkpoint: ``files`` are (name, sha256) sorted by name."""

    format: str
    files: tuple[tuple[str, str], ...]

    @property
    def sha256(self) -> str:
        """One file: its own SHA-256 (what ``sha256sum FILE`` prints); several: the SHA-256 of their
        ``sha256sum`` listing, so both can be checked with standard tools."""
        if len(self.files) == 1:
            return self.files[0][1]
        listing = "".join(f"{sha}  {name}\n" for name, sha in self.files)
        return hashlib.sha256(listing.encode()).hexdigest()


def _weight_files(model_dir: Path) -> Checkpoint:
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    formats = sorted({WEIGHT_SUFFIXES[p.suffix] for p in files})
    return Checkpoint("+".join(formats), tuple((p.name, file_sha256(p)) for p in files))


def _recorded(provenance: dict[str, Any], where: Path) -> Checkpoint:
    """The input files a ``provenance.json`` names (a GGUF import, or a base merged with an adapter)."""
    if "source" in provenance:
        source = provenance["source"]
        return Checkpoint(str(source["format"]), ((str(source["file"]), str(source["sha256"])),))
    if "base" in provenance and "adapter" in provenance:
        from localist.model.finetune import ADAPTER_WEIGHTS

        base = provenance["base"]
        if isinstance(base, dict):
            base_checkpoint = _recorded(base, where)
        elif Path(base).is_dir():  # a Hugging Face base folder, named by its path
            base_checkpoint = _weight_files(Path(base))
        else:
            raise FileNotFoundError(f"{where}: the base {base} is gone; its files cannot be identified")
        files = (*base_checkpoint.files, (ADAPTER_WEIGHTS, str(provenance["adapter"]["sha256"])))
        return Checkpoint(f"{base_checkpoint.format}+lora", tuple(sorted(files)))
    raise ValueError(f"{where}: names neither a source file nor a base and an adapter")


def checkpoint(model_dir: str | Path) -> Checkpoint:
    """The checkpoint served from ``model_dir``: the files ``provenance.json`` names, else its weight files."""
    model_dir = Path(model_dir)
    recorded = model_dir / PROVENANCE_FILE
    if recorded.exists():
        return _recorded(json.loads(recorded.read_text()), recorded)
    return _weight_files(model_dir)
