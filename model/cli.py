"""`localist train` and `localist eval`: the default model's training and its results table."""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields

from localist.model.train_config import TrainConfig


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: the flags given, the defaults for the rest."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    for name, value in values.items():
        if isinstance(value, list):  # the (start, end) ramps
            values[name] = tuple(value)
    values["progress"] = not args.no_progress
    return TrainConfig(**values)


def _train(args: argparse.Namespace) -> int:
    from localist.model.train import train

    path = train(train_config(args))
    print(f"model written to {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from localist.model.evaluate import evaluate, format_table

    rhos = [float(r) for r in args.rho.split(",")]
    table = evaluate(args.model, twin=args.twin, rhos=rhos, split=args.split, count=args.examples, seed=args.seed,
                     progress=not args.no_progress)
    print(format_table(table))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=2)
            f.write("\n")
    if args.check:
        from localist.model.evaluate import compare_tables

        with open(args.check) as f:
            problems = compare_tables(json.load(f), table, tolerance=args.tolerance)
        for p in problems:
            print("MISMATCH", p)
        print("reproduced within ±%g" % args.tolerance if not problems else f"{len(problems)} numbers differ")
        return 1 if problems else 0
    return 0


def add_commands(subparsers) -> None:
    train = subparsers.add_parser("train", help="train the default localist model (data, tokenizer, dial, recruitment)")
    for f in fields(TrainConfig):
        if f.name == "progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is MISSING:
            train.add_argument(flag, dest=f.name, required=True, help="output folder (checkpoints resume from here)")
        elif isinstance(f.default, bool):  # --flag / --no-flag (type=bool would take "False" as true)
            train.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"default {f.default}")
        elif isinstance(f.default, tuple):
            train.add_argument(flag, dest=f.name, type=float, nargs=len(f.default), default=None,
                               help=f"default {' '.join(map(str, f.default))}")
        else:
            train.add_argument(flag, dest=f.name, type=type(f.default), default=None, help=f"default {f.default}")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    ev = subparsers.add_parser("eval", help="regenerate a model's results table over the dial")
    ev.add_argument("--model", default="models/localist-tiny", help="model folder (default: the shipped model)")
    ev.add_argument("--twin", default="auto", help="μ = 0 twin folder; 'auto' = <model>/mu0 if present; 'none' to skip")
    ev.add_argument("--rho", default="0,0.25,0.5,0.75,0.9,1.0", help="comma-separated dial values")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ev.add_argument("--examples", type=int, default=400)
    ev.add_argument("--seed", type=int, default=None, help="data seed (default: the model's training seed)")
    ev.add_argument("--out", help="write the table as JSON here")
    ev.add_argument("--check", help="a stored table (e.g. the model card's eval.json) to compare against")
    ev.add_argument("--tolerance", type=float, default=0.02)
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)
