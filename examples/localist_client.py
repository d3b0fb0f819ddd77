"""The typed localist client: sweep the locality dial and watch attention concentrate on one block.

    LOCALIST_BASE_URL=http://127.0.0.1:8000 LOCALIST_API_KEY=... python examples/localist_client.py

Same question, same rules, three dial settings. As ρ rises each head's block distribution sharpens
(docs/theory.md §2), so the response's block entropy H(π) usually falls, while the model's logits still decide
*which* block wins. Then one streamed answer, token by token, with each token's attribution.
"""
from localist.clients import Client

RULES = [
    {"label": "R1", "kind": "rule", "text": "Refunds are paid within 30 days of a written claim."},
    {"label": "R2", "kind": "rule", "text": "Discounted items are never refunded."},
    {"label": "R3", "kind": "rule", "text": "Gift cards cannot be exchanged for cash."},
]
QUESTION = "Can a discounted jacket be refunded?"

with Client() as client:  # $LOCALIST_BASE_URL and $LOCALIST_API_KEY
    print(f"{'rho':>4}  {'block H(pi) nats':>16}  {'fidelity':>8}  top rule  audit record")
    for rho in (0.0, 0.5, 0.9):
        response = client.chat(QUESTION, blocks=RULES, target_block="R2", locality=rho, max_tokens=8,
                               temperature=0)
        result = response.localist
        metrics = result.choices[0]
        rules = [b for b in result.blocks if b.kind == "rule"]
        top = max(rules, key=lambda b: metrics.attribution[b.id])
        print(f"{rho:>4}  {metrics.entropy.block_nats:>16.4f}  {metrics.pointer_fidelity:>8.4f}  {top.label:<8}  "
              f"{result.audit_id}")

    with client.chat_stream(QUESTION, blocks=RULES, locality=0.5, max_tokens=6, temperature=0) as stream:
        pieces = [(delta.text, token) for delta in stream for token in delta.tokens]
    labels = [b.label for b in stream.localist.blocks]
    for text, token in pieces:
        top = max(range(len(token.attribution)), key=token.attribution.__getitem__)
        print(f"{text!r:>12}  top block {labels[top]:<8} {token.attribution[top]:.3f}")
    print("streamed text:", repr(stream.text()))
    print("audit_id:", stream.audit_id)
