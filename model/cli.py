"""`localist train`, `localist finetune`, `localist merge` and `localist eval`: training, the LoRA
fine-tune of a pretrained model, its merge into a servable folder, and the results table."""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields

from localist.model.train_config import FinetuneConfig, TrainConfig


def _config(args: argparse.Namespace, cls):
    """The run's settings: the flags given, the defaults for the rest."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    for name, value in values.items():
        if isinstance(value, list):  # the (start, end) ramps
            values[name] = tuple(value)
    values["progress"] = not args.no_progress
    return cls(**values)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return _config(args, TrainConfig)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return _config(args, FinetuneConfig)


def _train(args: argparse.Namespace) -> int:
    from localist.model.train import train

    path = train(train_config(args))
    print(f"model written to {path}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from localist.model.finetune import finetune

    path = finetune(finetune_config(args))
    print(f"adapter written to {path}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    import sys
    import tempfile
    from pathlib import Path

    from localist.model.default_model import merged_model_dir
    from localist.model.finetune import base_folder, merge_adapter

    if args.out:
        with tempfile.TemporaryDirectory() as work:  # a GGUF base is converted here, then dropped
            out = merge_adapter(base_folder(args.base, Path(work)), args.adapter, args.out)
    elif args.base.endswith(".gguf"):
        from localist.server.cli import data_dir

        out = merged_model_dir(args.base, args.adapter, data_dir())
    else:
        print("localist merge: --out: needed when --base is a folder (the cache is keyed by the GGUF's sha256)",
              file=sys.stderr)
        return 2
    print(out)
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


def _add_config_flags(parser: argparse.ArgumentParser, cls, required_help: dict[str, str]) -> None:
    """One flag per field of the settings dataclass ``cls``."""
    for f in fields(cls):
        if f.name == "progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is MISSING:
            parser.add_argument(flag, dest=f.name, required=True, help=required_help[f.name])
        elif isinstance(f.default, bool):  # --flag / --no-flag (type=bool would take "False" as true)
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"default {f.default}")
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, dest=f.name, type=float, nargs=len(f.default), default=None,
                                help=f"default {' '.join(map(str, f.default))}")
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=None, help=f"default {f.default}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _eval_rulebooks(args: argparse.Namespace) -> int:
    from pathlib import Path

    from localist.model.evaluate import evaluate_rulebooks, format_rulebook_table, majority_baseline, rulebook_cases

    rhos = [float(r) for r in args.rho.split(",")]
    case_sets = {split: rulebook_cases(split, args.examples if split != "handwritten" else 10**6, args.seed)
                 for split in args.splits.split(",")}
    tables = evaluate_rulebooks(args.model, case_sets, rhos, args.scopes.split(","),
                                Path(args.responses) if args.responses else None,
                                [int(t) for t in args.stop_token_ids.split(",") if t])
    result = {"model": args.model, "rhos": rhos, "stop_token_ids": args.stop_token_ids,
              "cases": {name: {"n": len(cases), "ids": [c.id for c in cases],
                               "majority_baseline": majority_baseline(cases), "tables": tables[name]}
                        for name, cases in case_sets.items()}}
    for name, entry in result["cases"].items():
        for scope, rows in entry["tables"].items():
            print(f"\n{name}, dial scope {scope}:")
            print(format_rulebook_table(Path(args.model).name, rows, entry["majority_baseline"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.check:
        from localist.model.evaluate import compare_rulebook_tables

        name, _, stored_path = args.check.partition("=")
        stored = json.loads(Path(stored_path).read_text())["tables"][name]
        problems = compare_rulebook_tables(stored, {k: v["tables"] for k, v in result["cases"].items()}, args.tolerance)
        for p in problems:
            print("MISMATCH", p)
        print("reproduced within ±%g" % args.tolerance if not problems else f"{len(problems)} numbers differ")
        return 1 if problems else 0
    return 0


def add_commands(subparsers) -> None:
    train = subparsers.add_parser("train", help="train the default localist model (data, tokenizer, dial, recruitment)")
    _add_config_flags(train, TrainConfig, {"out": "output folder (checkpoints resume from here)"})
    train.set_defaults(func=_train)

    ft = subparsers.add_parser("finetune", help="LoRA fine-tune of a pretrained model on the rulebook task, with the dial")
    _add_config_flags(ft, FinetuneConfig, {"out": "output folder of the adapter",
                                           "base": "the pretrained base: a .gguf file or a Hugging Face folder"})
    ft.set_defaults(func=_finetune)

    merge = subparsers.add_parser("merge", help="merge a LoRA adapter into its base as a float32 folder vLLM serves")
    merge.add_argument("--base", required=True, help="the base the adapter was trained on: a .gguf file or a folder")
    merge.add_argument("--adapter", required=True, help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("--out", help="folder to write (default: $LOCALIST_HOME/models/<GGUF sha256>-<adapter sha256>-"
                                     "float32, written once; needs a .gguf base)")
    merge.set_defaults(func=_merge)

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

    rb = subparsers.add_parser("eval-rulebooks", help="a model's rulebook-task table over the dial, served through vLLM")
    rb.add_argument("--model", required=True, help="model folder (a merged fine-tune or an imported base)")
    rb.add_argument("--splits", default="test,handwritten",
                    help="comma-separated: train, validation, test, handwritten, or <split>-target-removed (the "
                         "faithfulness probe: each case with a target rule, that rule removed, expects no rule)")
    rb.add_argument("--examples", type=int, default=80, help="examples of each generated split (the first ones)")
    rb.add_argument("--seed", type=int, default=0)
    rb.add_argument("--rho", default="0,0.25,0.5,0.75,0.9,1.0", help="comma-separated dial values")
    rb.add_argument("--scopes", default="all", help="comma-separated dial scopes: all, evidence")
    rb.add_argument("--stop-token-ids", default="", help="extra token ids that end an answer (comma-separated)")
    rb.add_argument("--out", help="write the tables as JSON here")
    rb.add_argument("--responses", help="append every response (answer, scores, metrics) here as JSON lines")
    rb.add_argument("--check", help="NAME=EVAL_JSON: compare with the stored tables of model NAME in a card's eval.json")
    rb.add_argument("--tolerance", type=float, default=0.02)
    rb.set_defaults(func=_eval_rulebooks)
