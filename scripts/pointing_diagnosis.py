"""Where the pointing queries of a fine-tuned rulebook model look (teacher-forced, reference attention, CPU).

For validation examples with a target rule, per group of pointing queries (``Encoded.pointing``:
before the label, inside it, the outcome word): the attention mass on the rule blocks summed over
layers and heads, the target's share of it, and whether the argmax is the answer's token.

    python scripts/pointing_diagnosis.py MERGED_FOLDER [--examples 12] [--rho 0,0.9]
"""
import argparse

import torch
from transformers import AutoTokenizer

from localist.model.reference import load_localist_model
from localist.model.rulebooks import encode, examples
from localist.model.train import collate, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--rho", default="0,0.9")
    args = parser.parse_args()
    model = load_localist_model(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    cases = [e for e in examples(0, "validation", 4 * args.examples) if e.target][: args.examples]
    for rho in (float(r) for r in args.rho.split(",")):
        groups: dict[str, list[float]] = {}
        for case in cases:
            enc = encode(case, tok)
            batch = collate([enc], tok.pad_token_id, 0.0)
            with torch.no_grad():
                logits, stats = forward(model, batch, torch.tensor([rho]))
            prompt = len(enc.table.token_ids)
            for k in enc.pointing:
                t = prompt - 1 + k  # the query that predicts answer token k
                on_c = sum(float((s.mass[0, :, t] * batch.candidate[0]).sum()) for s in stats)
                on_t = sum(float(s.mass[0, :, t, enc.target_block].sum()) for s in stats)
                right = float(int(logits[0, t].argmax()) == enc.answer_ids[k])
                name = "outcome" if k == enc.pointing[-1] else "inside the label" if k >= enc.lookup else "before the label"
                g = groups.setdefault(name, [0, 0.0, 0.0, 0.0])
                g[0] += 1
                g[1] += on_t
                g[2] += on_c
                g[3] += right
        heads = model.config.num_hidden_layers * model.config.num_attention_heads
        for name, (n, on_t, on_c, right) in groups.items():
            print(f"rho={rho} {name}: {n} queries, candidate mass {on_c / n:.2f} of {heads}, "
                  f"fidelity {on_t / max(on_c, 1e-12):.3f}, argmax right {right / n:.2f}")


if __name__ == "__main__":
    main()
