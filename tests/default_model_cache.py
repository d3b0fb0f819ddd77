"""The default model as the tests get it: built once into the test cache that tests/test_real_model.py
uses for its GGUF conversions (kept across runs), skipped while the repository has no adapter weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_real_model import CACHE

from localist.model.default_model import ADAPTER_FOLDER, default_model_dir
from localist.model.finetune import ADAPTER_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


def built_default_model() -> Path:
    """``localist serve``'s default model, merged into ``CACHE`` on the first run only."""
    if not (ROOT / ADAPTER_FOLDER / ADAPTER_WEIGHTS).is_file():
        pytest.skip(f"{ADAPTER_FOLDER / ADAPTER_WEIGHTS} is not in the repository yet: the default model "
                    "cannot be built (the fine-tune's adapter weights are committed by its training)")
    return default_model_dir(CACHE)
