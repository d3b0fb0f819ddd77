"""`localist chat` and `localist audit ...` run as subprocesses against the session's real server."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from localist.clients import Client
from localist.clients.commands import bar

RULES = ["--rule", "R1=Refunds are paid within 30 days of a written claim.",
         "--rule", "R2=Sale items are never refunded."]


@pytest.fixture(scope="session")
def env(localist_server):
    return {**os.environ, "LOCALIST_BASE_URL": localist_server.base_url,
            "LOCALIST_API_KEY": localist_server.admin_key, "PYTHONIOENCODING": "utf-8"}


@pytest.fixture(scope="session")
def client(localist_server):
    with Client(localist_server.base_url, localist_server.admin_key) as c:
        yield c


def localist(env, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "localist.clients.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300, input=stdin)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="session")
def chatted(env, client):
    """One human-readable chat and the audit record it produced."""
    out = localist(env, "chat", "Can I return a sale item?", *RULES, "--target", "R1", "--locality", "0.5",
                   "--audit", "per_token", "--tokens", "--max-tokens", "5", "--temperature", "0").stdout
    audit_id = re.search(r"^audit (\S+)", out, re.M).group(1)
    return out, client.audit.get(audit_id)


def test_chat_prints_answer_and_block_table(chatted):
    out, record = chatted
    result = record.localist()
    metrics = result.choices[0]
    assert out.startswith(record.output.choices[0].text + "\n")
    rows = {m.group(1): m for m in re.finditer(r"^\s+\d+\s+(\S+)\s+(\S+)\s+(\d+)–(\d+)\s+(.*?)\s+([\d.]+)(  ◀ target)?$",
                                               out, re.M)}
    assert set(rows) == {b.label for b in result.blocks}
    for block in result.blocks:
        row = rows[block.label]
        mass = metrics.attribution[block.id]
        assert (int(row.group(3)), int(row.group(4))) == (block.start, block.end)
        assert row.group(6) == f"{mass:.3f}"
        assert row.group(5) == bar(mass).rstrip()
        assert bool(row.group(7)) == (block.label == "R1")
    assert f"pointer fidelity   all heads {metrics.pointer_fidelity:.3f}" in out
    theory = metrics.theory
    assert f"scored heads {theory.fidelity_measured:.3f}  bound ≥ {theory.fidelity_bound:.3f}" in out
    assert f"H(a) {metrics.entropy.total_nats:.3f} nats" in out
    assert f"bound ≤ {metrics.theory.entropy_bound_nats:.3f}" in out
    token_lines = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\"", line)]
    assert len(token_lines) == metrics.num_tokens == 5


def test_chat_json_is_the_servers_response(env, client):
    out = localist(env, "chat", "--locality", "balanced", "--max-tokens", "3", "--json",
                   stdin="a question from stdin").stdout
    response = json.loads(out)
    assert response["localist"]["locality"]["preset"] == "balanced"
    record = client.audit.get(response["localist"]["audit_id"])
    assert record.localist().model_dump(mode="json") == response["localist"]
    assert record.request.body["messages"] == [{"role": "user", "content": "a question from stdin"}]


def test_chat_stream_prints_tokens_then_metrics(env, client):
    out = localist(env, "chat", "hello", "--stream", "--max-tokens", "4", "--temperature", "0").stdout
    audit_id = re.search(r"^audit (\S+)", out, re.M).group(1)
    record = client.audit.get(audit_id)
    assert out.startswith(record.output.choices[0].text + "\n")
    assert record.localist().choices[0].num_tokens == 4


def test_bad_input_is_one_line_naming_the_field(env):
    proc = localist(env, "chat", "hi", "--locality", "1.5", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"localist: error: HTTP 400: .*locality", proc.stderr)


def test_audit_list_show_and_filters(env, chatted):
    _, record = chatted
    listed = json.loads(localist(env, "audit", "list", "--block", "R1", "--json").stdout)
    assert record.id in {r["id"] for r in listed} and all("R1" in r["blocks"] for r in listed)
    table = localist(env, "audit", "list", "--block", "R1", "--since", "1h").stdout
    assert record.id in table and f"{len(listed)} record(s)" in table
    shown = localist(env, "audit", "show", record.id).stdout
    assert f"record {record.id}" in shown and json.dumps(record.output.choices[0].text) in shown
    assert "◀ target" in shown


def test_tenant_sees_only_its_own_records(env, localist_server, chatted):
    _, record = chatted
    tenant_env = {**env, "LOCALIST_API_KEY": localist_server.tenant_key}
    listed = json.loads(localist(tenant_env, "audit", "list", "--json").stdout)
    assert record.id not in {r["id"] for r in listed}
    assert all(r["tenant"] == localist_server.tenant for r in listed)
    proc = localist(tenant_env, "audit", "show", record.id, check=False)
    assert proc.returncode == 1 and "404" in proc.stderr


def test_audit_export_writes_reports_with_progress(env, chatted, tmp_path):
    listed = json.loads(localist(env, "audit", "list", "--since", "1h", "--limit", "1000", "--json").stdout)
    proc = localist(env, "audit", "export", "--since", "1h", "--format", "both", "--out", str(tmp_path / "out"))
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(f"{r['id']}.{ext}" for r in listed for ext in ("html", "json"))
    assert f"{len(listed)}/{len(listed)}" in proc.stderr.rsplit("\r", 1)[-1]
    _, record = chatted
    report = json.loads((tmp_path / "out" / f"{record.id}.json").read_text())
    assert report["record"]["id"] == record.id and report["verification"]["ok"] is True
    assert record.id in (tmp_path / "out" / f"{record.id}.html").read_text()


def test_audit_verify(env, client):
    out = localist(env, "audit", "verify").stdout
    result = client.audit.verify()
    assert result.ok and out.startswith("chain OK") and f"head seq {result.head_seq} " in out


def test_client_install_without_the_engine(localist_server):
    """With torch, vLLM, FastAPI and the server package unimportable, the client and its CLI still work."""
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "vllm", "fastapi", "uvicorn", "transformers", "sqlalchemy", "localist.server",
                     "localist.model"):
            sys.modules[name] = None
        from localist.clients import Client
        from localist.clients.cli import build_parser
        actions = build_parser()._subparsers._group_actions[0].choices
        assert {{"chat", "audit"}} <= set(actions), sorted(actions)
        with Client({localist_server.base_url!r}, {localist_server.admin_key!r}) as c:
            print(c.chat("hi", max_tokens=2).usage.completion_tokens)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"


def test_in_a_terminal(env, chatted, tmp_path):
    """In a real terminal (tmux), the export progress bar redraws one line and ends at n/n."""
    tmux = shutil.which("tmux")
    assert tmux, "tmux is missing (apt-get install tmux)"
    session = f"localist-cli-test-{os.getpid()}"
    out = tmp_path / "out"
    script = (f"{shlex.quote(sys.executable)} -m localist.clients.cli audit export --since 1h --out {out}; "
              f"echo EXIT=$?; sleep 60")
    variables = [f"{k}={env[k]}" for k in ("LOCALIST_BASE_URL", "LOCALIST_API_KEY")]
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "20", "env", *variables,
                    "bash", "-c", script], check=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pane = subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout
            if "EXIT=" in pane:
                break
            time.sleep(0.5)
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)
    assert "EXIT=0" in pane, pane
    n = len(list(out.iterdir()))
    bars = [line for line in pane.splitlines() if line.startswith("exporting |")]
    assert len(bars) == 1 and bars[0].startswith(f"exporting |{'█' * 30}| {n}/{n} "), pane
    assert f"wrote {n} report file(s) for {n} record(s)" in pane


def test_audit_replay(env, chatted):
    _, record = chatted
    out = localist(env, "audit", "replay", record.id).stdout
    assert out.startswith("provenance: the same as the record's\n")  # said before the outputs are compared
    assert re.search(rf"^replay \S+ of {record.id}: every choice reproduced its tokens", out, re.MULTILINE)
    assert "choice 0: 5 original token(s), 5 replayed, match" in out
