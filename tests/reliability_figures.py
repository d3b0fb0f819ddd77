"""Figures the reliability tests report for bench/reliability.py's summary (docs: `make reliability`).

A test calls :func:`record` with what it measured; when ``LOCALIST_RELIABILITY_FIGURES`` names a file
(the summary writer sets it), each call appends one JSON line there; otherwise nothing is written.
``LOCALIST_RELIABILITY_FULL=1`` (set by `make reliability`) turns on the long parts: bigger fuzzing
budgets and load counts, and the soak.
"""
from __future__ import annotations

import json
import os
import time

FULL = os.environ.get("LOCALIST_RELIABILITY_FULL") == "1"


def record(section: str, **figures) -> None:
    path = os.environ.get("LOCALIST_RELIABILITY_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"section": section, "at": time.time(), **figures}) + "\n")
