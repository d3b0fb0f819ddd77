"""Every example in examples/ runs against the session's real server; its output is checked against
the audit records it produced."""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from localist.clients import Client

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def client(localist_server):
    with Client(localist_server.base_url, localist_server.admin_key) as c:
        yield c


def run(localist_server, name: str, *args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "LOCALIST_BASE_URL": localist_server.base_url,
           "LOCALIST_API_KEY": localist_server.admin_key, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def audit_id(out: str) -> str:
    return re.search(r"^audit_id: (\S+)$", out, re.M).group(1)


def test_openai_chat(localist_server, client):
    out = run(localist_server, "openai_chat.py")
    result = client.audit.get(audit_id(out))
    localist = result.localist()
    assert out.startswith(f"answer: {result.output.choices[0].text}\n")
    assert f"dial ρ per layer: {localist.locality.rho}" in out
    metrics = localist.choices[0]
    for block in localist.blocks:
        assert re.search(rf"^  {re.escape(block.label)}\s+{block.kind}\s+attribution "
                         rf"{metrics.attribution[block.id]:.3f}$", out, re.M)
    theory = metrics.theory
    assert (f"pointer fidelity: {metrics.pointer_fidelity:.3f} (all heads); {theory.fidelity_measured:.3f} "
            f"(scored heads, bound ≥ {theory.fidelity_bound:.3f})") in out
    assert localist.choices[0].target_block == next(b.id for b in localist.blocks if b.label == "R2")


def test_openai_stream(localist_server, client):
    out = run(localist_server, "openai_stream.py")
    record = client.audit.get(audit_id(out))
    n = record.localist().choices[0].num_tokens
    assert out.startswith(record.output.choices[0].text + "\n")
    assert f"tokens streamed: {n}  completion_tokens: {n}" in out
    assert len(re.findall(r"^token\s+\d+ \(id\s+\d+\): top block", out, re.M)) == n
    assert record.localist().locality.preset == "balanced"


def test_localist_client(localist_server, client):
    out = run(localist_server, "localist_client.py")
    rows = re.findall(r"^\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(R\d)\s+(\S+)$", out, re.M)
    assert [float(r[0]) for r in rows] == [0.0, 0.5, 0.9]
    for rho, block_nats, fidelity, top, record_id in rows:
        metrics = client.audit.get(record_id).localist()
        assert metrics.locality.rho[0] == float(rho)
        assert float(block_nats) == pytest.approx(metrics.choices[0].entropy.block_nats, abs=1e-4)
        assert float(fidelity) == pytest.approx(metrics.choices[0].pointer_fidelity, abs=1e-4)
        rules = {b.label: b.id for b in metrics.blocks if b.kind == "rule"}
        assert top == max(rules, key=lambda label: metrics.choices[0].attribution[rules[label]])
    record = client.audit.get(audit_id(out))
    assert f"streamed text: {record.output.choices[0].text!r}" in out


def test_compliance_review_bundles_low_fidelity_answers(localist_server, client, tmp_path):
    for rho in (0.0, 0.9):  # at least two answers with a fidelity, whatever ran before
        client.chat("Is a discounted item refundable?", locality=rho, target_block="R2", max_tokens=3,
                    blocks=[{"label": "R1", "kind": "rule", "text": "Refunds within 30 days."},
                            {"label": "R2", "kind": "rule", "text": "No refunds on discounted items."}])
    scored = [r for r in client.audit.list(since="0", status="completed") if r.fidelity is not None]
    threshold = statistics.median(r.fidelity for r in scored)
    expected = {r.id for r in scored if r.fidelity <= threshold}
    out = run(localist_server, "compliance_review.py", "--since", "24h", "--below", f"{threshold!r}",
              "--out", "bundle.html", cwd=tmp_path)
    flagged = dict(re.findall(r"^flagged: (\S+) fidelity=([\d.]+)$", out, re.M))
    assert set(flagged) == expected and 0 < len(expected) < len(scored) + 1
    bundle = (tmp_path / "bundle.html").read_text()
    assert bundle.count("<iframe sandbox srcdoc=") == len(expected)
    assert all(f"<section id='{record_id}'>" in bundle for record_id in expected)
    assert "Audit chain: <strong>valid</strong>" in bundle
