"""The served OpenAPI schema: write it, or say how it differs from a commit's.

``python -m localist.server.openapi > openapi.yaml`` writes it (``tests/test_server_openapi.py`` fails
when the committed file is stale). ``python -m localist.server.openapi --diff REV`` compares it with
``openapi.yaml`` at git revision REV after resolving every ``$ref`` (renaming or splitting a component
changes nothing a client receives), key by key; differences in ``description`` and ``title`` are
listed apart from those in shape. Exit status 1 when the shape differs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from localist.server.app import create_app

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTATION = frozenset({"description", "title"})


def schema() -> dict:
    return create_app().openapi()


def dump() -> str:
    return yaml.safe_dump(schema(), sort_keys=False, allow_unicode=True, width=120)


def committed(rev: str) -> dict:
    """``openapi.yaml`` as committed at ``rev`` (CalledProcessError when git does not have it)."""
    return yaml.safe_load(subprocess.run(["git", "show", f"{rev}:openapi.yaml"], cwd=ROOT, check=True,
                                         capture_output=True, text=True).stdout)


def _resolve(node: Any, components: dict, seen: tuple[str, ...] = ()) -> Any:
    """``node`` with every ``$ref`` replaced by what it names (a ref back into its own chain stays)."""
    if isinstance(node, list):
        return [_resolve(v, components, seen) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        name = ref.rsplit("/", 1)[1]
        if name in seen:
            return {"$ref": name}
        target = _resolve(components[name], components, (*seen, name))
        return {**target, **{k: _resolve(v, components, seen) for k, v in node.items() if k != "$ref"}}
    return {k: _resolve(v, components, seen) for k, v in node.items()}


def served(spec: dict) -> dict:
    """What a client sees: the paths with every schema inlined."""
    spec = json.loads(json.dumps(spec))
    return {"info": spec.get("info"), "paths": _resolve(spec["paths"], spec.get("components", {}).get("schemas", {}))}


def differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(path, old value, new value) wherever the two differ; an absent key reads ``<absent>``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(old.keys() | new.keys()):
            where = f"{path}/{key}"
            if key not in new or key not in old:
                out.append((where, old.get(key, "<absent>"), new.get(key, "<absent>")))
            else:
                out += differences(old[key], new[key], where)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [(path, old, new)]


def shape_differences(rev: str) -> tuple[list, list]:
    """(documentation, shape) differences of the served schema from ``openapi.yaml`` at ``rev``."""
    found = differences(served(committed(rev)), served(schema()))
    docs = [d for d in found if d[0].rsplit("/", 1)[-1] in DOCUMENTATION]
    return docs, [d for d in found if d not in docs]


def _report(rev: str) -> int:
    docs, shape = shape_differences(rev)
    for title, items in (("documentation", docs), ("shape", shape)):
        print(f"## {title}: {len(items)} difference(s)")
        for where, a, b in items:
            print(f"{where}\n  - {json.dumps(a, ensure_ascii=False)[:300]}\n  + {json.dumps(b, ensure_ascii=False)[:300]}")
    return 1 if shape else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--diff"] and len(sys.argv) == 3:
        sys.exit(_report(sys.argv[2]))
    sys.stdout.write(dump())
