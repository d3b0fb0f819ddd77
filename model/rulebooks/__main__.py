"""Print examples: ``python -m localist.model.rulebooks --show 5 [--split test] [--seed 0]``."""
from __future__ import annotations

import argparse

from localist.model.rulebooks import handwritten
from localist.model.rulebooks.generator import SPLITS, examples
from localist.model.rulebooks.render import messages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m localist.model.rulebooks", description=__doc__)
    parser.add_argument("--show", type=int, default=3, help="how many examples to print")
    parser.add_argument("--split", choices=[*SPLITS, "handwritten"], default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="index of the first example")
    args = parser.parse_args(argv)
    if args.split == "handwritten":
        shown = handwritten.load()[args.start:args.start + args.show]
    else:
        shown = list(examples(args.seed, args.split, args.show, args.start))
    for ex in shown:
        print(f"=== {ex.id} ({ex.domain}) target: {ex.target}")
        for m in messages(ex):
            print(f"--- {m['role']}\n{m['content']}")
        print(f"--- answer\n{ex.answer}\n")


if __name__ == "__main__":
    main()
