"""A GGUF checkpoint as a plain Hugging Face folder that vLLM and the localist model can serve.

vLLM has no GGUF loader on CPU, so a GGUF file is converted once: transformers' GGUF loader
dequantizes the tensors and reads the tokenizer and chat template stored in the file; the weights
are then copied into a plain model of the same configuration, because the loaded one keeps a
``quantization_config`` that ``save_pretrained`` refuses. ``provenance.json`` in the folder records
what the weights came from (the GGUF's sha256, not a hash of the converted weights) and the dtype.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

DTYPES = ("bfloat16", "float32")
PROVENANCE_FILE = "provenance.json"
GGUF_MAGIC = b"GGUF"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write ``out_dir``: config.json, model.safetensors, the tokenizer with its chat template, provenance.

    The folder appears complete or not at all (written beside it, then renamed), so a conversion
    that stops half-way never looks like a finished one. An existing ``out_dir`` is replaced only
    when it is an earlier import.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    with gguf_path.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ValueError(f"{gguf_path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    if out_dir.exists() and not (out_dir / PROVENANCE_FILE).exists() and (out_dir.is_file() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an earlier import (no {PROVENANCE_FILE}): not replacing it")
    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    provenance = {"source": {"format": "gguf", "file": gguf_path.name, "sha256": file_sha256(gguf_path)},
                  "dtype": dtype, "converted_with": {"transformers": transformers.__version__}}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
