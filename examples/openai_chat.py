"""Chat through the official `openai` SDK; the locality extensions travel in `extra_body`.

    LOCALIST_BASE_URL=http://127.0.0.1:8000 LOCALIST_API_KEY=... python examples/openai_chat.py

The response is an ordinary `ChatCompletion`; the server's `localist` object (dial, blocks, attribution,
entropy, pointer fidelity, theory bounds, audit id) arrives as an extra field on it.
"""
import os

from openai import OpenAI

base = os.environ.get("LOCALIST_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
client = OpenAI(base_url=f"{base}/v1", api_key=os.environ.get("LOCALIST_API_KEY") or "dev")
model = client.models.list().data[0].id

completion = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "A customer bought a discounted jacket. Can they get a refund?"}],
    max_tokens=12,
    temperature=0,
    extra_body={
        "locality": 0.5,  # the dial ρ: 0 = the base model, towards 1 = attend to one block
        "blocks": [
            {"label": "R1", "kind": "rule", "text": "Refunds are paid within 30 days of a written claim."},
            {"label": "R2", "kind": "rule", "text": "Discounted items are never refunded."},
        ],
        "target_block": "R2",  # ground truth, for pointer fidelity
        "audit": "summary",
    },
)

localist = completion.localist  # the SDK keeps unknown fields as attributes (plain dicts)
metrics = localist["choices"][0]
print("answer:", completion.choices[0].message.content)
print("dial ρ per layer:", localist["locality"]["rho"])
for block in localist["blocks"]:
    print(f"  {block['label']:<10} {block['kind']:<9} attribution {metrics['attribution'][block['id']]:.3f}")
theory = metrics["theory"]  # its bounds are on the scored heads' aggregate, not on all heads' (docs/theory.md §3)
print(f"pointer fidelity: {metrics['pointer_fidelity']:.3f} (all heads); "
      f"{theory['fidelity_measured']:.3f} (scored heads, bound ≥ {theory['fidelity_bound']:.3f})")
print("audit_id:", localist["audit_id"])
