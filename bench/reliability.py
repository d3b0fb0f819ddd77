"""The reliability suite in one command (`make reliability`): runs tests/test_reliability_*.py with the
long parts on, collects the figures the tests record, and writes bench/results/reliability.md.

    .venv/bin/python bench/reliability.py [extra pytest arguments]

The figures come from the tests themselves (tests/reliability_figures.py), so the table shows what
was measured in this run; the pytest outcome, with the known defects (strict xfails), is listed too.
"""
from __future__ import annotations

import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "reliability.md"


def run_suite(figures: Path, junit: Path, extra: list[str]) -> tuple[int, float]:
    env = {**os.environ, "LOCALIST_RELIABILITY_FULL": "1", "LOCALIST_RELIABILITY_FIGURES": str(figures)}
    tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_reliability_*.py"))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rxX", f"--junitxml={junit}", *tests, *extra],
                          cwd=ROOT, env=env)
    return done.returncode, time.monotonic() - started


def outcomes(junit: Path) -> tuple[collections.Counter, list[tuple[str, str]]]:
    counts: collections.Counter = collections.Counter()
    defects = []
    if not junit.exists():
        return counts, defects
    for case in ET.parse(junit).iter("testcase"):
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            counts["known defects (xfail)"] += 1
            defects.append((case.get("name"), skipped.get("message", "")))
        elif skipped is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, defects


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, 0 if c.endswith("xx") or c == "closed" else "")) for c in columns) + " |"
              for r in rows]
    return lines


def render(figures: list[dict], counts, defects, rc: int, seconds: float) -> str:
    by = collections.defaultdict(list)
    for f in figures:
        by[f["section"]].append(f)
    out = ["# Reliability suite", "",
           f"`make reliability` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
           f"{os.cpu_count()} CPUs; {seconds / 60:.1f} min; pytest exit code {rc}.", "",
           "Outcome: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".", ""]
    hostile = by["hostile"]
    if hostile:
        total = collections.Counter()
        for row in hostile:
            total.update({k: row.get(k, 0) for k in ("tried", "2xx", "4xx", "5xx", "closed")})
        out += ["## Hostile input (hand-written corpus)", ""]
        out += table([*hostile, {"category": "**all**", **total}], ["category", "tried", "2xx", "4xx", "5xx", "closed"])
        out += [""]
    if by["schema fuzz"]:
        out += ["## Schema-driven fuzzing (openapi.yaml)", ""]
        out += table(by["schema fuzz"], ["operation", "tried", "2xx", "4xx", "5xx"]) + [""]
    if by["tenant walls"]:
        out += ["## Tenant walls", ""] + table(by["tenant walls"], ["probe", "tried", "leaked"]) + [""]
    load = [f for f in by["durability"] if "acknowledged" in f]
    if load:
        out += ["## Durability: kill -9 under load, restart", ""]
        out += table(load, ["backend", "clients", "requests_sent", "acknowledged", "records_lost", "chain_ok",
                            "restart_s"]) + [""]
        out += [f"**Records lost: {sum(f['records_lost'] for f in load)}** (must be 0).", ""]
    tamper = [f for f in by["durability"] if "tampering" in f]
    if tamper:
        out += ["## Tampering named by verify", ""] + table(tamper, ["tampering", "chain_breaks_detected", "of"]) + [""]
    backups = [f for f in by["durability"] if "backup" in f]
    if backups:
        out += ["## Backup → restore → verify (taken while the server runs; docs/server.md)", ""]
        out += table(backups, ["backup", "commands", "records_restored", "restored_chain_ok", "signatures_valid"]) + [""]
    if by["outages"]:
        out += ["## Outages: the audit database goes away under load and comes back (same server process)", ""]
        out += table(by["outages"], ["backend", "outage", "acknowledged", "refused_503", "in_band_errors",
                                     "other_answers", "records_lost", "chain_ok", "detected_s", "outage_s",
                                     "recovery_s", "first_200_after_s"]) + [""]
        out += ["`detected_s`: from the outage to `/health` 503; `recovery_s`: from the database back to `/health` "
                "200; `first_200_after_s`: to the first acknowledged generation sent after it. Requests sent while "
                "`/health` said unavailable: all 503 with Retry-After. "
                f"**Records lost: {sum(f['records_lost'] for f in by['outages'])}** (must be 0).", ""]
    for section in sorted(set(by) - {"hostile", "schema fuzz", "tenant walls", "durability", "outages"}):
        columns = sorted({k for f in by[section] for k in f} - {"section", "at"})
        out += [f"## {section.capitalize()}", ""] + table(by[section], columns) + [""]
    if defects:
        out += ["## Known defects (strict xfail: they fail the suite once fixed, until the mark is removed)", ""]
        out += [f"- `{name}`: {reason.removeprefix('reason: ')}" for name, reason in defects] + [""]
    return "\n".join(out)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        figures, junit = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        rc, seconds = run_suite(figures, junit, sys.argv[1:])
        rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
        counts, defects = outcomes(junit)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(rows, counts, defects, rc, seconds))
    print(f"wrote {OUT.relative_to(ROOT)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
