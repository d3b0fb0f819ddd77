"""What changed in the served API between a commit's ``openapi.yaml`` and the app's schema now.

    .venv/bin/python scripts/openapi_diff.py BASE_REV [NEW_REV]

Both schemas are compared after resolving every ``$ref`` (so renaming or splitting a component is no
change, only what a client receives is), key by key. Differences in ``description`` and ``title``
(documentation) are listed apart from the rest (what a request or response may hold). Exit status 1
when a difference of the second kind exists.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTATION = {"description", "title"}


def committed(rev: str) -> dict:
    return yaml.safe_load(subprocess.run(["git", "show", f"{rev}:openapi.yaml"], cwd=ROOT, check=True,
                                         capture_output=True, text=True).stdout)


def current() -> dict:
    from localist.server.openapi import schema

    return json.loads(json.dumps(schema()))


def resolve(node: Any, components: dict, seen: tuple[str, ...] = ()) -> Any:
    """``node`` with every ``$ref`` replaced by what it names (a ref back into its own chain stays)."""
    if isinstance(node, list):
        return [resolve(v, components, seen) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        name = ref.rsplit("/", 1)[1]
        if name in seen:
            return {"$ref": name}
        target = resolve(components[name], components, (*seen, name))
        rest = {k: resolve(v, components, seen) for k, v in node.items() if k != "$ref"}
        return {**target, **rest}
    return {k: resolve(v, components, seen) for k, v in node.items()}


def differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(old.keys() | new.keys()):
            where = f"{path}/{key}"
            if key not in new:
                out.append((where, old[key], "<absent>"))
            elif key not in old:
                out.append((where, "<absent>", new[key]))
            else:
                out += differences(old[key], new[key], where)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [(path, old, new)]


def served(spec: dict) -> dict:
    """Paths with their schemas inlined: what a client sees."""
    components = spec.get("components", {}).get("schemas", {})
    return {"info": spec.get("info"), "paths": resolve(spec["paths"], components)}


def main(argv: list[str]) -> int:
    base = committed(argv[0])
    new = committed(argv[1]) if len(argv) > 1 else current()
    found = differences(served(base), served(new))
    docs = [d for d in found if d[0].rsplit("/", 1)[-1] in DOCUMENTATION]
    shape = [d for d in found if d not in docs]
    for title, items in (("documentation", docs), ("shape", shape)):
        print(f"## {title}: {len(items)} difference(s)")
        for where, a, b in items:
            print(f"{where}\n  - {json.dumps(a, ensure_ascii=False)[:300]}\n  + {json.dumps(b, ensure_ascii=False)[:300]}")
    return 1 if shape else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
