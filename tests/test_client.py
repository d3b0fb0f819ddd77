"""The Python client (sync and async) against a real localist server (real vLLM engine, tiny model)."""
from __future__ import annotations

import math
import time

import pytest
from pydantic import ValidationError

from localist.clients import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    BlockSpec,
    Client,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)
from localist.clients.contract import AuditReport, ChatCompletionResponse, LocalistResult

RULES = [
    {"label": "R1", "kind": "rule", "text": "Refunds are paid within 30 days of a written claim."},
    {"label": "R2", "kind": "rule", "text": "Sale items are never refunded."},
]
QUESTION = "Can I get my money back for a sale item?"


@pytest.fixture(scope="session")
def live(localist_server):
    """(base URL, admin key) of the session's real server (tests/conftest.py)."""
    return localist_server.base_url, localist_server.admin_key


@pytest.fixture(scope="session")
def client(live):
    with Client(*live) as c:
        yield c


@pytest.fixture(scope="session")
def num_layers(client) -> int:
    return client.models().data[0].num_layers


@pytest.fixture(scope="session")
def ruled(client) -> ChatCompletionResponse:
    """One greedy chat with two rules, R1 as ground truth, ρ = 0.5, per-token audit."""
    return client.chat(QUESTION, blocks=RULES, target_block="R1", locality=0.5, audit="per_token",
                       max_tokens=6, temperature=0.0, seed=7)


def by_label(result: LocalistResult) -> dict[str, int]:
    return {b.label: b.id for b in result.blocks}


def test_health_and_models(client):
    health = client.health()
    assert health.status == "ok" and health.engine == "running"
    model = client.models().data[0]
    assert model.id == health.model and model.num_layers >= 1 and model.num_heads >= 1
    assert len(model.weights_sha256) == 64


def test_chat_carries_dial_blocks_and_metrics(ruled, num_layers):
    result = ruled.localist
    assert result.locality.rho == [0.5] * num_layers
    ids = by_label(result)
    r1, r2 = (next(b for b in result.blocks if b.label == label) for label in ("R1", "R2"))
    assert (r1.kind, r1.candidate, r2.kind, r2.candidate) == ("rule", True, "rule", True)
    assert result.blocks[0].kind == "sink" and result.blocks[0].pinned
    metrics = result.choices[0]
    assert metrics.num_tokens == ruled.usage.completion_tokens == len(metrics.tokens) > 0
    assert math.isclose(sum(metrics.attribution), 1.0, abs_tol=1e-4)
    assert metrics.target_block == ids["R1"] and metrics.target_source == "request"
    # Response-level fidelity is Σπ(t)/Σc over the same (token, layer, head) set the attribution averages,
    # so it is the target's share of the candidate attribution.
    share = metrics.attribution[ids["R1"]] / (metrics.attribution[ids["R1"]] + metrics.attribution[ids["R2"]])
    assert metrics.pointer_fidelity == pytest.approx(share, abs=1e-4)
    for token in metrics.tokens:
        assert math.isclose(sum(token.attribution), 1.0, abs_tol=1e-4)
        assert 0.0 <= token.pointer_fidelity <= 1.0
    assert "".join(t.text for t in metrics.tokens) == ruled.text


def test_audit_record_holds_what_the_caller_got(client, ruled):
    record = client.audit.get(ruled.localist.audit_id)
    assert record.status == "completed" and record.kind == "request"
    assert {"R1", "R2"} <= set(record.blocks)
    assert record.output.choices[0].text == ruled.text
    assert record.localist() == ruled.localist
    assert record.fidelity == pytest.approx(ruled.localist.choices[0].pointer_fidelity, abs=1e-6)


def test_presets_and_per_layer_dials(client, num_layers):
    preset = client.chat("hello", locality="localist", max_tokens=2).localist.locality
    assert preset.rho == [0.9] * num_layers and preset.preset == "localist"
    per_layer = [round(0.1 + 0.8 * i / max(num_layers - 1, 1), 3) for i in range(num_layers)]
    assert client.chat("hello", locality=per_layer, max_tokens=2).localist.locality.rho == per_layer


def test_complete(client):
    response = client.complete("The refund policy says", blocks=RULES, locality=0.3, max_tokens=4,
                               temperature=0.0)
    assert response.usage.completion_tokens == response.localist.choices[0].num_tokens == 4
    assert response.localist.locality.rho[0] == 0.3
    assert {"R1", "R2"} <= set(by_label(response.localist))


