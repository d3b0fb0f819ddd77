"""The request field ``dial_scope`` (issue 17, item 4; docs/theory.md §2 "Dial scope") against the real server:
``all`` leaves every unpinned block free, ``evidence`` pins every block that is not a candidate; the scope
used is in the response, the audit record and the replay. The model's default is tested in
tests/test_provenance.py (a server whose localist.json sets it)."""
from __future__ import annotations

import pytest

from localist.clients import BadRequestError, Client

MSG = [{"role": "system", "content": "You decide loan cases by the rules."},
       {"role": "user", "content": "Does rule R1 apply to a loan of 60000 EUR?"}]
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR needs a second approval."},
         {"label": "R2", "kind": "rule", "text": "Rule R2: Claims filed after 30 days are not eligible."},
         {"label": "D1", "kind": "document", "text": "Document D1: the applicant requests 60000 EUR."}]


async def chat(client, server, **extra) -> dict:
    body = {"model": server.model, "messages": MSG, "blocks": RULES, "max_tokens": 1, **extra}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_evidence_pins_every_non_candidate_block_in_the_response_record_and_replay(localist_server, api):
    body = await chat(api, localist_server, locality=0.9, dial_scope="evidence", max_tokens=4, seed=7)
    blocks = body["localist"]["blocks"]
    assert body["localist"]["locality"]["scope"] == "evidence"
    assert [b["label"] for b in blocks if b["candidate"]] == ["R1", "R2", "D1"]
    assert all(b["pinned"] for b in blocks if not b["candidate"]) and len(blocks) > 4
    record = (await api.get(f"/v1/audit/{body['id']}")).json()
    assert record["request"]["dial_scope"] == "evidence" and record["request"]["body"]["dial_scope"] == "evidence"
    assert record["request"]["blocks"] == blocks
    assert [bool(s[3]) for s in record["replay"]["block_spans"]] == [not b["candidate"] for b in blocks]

    replay = (await api.post(f"/v1/audit/{body['id']}/replay")).json()
    assert replay["matches"] and replay["provenance_differences"] == []
    assert replay["localist"]["locality"]["scope"] == "evidence" and replay["localist"]["blocks"] == blocks
    again = (await api.get(f"/v1/audit/{replay['replay_id']}")).json()
    assert again["request"]["dial_scope"] == "evidence"


async def test_all_is_the_default_and_frees_every_unpinned_block(localist_server, api):
    body = await chat(api, localist_server, locality=0.9)
    record = (await api.get(f"/v1/audit/{body['id']}")).json()
    assert body["localist"]["locality"]["scope"] == record["request"]["dial_scope"] == "all"
    assert [b["label"] for b in body["localist"]["blocks"] if b["pinned"]] == ["sink"]


async def test_the_evidence_scope_keeps_every_pinned_block_at_its_base_mass(localist_server, api):
    """Pinned blocks keep each head's base mass, so in layer 0 (whose inputs the dial cannot change)
    every non-candidate block's attribution, and the candidates' total, equal ρ = 0's under `evidence`,
    while the candidates' mass is reshuffled; under `all` the dial moves the non-candidates' mass too."""
    async def layer0(rho: float, scope: str) -> tuple[list[float], list[dict]]:
        body = await chat(api, localist_server, locality=rho, dial_scope=scope, audit="per_layer")
        return body["localist"]["choices"][0]["tokens"][0]["layer_attribution"][0], body["localist"]["blocks"]

    base, blocks = await layer0(0.0, "all")
    evidence, _ = await layer0(0.9, "evidence")
    free, _ = await layer0(0.9, "all")
    fixed = [b["id"] for b in blocks if not b["candidate"]]
    candidates = [b["id"] for b in blocks if b["candidate"]]
    assert [evidence[i] for i in fixed] == pytest.approx([base[i] for i in fixed], abs=1e-5)
    assert sum(evidence[i] for i in candidates) == pytest.approx(sum(base[i] for i in candidates), abs=1e-5)
    assert [evidence[i] for i in candidates] != pytest.approx([base[i] for i in candidates], abs=1e-3)
    assert [free[i] for i in fixed[1:]] != pytest.approx([base[i] for i in fixed[1:]], abs=1e-3)  # sink: pinned


@pytest.mark.parametrize("value", ["rules", "", 1, ["all"]])
async def test_a_bad_dial_scope_is_a_400_naming_the_field(localist_server, api, value):
    r = await api.post("/v1/chat/completions", json={"model": localist_server.model, "messages": MSG,
                                                      "max_tokens": 1, "dial_scope": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "dial_scope"


def test_the_client_sends_it_and_the_cli_shows_it(localist_server, capsys):
    with Client(localist_server.base_url, localist_server.admin_key) as client:
        response = client.complete("Rule R1: loans above 50000 EUR need approval.", max_tokens=1, locality=0.5,
                                   dial_scope="evidence")
        assert response.localist.locality.scope == "evidence"
        assert client.audit.get(response.id).request.dial_scope == "evidence"
        with pytest.raises(BadRequestError) as refused:
            client.chat("hello", dial_scope="rules", max_tokens=1)
        assert refused.value.param == "dial_scope"
    from localist.clients.cli import main

    assert main(["chat", "Does R1 apply?", "--rule", "R1=Loans above 50000 EUR need approval.", "--locality", "0.5",
                 "--dial-scope", "evidence", "--max-tokens", "1", "--url", localist_server.base_url,
                 "--api-key", localist_server.admin_key]) == 0
    assert "ρ = 0.5, scope evidence" in capsys.readouterr().out
