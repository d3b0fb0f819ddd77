"""Streaming through the official `openai` SDK: every chunk carries its tokens' block attribution.

    LOCALIST_BASE_URL=http://127.0.0.1:8000 LOCALIST_API_KEY=... python examples/openai_stream.py

Per-token attribution is on each choice (`choice.localist.tokens`); the final chunk, which has no
choices, carries the whole `localist` summary (block labels, metrics, audit id) and the usage.
"""
import os

from openai import OpenAI

base = os.environ.get("LOCALIST_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
client = OpenAI(base_url=f"{base}/v1", api_key=os.environ.get("LOCALIST_API_KEY") or "dev")
model = client.models.list().data[0].id

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Which rule covers late claims?"}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={
        "locality": "balanced",
        "blocks": [
            {"label": "R1", "kind": "rule", "text": "Claims later than 30 days are refused."},
            {"label": "R2", "kind": "rule", "text": "Claims must be written."},
        ],
    },
)

tokens, summary, usage = [], None, None
for chunk in stream:
    for choice in chunk.choices:
        print(choice.delta.content or "", end="", flush=True)
        extra = getattr(choice, "localist", None)
        tokens += extra["tokens"] if extra else []
    summary = getattr(chunk, "localist", None) or summary
    usage = chunk.usage or usage
print()

labels = [b["label"] for b in summary["blocks"]]
for token in tokens:
    top = max(range(len(token["attribution"])), key=token["attribution"].__getitem__)
    print(f"token {token['index']:>2} (id {token['token_id']:>4}): top block {labels[top]:<8} "
          f"{token['attribution'][top]:.3f}")
print(f"tokens streamed: {len(tokens)}  completion_tokens: {usage.completion_tokens}")
print("audit_id:", summary["audit_id"])
