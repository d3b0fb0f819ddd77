"""`blocks: "auto"` end to end on the session's server (tests/conftest.py: the small test model): the
message is segmented by the exact criterion under the served weights, every decision is in the record
inside the hash chain, the record replays, and bad segmentation fields are 400s naming the field."""
from __future__ import annotations

import httpx
import pytest

from localist.clients import contract as C
from localist.model.blocks import table_from_chat
from localist.model.reference import ReferenceLM
from localist.model.segmentation import DEFAULT_SHORTLIST, DEFAULT_WINDOW, Segmenter, planted_document

TEXT = planted_document(7, segments=2, paragraphs=2)[0]  # 467 tokens: the test server holds 512


def _chat(server, body: dict, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers(key), timeout=600,
                      json={"model": server.model, "max_tokens": 4, "temperature": 0, **body})


def test_auto_blocks_segment_the_message_and_every_decision_is_recorded(localist_server):
    s = localist_server
    spec = {"rho": 0.9, "unit": "sentence", "extra_cost": 0.0, "max_splits": 3}
    resp = _chat(s, {"messages": [{"role": "user", "content": TEXT}], "blocks": "auto", "segmentation": spec},
                 s.tenant_key)
    assert resp.status_code == 200, resp.text
    audit_id = resp.json()["localist"]["audit_id"]
    record = C.read(C.AuditRecord, httpx.get(f"{s.base_url}/v1/audit/{audit_id}", headers=s.headers(s.tenant_key),
                                             timeout=30).json())
    seg = record.request.segmentation
    assert seg is not None and seg.rho == 0.9 and seg.unit == "sentence" and seg.weights_hash == record.request.weights_hash
    accepted = [d for d in seg.decisions if d.accepted]
    assert seg.decisions and all(d.accepted == (d.gain_nats > d.cost_nats) for d in seg.decisions)
    assert seg.blocks_after - seg.blocks_before == len(accepted) == len(record.request.blocks) - seg.blocks_before
    assert seg.decisions[-1].accepted is False or len(accepted) == 3
    # the record's blocks are the response's, and they hold the split message's pieces
    assert [b.label for b in record.request.blocks] == [b["label"] for b in resp.json()["localist"]["blocks"]]

    # the same search offline on the same weights and the same table gives the same decisions
    lm = ReferenceLM.from_pretrained(s.model_dir)
    table = table_from_chat(lm.tokenizer, [{"role": "user", "content": TEXT}])
    offline = Segmenter(lm, 0.9, DEFAULT_SHORTLIST, DEFAULT_WINDOW, "sentence").segment(table, 0.0, 3)  # the server's
    assert [(d.at, d.accepted) for d in offline.decisions] == [(d.at, d.accepted) for d in seg.decisions]
    for mine, theirs in zip(offline.decisions, seg.decisions):
        assert theirs.gain_nats == pytest.approx(mine.gain_nats, abs=1e-3)
        assert theirs.cost_nats == pytest.approx(mine.cost_nats)

    verify = httpx.post(f"{s.base_url}/v1/audit/verify", headers=s.headers(), timeout=120).json()
    assert verify["ok"], verify
    replay = httpx.post(f"{s.base_url}/v1/audit/{audit_id}/replay", headers=s.headers(s.tenant_key), timeout=600)
    assert replay.status_code == 200 and replay.json()["matches"], replay.text


@pytest.mark.parametrize("body,param", [
    ({"blocks": "auto", "segmentation": {"rho": 0}}, "segmentation.rho"),
    ({"blocks": "auto", "segmentation": {"unit": "word"}}, "segmentation.unit"),
    ({"blocks": "auto", "segmentation": {"extra_cost": -1}}, "segmentation.extra_cost"),
    ({"segmentation": {"rho": 0.5}}, "segmentation"),
    ({"blocks": "everything"}, "blocks"),
])
def test_bad_segmentation_fields_are_400s_naming_the_field(localist_server, body, param):
    resp = _chat(localist_server, {"messages": [{"role": "user", "content": TEXT}], **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith(param), resp.json()


def test_auto_refuses_a_token_id_prompt(localist_server):
    s = localist_server
    resp = httpx.post(f"{s.base_url}/v1/completions", headers=s.headers(), timeout=60,
                      json={"model": s.model, "prompt": [1, 5, 6, 7], "blocks": "auto", "max_tokens": 1})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "blocks", resp.text