def test_stream_yields_tokens_with_their_attribution(client, ruled):
    with client.chat_stream(QUESTION, blocks=RULES, target_block="R1", locality=0.5, max_tokens=6,
                            temperature=0.0, seed=7) as stream:
        deltas = list(stream)
    tokens = [t for d in deltas for t in d.tokens]
    assert [t.index for t in tokens] == list(range(stream.usage.completion_tokens))
    assert stream.text() == ruled.text  # greedy: the same answer as the non-streamed request
    assert deltas[-1].finish_reason in ("stop", "length")
    blocks = stream.localist.blocks
    expected = ruled.localist.choices[0].tokens
    for got, want in zip(tokens, expected, strict=True):
        assert len(got.attribution) == len(blocks)
        assert got.token_id == want.token_id
        assert got.attribution == pytest.approx(want.attribution, abs=1e-4)
    assert client.audit.get(stream.audit_id).output.choices[0].text == stream.text()


async def test_async_twin_gives_the_same_answers(live, client, ruled):
    async with AsyncClient(*live) as aclient:
        response = await aclient.chat(QUESTION, blocks=RULES, target_block="R1", locality=0.5, audit="per_token",
                                      max_tokens=6, temperature=0.0, seed=7)
        assert response.text == ruled.text
        assert response.localist.choices[0].attribution == pytest.approx(
            ruled.localist.choices[0].attribution, abs=1e-5)
        record = await aclient.audit.get(response.localist.audit_id)
        assert record.localist() == response.localist
        listed = [r.id async for r in aclient.audit.list(page_size=2, max_items=5)]
        assert listed == [r.id for r in client.audit.list(max_items=5)]
        stream = await aclient.chat_stream("hello", max_tokens=3, temperature=0.0)
        async with stream:
            tokens = [t async for d in stream for t in d.tokens]
        assert len(tokens) == stream.usage.completion_tokens == 3
        assert (await aclient.audit.verify()).ok


def test_audit_list_paginates_and_filters(client, ruled):
    client.chat("filler", max_tokens=1)
    one_by_one = list(client.audit.list(page_size=1, max_items=4))
    at_once = list(client.audit.list(page_size=100, max_items=4))
    assert [r.id for r in one_by_one] == [r.id for r in at_once] and len(at_once) == 4
    seqs = [r.seq for r in at_once]
    assert seqs == sorted(seqs, reverse=True)  # newest first
    with_r1 = list(client.audit.list(block="R1"))
    assert ruled.localist.audit_id in {r.id for r in with_r1}
    assert all("R1" in r.blocks for r in with_r1)
    assert list(client.audit.list(since=f"{time.time() + 3600:.0f}")) == []
    high = list(client.audit.list(rho_min=0.85))
    assert high and all(r.rho_min >= 0.85 for r in high)


def test_report_json_and_html(client, ruled, tmp_path):
    audit_id = ruled.localist.audit_id
    report = client.audit.report(audit_id, path=tmp_path / "r.json")
    assert isinstance(report, AuditReport) and report.record.id == audit_id and report.verification.ok
    assert report.verification.record_id == audit_id and report.verification.seq == report.record.seq
    assert AuditReport.model_validate_json((tmp_path / "r.json").read_text()) == report
    html = client.audit.report(audit_id, format="html", path=tmp_path / "r.html")
    assert html.lstrip().lower().startswith("<!doctype html") and audit_id in html
    assert (tmp_path / "r.html").read_text() == html


def test_verify(client, ruled):
    result = client.audit.verify()
    newest = next(iter(client.audit.list(max_items=1)))
    assert result.ok and result.first_broken is None
    assert result.head_seq >= newest.seq and result.checked >= 1


def test_errors_name_the_field(client, live):
    with pytest.raises(BadRequestError) as bad:
        client.chat("hi", locality=1.5, max_tokens=1)
    assert bad.value.status_code == 400 and "locality" in (bad.value.param or "")
    with pytest.raises(BadRequestError) as preset:
        client.chat("hi", locality="sharpest", max_tokens=1)
    assert "locality" in (preset.value.param or "") and "sharpest" in preset.value.message
    with pytest.raises(BadRequestError) as target:
        client.chat("hi", blocks=RULES, target_block="R9", max_tokens=1)
    assert "target_block" in (target.value.param or "")
    with pytest.raises(NotFoundError) as missing:
        client.audit.get("no-such-record")
    assert missing.value.status_code == 404 and "no-such-record" in missing.value.message
    with Client(live[0], "lk_0000000000000000_" + "x" * 40, max_retries=0) as stranger:
        with pytest.raises(AuthenticationError) as denied:
            stranger.models()
    assert denied.value.status_code == 401 and denied.value.message


