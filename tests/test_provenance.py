"""Provenance in every audit record (issue 18, item 5): the checkpoint's input files, dtype, attention ISA,
tensor-parallel size, vLLM and localist versions; the same on ``GET /v1/models``; replay names what differs.

A second server shares the session server's audit store and serves a copy of the same checkpoint in
bfloat16 (same weight files, so replays are allowed), with ``localist.json`` setting the model's dial
scope to ``evidence``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

import httpx
import pytest
import vllm

from conftest import free_port, serving
from test_real_model import gguf_file, smollm2_f32  # noqa: F401 — the converted SmolLM2 folder, a fixture
from localist.clients import contract as C
from localist.clients.cli import main as localist_cli
from localist.clients.commands import render_replay
from localist.model.provenance import checkpoint
from localist.server.planning import provenance_differences
from localist.server.store.records import canonical

MSG = [{"role": "user", "content": "Does rule R1 apply to a loan of 60000 EUR?"}]
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR needs a second approval."},
         {"label": "D1", "kind": "document", "text": "Document D1: the applicant requests 60000 EUR."}]
PAYLOAD = ("request", "output", "metrics", "error", "timestamps", "replay")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def chat(client: httpx.AsyncClient, model: str, **extra) -> dict:
    r = await client.post("/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 4,
                                                          "blocks": RULES, "seed": 3, **extra})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def bf16_server(localist_server, tmp_path_factory):
    """The session's checkpoint copied, with dial scope `evidence` in its localist.json, served in bfloat16
    on the session's audit store."""
    root = tmp_path_factory.mktemp("provenance")
    model_dir = root / "copy"
    shutil.copytree(localist_server.model_dir, model_dir)
    (model_dir / "localist.json").write_text(json.dumps({"dial_scope": "evidence"}))
    port = free_port()
    args = ["--model", str(model_dir), "--name", localist_server.model, "--db", localist_server.db_url,
            "--no-signing", "--max-model-len", "512", "--dtype", "bfloat16"]
    with serving(args, port, root / "server.log", root / "home"):
        yield f"http://127.0.0.1:{port}"


async def test_every_record_carries_the_checkpoint_files_sha256_inside_its_hashed_payload(localist_server, api):
    body = await chat(api, localist_server.model)
    record = (await api.get(f"/v1/audit/{body['id']}")).json()
    provenance = record["request"]["provenance"]
    weights = localist_server.model_dir / "model.safetensors"
    assert provenance["checkpoint_sha256"] == sha256_of(weights)  # one file: that file's own sha256
    assert provenance["checkpoint_files"] == [{"name": "model.safetensors", "sha256": sha256_of(weights)}]
    assert provenance["checkpoint_format"] == "safetensors"
    assert provenance["dtype"] == "float32" and provenance["tensor_parallel_size"] == 1
    assert provenance["attention_isa"] in ("vec", "vec16", "amx")
    assert provenance["vllm_version"] == vllm.__version__
    assert provenance["localist_version"] == importlib.metadata.version("localist")
    payload = {part: record[part] for part in PAYLOAD}
    assert hashlib.sha256(canonical(payload)).hexdigest() == record["hashes"]["payload"]  # in the chain


async def test_models_shows_the_same_provenance_as_the_records(localist_server, api):
    model = (await api.get("/v1/models")).json()["data"][0]
    record = (await api.get(f"/v1/audit/{(await chat(api, localist_server.model))['id']}")).json()
    assert model["provenance"] == record["request"]["provenance"]
    assert model["dial_scope"] == "all"  # the session model has no dial_scope in a localist.json


async def test_the_report_and_the_cli_show_the_provenance_and_the_dial_scope(localist_server, api, capsys):
    body = await chat(api, localist_server.model, dial_scope="evidence")
    record = (await api.get(f"/v1/audit/{body['id']}")).json()
    provenance = record["request"]["provenance"]
    page = (await api.get(f"/v1/audit/{body['id']}/report", params={"format": "html"})).text
    assert "<tr><th>Dial scope</th><td>evidence</td></tr>" in page
    assert f"checkpoint <code>{provenance['checkpoint_sha256']}</code> (safetensors" in page
    assert f"{provenance['dtype']}, attention ISA {provenance['attention_isa']}, tensor parallel 1" in page
    assert localist_cli(["audit", "show", body["id"], "--url", localist_server.base_url,
                         "--api-key", localist_server.admin_key]) == 0
    out = capsys.readouterr().out
    assert f"served  checkpoint {provenance['checkpoint_sha256'][:16]}… (safetensors)   float32" in out
    assert ", scope evidence" in out


def test_a_sharded_checkpoint_is_identified_by_its_sha256sum_listing(tmp_path):
    for name, data in (("model-00002-of-00002.safetensors", b"second"), ("model-00001-of-00002.safetensors", b"first")):
        (tmp_path / name).write_bytes(data)
    listing = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in
                      (("model-00001-of-00002.safetensors", b"first"), ("model-00002-of-00002.safetensors", b"second")))
    found = checkpoint(tmp_path)
    assert found.sha256 == hashlib.sha256(listing.encode()).hexdigest()
    assert [name for name, _ in found.files] == sorted(p.name for p in tmp_path.iterdir())


