"""Write the served OpenAPI schema as YAML: ``python -m localist.server.openapi > openapi.yaml``.

``tests/test_server_openapi.py`` fails when the committed ``openapi.yaml`` differs from it.
"""
from __future__ import annotations

import sys

import yaml

from localist.server.app import create_app


def schema() -> dict:
    return create_app().openapi()


def dump() -> str:
    return yaml.safe_dump(schema(), sort_keys=False, allow_unicode=True, width=120)


if __name__ == "__main__":
    sys.stdout.write(dump())