def test_blocks_are_checked_before_sending(client):
    with pytest.raises(ValidationError, match="label"):
        client.chat("hi", blocks=[{"label": "", "text": "x"}])
    with pytest.raises(ValidationError, match="pinned"):
        client.chat("hi", blocks=[BlockSpec(label="A", text="x"), {"label": "B", "text": "y", "pinned": "yes"}])


def test_rate_limit_reaches_the_caller(client, localist_server):
    """A key limited to one request a minute: the second answer is the server's 429, as RateLimitError."""
    token = client.keys.create("acme", name="one a minute", rate_limit_per_min=1).token
    with Client(localist_server.base_url, token, max_retries=0) as limited:
        assert limited.models().data
        with pytest.raises(RateLimitError) as limit:
            limited.models()
    assert limit.value.status_code == 429 and "rate limit of 1 requests per minute" in limit.value.message


def test_complete_stream(client):
    with client.complete_stream("The refund policy says", blocks=RULES, locality=0.5, max_tokens=5,
                                temperature=0.0) as stream:
        deltas = list(stream)
    tokens = [t for d in deltas for t in d.tokens]
    assert [t.index for t in tokens] == list(range(5)) == list(range(stream.usage.completion_tokens))
    assert all(len(t.attribution) == len(stream.localist.blocks) for t in tokens)
    assert "".join(d.text for d in deltas) == stream.text()
    record = client.audit.get(stream.audit_id)
    assert record.output.choices[0].text == stream.text()


def test_several_choices_each_get_metrics(client):
    response = client.chat(QUESTION, blocks=RULES, n=2, temperature=1.0, seed=3, max_tokens=4)
    assert [c.index for c in response.choices] == [m.index for m in response.localist.choices] == [0, 1]
    for metrics in response.localist.choices:
        assert metrics.num_tokens == 4
        assert math.isclose(sum(metrics.attribution), 1.0, abs_tol=1e-4)
    assert response.usage.completion_tokens == 8


def test_replay_reproduces_a_greedy_answer(client, ruled):
    result = client.audit.replay(ruled.localist.audit_id)
    assert result.matches and result.record_id == ruled.localist.audit_id
    tokens = [t.token_id for t in ruled.localist.choices[0].tokens]
    assert result.choices[0].original_token_ids == result.choices[0].replay_token_ids == tokens
    assert result.localist.choices[0].attribution == pytest.approx(ruled.localist.choices[0].attribution, abs=1e-5)
    assert client.audit.get(result.replay_id).status == "completed"


def test_redaction_erases_the_payload_and_keeps_the_chain(client):
    audit_id = client.chat("my account number is 12345", max_tokens=2).localist.audit_id
    summary = client.audit.redact(audit_id, "data subject request")
    assert summary.id == audit_id and summary.redacted
    record = client.audit.get(audit_id)
    assert record.redacted and record.request is None and record.output is None and record.localist() is None
    assert client.audit.verify().ok
    with pytest.raises(ConflictError) as again:
        client.audit.redact(audit_id, "twice")
    assert again.value.status_code == 409


def test_keys_create_list_revoke(client, localist_server):
    created = client.keys.create("globex", name="globex app", max_concurrency=2)
    assert created.key.tenant == "globex" and created.key.active and created.key.max_concurrency == 2
    assert created.key.key_id in {k.key_id for k in client.keys.list().data}
    with Client(localist_server.base_url, created.token, max_retries=0) as globex:
        answer = globex.chat("hello", max_tokens=2)
        assert [r.id for r in globex.audit.list()] == [answer.localist.audit_id]  # its own records only
        with pytest.raises(PermissionDeniedError) as denied:
            globex.keys.list()
        assert denied.value.status_code == 403
        revoked = client.keys.revoke(created.key.key_id)
        assert not revoked.active and revoked.revoked_us is not None
        with pytest.raises(AuthenticationError):
            globex.models()
    assert created.key.key_id not in {k.key_id for k in client.keys.list().data}
    assert created.key.key_id in {k.key_id for k in client.keys.list(include_revoked=True).data}


def test_purge_erases_one_tenants_old_payloads(client, localist_server):
    """Retention scoped to a tenant of its own, so the session's other records keep their payloads."""
    token = client.keys.create("purgeco").token
    with Client(localist_server.base_url, token) as purgeco:
        audit_id = purgeco.chat("old conversation", max_tokens=2).localist.audit_id
    result = client.audit.purge(time.time() + 1, tenant="purgeco")
    assert result.erased == 1
    record = client.audit.get(audit_id)
    assert record.redacted and record.output is None
    assert client.audit.verify().ok


def test_public_key_is_the_signing_keys_public_half(client, localist_server):
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    pem = client.audit.public_key()
    private = load_pem_private_key(localist_server.signing_key.read_bytes(), password=None)
    assert pem.encode() == private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