def test_a_merged_model_is_identified_by_its_base_gguf_and_adapter(tmp_path):
    """The default model's folder (model/default_model.py) is a GGUF base merged with a LoRA adapter here:
    its provenance.json names both inputs, and the identity is theirs."""
    from localist.model.finetune import ADAPTER_WEIGHTS

    gguf, adapter = "b" * 64, "c" * 64
    (tmp_path / "model.safetensors").write_bytes(b"merged on this host")
    (tmp_path / "provenance.json").write_text(json.dumps({
        "base": {"source": {"format": "gguf", "file": "base.gguf", "sha256": gguf}, "dtype": "float32"},
        "adapter": {"sha256": adapter, "config": {}}, "dtype": "float32"}))
    found = checkpoint(tmp_path)
    assert found.format == "gguf+lora" and found.files == ((ADAPTER_WEIGHTS, adapter), ("base.gguf", gguf))
    listing = f"{adapter}  {ADAPTER_WEIGHTS}\n{gguf}  base.gguf\n"
    assert found.sha256 == hashlib.sha256(listing.encode()).hexdigest()


def test_a_converted_gguf_is_identified_by_the_gguf_file(smollm2_f32):
    """Not by the converted weights: the conversion (``localist import``, cached across runs by
    tests/test_real_model.py) writes provenance.json naming the GGUF's sha256. The served case:
    tests/test_real_model.py::test_a_gguf_server_records_the_gguf_files_provenance."""
    gguf = gguf_file()
    found = checkpoint(smollm2_f32)
    assert found.sha256 == sha256_of(gguf) and found.format == "gguf"
    assert found.files == ((gguf.name, sha256_of(gguf)),)
    assert found.sha256 != sha256_of(smollm2_f32 / "model.safetensors")


async def test_replay_on_a_server_of_another_dtype_names_the_differing_fields_first(localist_server, api,
                                                                                     bf16_server, capsys):
    original = await chat(api, localist_server.model)
    async with httpx.AsyncClient(base_url=bf16_server, headers=localist_server.headers(), timeout=120) as other:
        served = (await other.get("/v1/models")).json()["data"][0]["provenance"]
        r = await other.post(f"/v1/audit/{original['id']}/replay")
    assert r.status_code == 200, r.text
    replay = r.json()
    differences = {d["field"]: (d["recorded"], d["served"]) for d in replay["provenance_differences"]}
    assert differences["dtype"] == ("float32", "bfloat16")
    assert served["dtype"] == "bfloat16"
    assert "checkpoint_sha256" not in differences and "vllm_version" not in differences  # same files, same vLLM
    record = (await api.get(f"/v1/audit/{replay['replay_id']}")).json()
    assert record["request"]["provenance"] == served and record["request"]["replay_of"] == original["id"]

    # the CLI says it before the outputs are compared
    code = localist_cli(["audit", "replay", original["id"], "--url", bf16_server, "--api-key", localist_server.admin_key])
    out = capsys.readouterr().out.splitlines()
    assert code in (0, 1)
    assert out[0] == "provenance DIFFERS from the record's:" and "  dtype: float32 recorded, bfloat16 served" in out
    assert out.index("  dtype: float32 recorded, bfloat16 served") < next(
        i for i, line in enumerate(out) if line.startswith("replay "))


async def test_the_model_default_dial_scope_comes_from_localist_json(localist_server, bf16_server):
    async with httpx.AsyncClient(base_url=bf16_server, headers=localist_server.headers(), timeout=120) as other:
        assert (await other.get("/v1/models")).json()["data"][0]["dial_scope"] == "evidence"
        body = await chat(other, localist_server.model)
        asked = await chat(other, localist_server.model, dial_scope="all")
        record = (await other.get(f"/v1/audit/{body['id']}")).json()
    assert body["localist"]["locality"]["scope"] == record["request"]["dial_scope"] == "evidence"
    assert asked["localist"]["locality"]["scope"] == "all"
    assert all(b["pinned"] for b in record["request"]["blocks"] if not b["candidate"])


def test_a_record_without_provenance_replays_saying_so():
    """Records written before provenance existed (tests/data/audit_store_v1) have none to compare."""
    served = C.Provenance(checkpoint_sha256="a" * 64, checkpoint_format="safetensors",
                          checkpoint_files=[C.CheckpointFile(name="model.safetensors", sha256="a" * 64)],
                          dtype="float32", attention_isa="vec", tensor_parallel_size=1, vllm_version="0.32.0",
                          localist_version="0.1.0")
    assert provenance_differences(None, served) is None
    assert provenance_differences(served, served) == []
    other = served.model_copy(update={"attention_isa": "amx", "tensor_parallel_size": 2})
    assert [(d.field, d.recorded, d.served) for d in provenance_differences(other, served)] == [
        ("attention_isa", "amx", "vec"), ("tensor_parallel_size", 2, 1)]
    result = C.ReplayResult(record_id="r", replay_id="p", provenance_differences=None, matches=True, choices=[],
                            localist=C.LocalistResult.model_construct())
    assert render_replay(result).splitlines()[0] == "provenance: the record has none (written before records carried it)"
