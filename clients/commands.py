"""`localist chat` and `localist audit list|show|export|verify|replay|redact`: the client side of the CLI.

Terminal output is for people (a table of blocks with attribution bars, entropy and fidelity next to
the theory's bounds); ``--json`` prints the server's objects unchanged for machines. Only the client
package is imported, so these commands work on a client-only install.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO, TypeVar, get_args

from .client import Client
from .errors import LocalistError
from .contract import AuditRecord, AuditSummary, ChoiceMetrics, DialScope, LocalistResult, ReplayResult, VerifyResult

BAR_WIDTH = 24
T = TypeVar("T")
_EIGHTHS = " ▏▎▍▌▋▊▉█"


# --------------------------------------------------------------------------- rendering


def bar(value: float | None, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of ``value`` ∈ [0, 1] in eighths of a character."""
    if value is None or math.isnan(value):
        return " " * width
    eighths = round(min(max(value, 0.0), 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[rest] if rest else "")).ljust(width)


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def render_metrics(result: LocalistResult, choice: int = 0) -> str:
    """The block table of one choice, then entropy, fidelity and the theory against its bounds. Each
    bound stands beside the scored-heads value it bounds; the all-heads pointer fidelity has a line of its
    own (docs/theory.md §3)."""
    rho = result.locality.rho
    dial = f"ρ = {rho[0]:g}" if len(set(rho)) == 1 else "ρ per layer = " + ", ".join(f"{r:g}" for r in rho)
    if result.locality.preset:
        dial += f" ({result.locality.preset})"
    if result.locality.scope:
        dial += f", scope {result.locality.scope}"
    lines = [f"audit {result.audit_id}   {dial}   level {result.audit}"]
    metrics: ChoiceMetrics | None = next((m for m in result.choices if m.index == choice), None)
    label_width = max([5] + [len(b.label) for b in result.blocks])
    lines.append(f"  {'id':>3}  {'block':<{label_width}}  {'kind':<9} {'tokens':>9}  "
                 f"{'attribution':<{BAR_WIDTH}}  {'mass':>6}")
    for block in result.blocks:
        shares = metrics.attribution if metrics else None
        mass = shares[block.id] if shares and block.id < len(shares) else None
        flags = ("*" if block.candidate else "") + ("+" if block.pinned else "")
        kind = (block.kind + flags)[:9]
        target = "  ◀ target" if metrics and metrics.target_block == block.id else ""
        lines.append(f"  {block.id:>3}  {block.label:<{label_width}}  {kind:<9} "
                     f"{f'{block.start}–{block.end}':>9}  {bar(mass)}  {_num(mass):>6}{target}")
    lines.append("  (* candidate block for pointer fidelity, + pinned)")
    if metrics is None:
        lines.append("  no metrics for this choice")
        return "\n".join(lines)
    theory = metrics.theory
    source = {"request": "given", "top_candidate": "top candidate"}.get(metrics.target_source or "", "none")
    lines += [
        f"tokens generated   {metrics.num_tokens}   sink mass {_num(metrics.sink_mass)}"
        f"   candidate mass {_num(metrics.candidate_mass)}   target: {source}",
        f"attention entropy  H(a) {_num(metrics.entropy.total_nats)} nats ({_num(metrics.entropy.total_bits)} bits)"
        f"   block H(π) {_num(metrics.entropy.block_nats)} nats ({_num(metrics.entropy.block_bits)} bits)",
        f"pointer fidelity   all heads {_num(metrics.pointer_fidelity)}  {bar(metrics.pointer_fidelity, 12)}"
        "  (no bound applies)",
        f"                   scored heads {_num(theory.fidelity_measured)}  bound ≥ {_num(theory.fidelity_bound)}"
        f"   predicted {_num(theory.fidelity_predicted)}   bound held {_pct(theory.bound_held_fidelity)}",
        f"candidate entropy  scored heads {_num(theory.entropy_measured_nats)} nats"
        f"   bound ≤ {_num(theory.entropy_bound_nats)}   bound held {_pct(theory.bound_held_entropy)}",
        f"threshold (ε={theory.epsilon:g})  λ* median {_num(theory.lambda_star_median)}"
        f" (ρ* {_num(theory.rho_star_median)}), p90 {_num(theory.lambda_star_p90)}"
        f" (ρ* {_num(theory.rho_star_p90)})   wrong-block share {_pct(theory.wrong_block_share)}"
        + ("   ⚠ target is not the top candidate" if theory.target_not_top else ""),
    ]
    lines += [f"rule               {r.block} (rule {r.label} version {r.version}"
              + (f", from {r.rulebook}" if r.rulebook else "") + f", sha256 {r.sha256[:16]}…)" for r in result.rules or ()]
    lines += [f"⚠ {w}" for w in result.warnings or ()]
    return "\n".join(lines)


def render_tokens(result: LocalistResult, choice: int = 0) -> str:
    """Per generated token: its text, the block it attended most and the fidelity (per_token audit)."""
    metrics = next((m for m in result.choices if m.index == choice), None)
    if metrics is None or not metrics.tokens:
        return "no per-token metrics (ask with --audit per_token)"
    labels = [b.label for b in result.blocks]
    lines = [f"  {'#':>3}  {'token':<14} {'top block':<12} {'mass':<{BAR_WIDTH}}        {'H nats':>7}  fidelity"]
    for tok in metrics.tokens:
        top = max(range(len(tok.attribution)), key=tok.attribution.__getitem__)
        lines.append(f"  {tok.index:>3}  {json.dumps(tok.text)[:14]:<14} {labels[top][:12]:<12} "
                     f"{bar(tok.attribution[top])} {tok.attribution[top]:.3f}  {tok.entropy_nats:>7.3f}  "
                     f"{_num(tok.pointer_fidelity)}")
    return "\n".join(lines)


def render_summaries(rows: Iterable[AuditSummary]) -> str:
    lines = [f"{'created (UTC)':<19}  {'id':<42} {'status':<9} {'model':<16} {'ρ':>11}  {'fidelity':>8}  blocks"]
    for r in rows:
        rho = "—" if r.rho_min is None else (f"{r.rho_min:g}" if r.rho_min == r.rho_max
                                            else f"{r.rho_min:g}–{r.rho_max:g}")
        lines.append(f"{r.created_at[:19]:<19}  {r.id:<42} {r.status or r.kind:<9} {(r.model or '—')[:16]:<16} "
                     f"{rho:>11}  {_num(r.fidelity):>8}  {','.join(r.blocks)[:40]}")
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on a terminal stream (tqdm is not a client dependency)."""

    def __init__(self, total: int, stream: TextIO, label: str):
        self.total, self.stream, self.label, self.done = total, stream, label, 0
        self.start = time.monotonic()
        self._draw()

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        share = self.done / self.total if self.total else 1.0
        rate = self.done / max(time.monotonic() - self.start, 1e-9)
        self.stream.write(f"\r{self.label} |{bar(share, 30)}| {self.done}/{self.total} ({rate:.1f}/s)")
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


# --------------------------------------------------------------------------- argument parsing


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when(text: str) -> str:
    """A time filter: ISO 8601 or unix seconds as the server takes them, or ``24h``/``7d``/``30m``
    ago (converted here to unix seconds)."""
    match = _RELATIVE.match(text.strip())
    if match:
        return f"{time.time() - float(match.group(1)) * _UNIT_S[match.group(2)]:.3f}"
    return text


def locality(text: str) -> float | list[float] | str:
    """``0.5``, a per-layer list ``0.2,0.9``, or a preset name (the server checks the range)."""
    try:
        if "," in text:
            return [float(v) for v in text.split(",")]
        return float(text)
    except ValueError:
        if "," in text:
            raise argparse.ArgumentTypeError(f"per-layer locality must be numbers: {text!r}") from None
        return text


def labelled(kind: str):
    def parse(text: str) -> dict[str, Any]:
        label, sep, body = text.partition("=")
        if not sep or not label:
            raise argparse.ArgumentTypeError(f"expected LABEL=TEXT (or LABEL=@file), got {text!r}")
        if body.startswith("@"):
            body = Path(body[1:]).read_text()
        return {"label": label, "kind": kind, "text": body}
    return parse


def _connection_args() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LOCALIST_BASE_URL"),
                        help="server address (default: $LOCALIST_BASE_URL, else http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=os.environ.get("LOCALIST_API_KEY"),
                        help="API key (default: $LOCALIST_API_KEY; none in local dev mode)")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    common.add_argument("--json", action="store_true", help="print the server's JSON instead of tables")
    return common


def _client(args) -> Client:
    return Client(args.url, args.api_key, timeout=args.timeout)


def _filter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=when, help="from this time: ISO 8601, unix seconds, or 30m/24h/7d ago")
    parser.add_argument("--until", type=when, help="before this time (same forms)")
    parser.add_argument("--model")
    parser.add_argument("--status", choices=["completed", "aborted", "failed"])
    parser.add_argument("--rho-min", type=float)
    parser.add_argument("--rho-max", type=float)
    parser.add_argument("--fidelity-min", type=float)
    parser.add_argument("--fidelity-max", type=float)
    parser.add_argument("--block", help="only requests with a block of this label")


def _filters(args) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("since", "until", "model", "status", "rho_min", "rho_max",
                                          "fidelity_min", "fidelity_max", "block")}


def _dump(obj: Any, out: TextIO) -> None:
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- commands


def cmd_chat(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": prompt}]
    blocks = [*(args.rule or []), *(args.document or [])]
    if args.blocks:
        blocks += json.loads(Path(args.blocks).read_text())
    target: str | int | None = args.target
    if target is not None and target.isdigit():
        target = int(target)
    request = dict(model=args.model, locality=args.locality, blocks=blocks or None, target_block=target,
                   audit=args.audit, dial_scope=args.dial_scope, rules=args.use_rule,
                   anchors="check" if args.check_anchors else None, max_tokens=args.max_tokens,
                   temperature=args.temperature, seed=args.seed)
    with _client(args) as client:
        if args.stream:
            stream = client.chat_stream(messages, **request)
            with stream:
                for delta in stream:
                    if not args.json:
                        sys.stdout.write(delta.text)
                        sys.stdout.flush()
            result, text = stream.localist, stream.text()
            if args.json:
                _dump({"id": stream.id, "text": text, "usage": stream.usage and stream.usage.model_dump(),
                       "localist": result and result.model_dump(mode="json")}, sys.stdout)
                return 0
            sys.stdout.write("\n")
        else:
            response = client.chat(messages, **request)
            if args.json:
                _dump(response, sys.stdout)
                return 0
            result, text = response.localist, response.text
            print(text)
    print()
    if result is None:
        print("(the stream ended without the localist summary)")
        return 1
    print(render_metrics(result))
    if args.tokens:
        print(render_tokens(result))
    return 0


def cmd_audit_list(args) -> int:
    with _client(args) as client:
        rows = list(client.audit.list(**_filters(args), page_size=min(args.limit, 1000), max_items=args.limit))
    if args.json:
        _dump([r.model_dump(mode="json") for r in rows], sys.stdout)
    else:
        print(render_summaries(rows))
        print(f"{len(rows)} record(s)")
    return 0


def render_record(record: AuditRecord) -> str:
    lines = [
        f"record {record.id}   seq {record.seq}   {record.kind}   {record.status or ''}",
        f"created {record.created_at}   tenant {record.tenant}   model {record.model or '—'}",
        f"chain   content {record.hashes.content[:16]}…  prev {record.hashes.prev[:16]}…"
        + ("   payload REDACTED" if record.redacted else ""),
    ]
    provenance = record.request.provenance if record.request else None
    if provenance is not None:
        lines.append(f"served  checkpoint {provenance.checkpoint_sha256[:16]}… ({provenance.checkpoint_format})   "
                     f"{provenance.dtype}   attention ISA {provenance.attention_isa}   "
                     f"TP {provenance.tensor_parallel_size}   vLLM {provenance.vllm_version}   "
                     f"localist {provenance.localist_version}")
    if record.error:
        lines.append(f"error   {record.error}")
    for choice in record.output.choices if record.output else ():
        lines.append(f"output[{choice.index}] {json.dumps(choice.text, ensure_ascii=False)}"
                     f"   finish: {choice.finish_reason}")
    result = record.localist()
    if result is not None:
        lines += ["", render_metrics(result)]
    return "\n".join(lines)


def _answer(args, ask: Callable[[Client], T], render: Callable[[T], str]) -> T:
    """Ask the server once; print its answer as JSON (``--json``) or rendered for people."""
    with _client(args) as client:
        answer = ask(client)
    if args.json:
        _dump(answer, sys.stdout)
    else:
        print(render(answer))
    return answer


def cmd_audit_show(args) -> int:
    _answer(args, lambda client: client.audit.get(args.id), render_record)
    return 0


def cmd_audit_export(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    formats = ["html", "json"] if args.format == "both" else [args.format]
    written: list[str] = []
    with _client(args) as client:
        rows = list(client.audit.list(**_filters(args), max_items=args.limit))
        progress = None if args.json else Progress(len(rows), sys.stderr, "exporting")
        for row in rows:
            for fmt in formats:
                path = out / f"{row.id}.{fmt}"
                client.audit.report(row.id, format=fmt, path=path)
                written.append(str(path))
            if progress:
                progress.advance()
        if progress:
            progress.finish()
    if args.json:
        _dump({"records": len(rows), "files": written}, sys.stdout)
    else:
        print(f"wrote {len(written)} report file(s) for {len(rows)} record(s) to {out}")
    return 0


def render_verification(result: VerifyResult) -> str:
    if result.ok:
        signed = result.signed_seq if result.signed_seq is not None else "—"
        return (f"chain OK: {result.checked} record(s) checked, head seq {result.head_seq} "
                f"({result.head_hash[:16]}…), signed up to seq {signed} "
                f"({result.signatures_valid} valid signature(s), {result.signatures_untrusted} untrusted), "
                f"{result.redacted} redacted")
    broken = result.first_broken
    where = f"seq {broken.seq}" + (f" (record {broken.record_id})" if broken.record_id else "") if broken else "?"
    return f"chain BROKEN at {where}: {broken.reason if broken else 'unknown'} — {result.checked} record(s) checked"


def cmd_audit_verify(args) -> int:
    return 0 if _answer(args, lambda client: client.audit.verify(), render_verification).ok else 1


def render_provenance_differences(result: ReplayResult) -> list[str]:
    """What differs between the server that wrote the record and the one that replayed it: said before
    the outputs are compared, since any of it may explain a difference."""
    if result.provenance_differences is None:
        return ["provenance: the record has none (written before records carried it)"]
    if not result.provenance_differences:
        return ["provenance: the same as the record's"]
    return ["provenance DIFFERS from the record's:"] + [
        f"  {d.field}: {d.recorded} recorded, {d.served} served" for d in result.provenance_differences]


def render_replay(result: ReplayResult) -> str:
    lines = render_provenance_differences(result)
    lines += [f"replay {result.replay_id} of {result.record_id}: "
              + ("every choice reproduced its tokens" if result.matches else "the output DIFFERS")]
    lines += [f"  choice {c.index}: {len(c.original_token_ids)} original token(s), {len(c.replay_token_ids)} replayed, "
              f"{'match' if c.matches else 'MISMATCH'}" for c in result.choices]
    return "\n".join(lines)


def cmd_audit_replay(args) -> int:
    return 0 if _answer(args, lambda client: client.audit.replay(args.id), render_replay).matches else 1


def cmd_audit_redact(args) -> int:
    _answer(args, lambda client: client.audit.redact(args.id, args.reason),
            lambda s: f"record {s.id}: payload erased (redacted={s.redacted}); the chain keeps its hashes")
    return 0


def _guarded(fn):
    """Server and connection errors become one line on stderr and exit status 1, not a traceback."""
    def run(args) -> int:
        try:
            return fn(args)
        except LocalistError as exc:
            print(f"localist: error: {exc}", file=sys.stderr)
            return 1
    return run


def add_commands(sub) -> None:
    common = _connection_args()

    chat = sub.add_parser("chat", parents=[common], help="ask the server and show block attribution",
                          description="Send one chat message; print the answer, the block table with "
                          "attribution bars, entropy and pointer fidelity against the theory's bounds.")
    chat.add_argument("prompt", nargs="?", help="the user message (default: read stdin)")
    chat.add_argument("--system", help="a system message before it")
    chat.add_argument("--model", help="model name (default: the server's first)")
    chat.add_argument("--locality", "--rho", type=locality,
                      help="the dial: 0..1, a per-layer list 0.2,0.9, or distributed|balanced|localist")
    chat.add_argument("--rule", type=labelled("rule"), action="append", metavar="LABEL=TEXT",
                      help="a rule block (repeatable; TEXT may be @file)")
    chat.add_argument("--document", type=labelled("document"), action="append", metavar="LABEL=TEXT",
                      help="a document block (repeatable; TEXT may be @file)")
    chat.add_argument("--blocks", metavar="FILE", help="JSON list of block objects (label, kind, text, ...)")
    chat.add_argument("--target", help="ground-truth block (label or id) for pointer fidelity")
    chat.add_argument("--use-rule", action="append", metavar="REF",
                      help="inject a stored rule or rulebook: LABEL or LABEL@VERSION (repeatable; `localist rules`)")
    chat.add_argument("--check-anchors", action="store_true",
                      help="probe the anchors of the placed rule/document blocks under the served model")
    chat.add_argument("--audit", choices=["summary", "per_token", "per_layer"], help="detail returned and stored")
    chat.add_argument("--dial-scope", choices=get_args(DialScope),
                      help="blocks the dial moves mass between: all unpinned, or the evidence blocks only "
                      "(default: the model's)")
    chat.add_argument("--tokens", action="store_true", help="also print per-token attribution (needs per_token)")
    chat.add_argument("--max-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    chat.set_defaults(func=_guarded(cmd_chat))

    audit = sub.add_parser("audit", help="pull audit records and compliance reports")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    listing = audit_sub.add_parser("list", parents=[common], help="list records (newest first)")
    _filter_args(listing)
    listing.add_argument("--limit", type=int, default=50, help="at most this many records")
    listing.set_defaults(func=_guarded(cmd_audit_list))

    show = audit_sub.add_parser("show", parents=[common], help="one record with its block table")
    show.add_argument("id")
    show.set_defaults(func=_guarded(cmd_audit_show))

    export = audit_sub.add_parser("export", parents=[common], help="write reports for a time range to a folder")
    _filter_args(export)
    export.add_argument("--format", choices=["html", "json", "both"], default="html")
    export.add_argument("--out", required=True, help="folder for the report files (created)")
    export.add_argument("--limit", type=int, default=None, help="at most this many records")
    export.set_defaults(func=_guarded(cmd_audit_export))

    verify = audit_sub.add_parser("verify", parents=[common], help="check the hash chain and its signatures")
    verify.set_defaults(func=_guarded(cmd_audit_verify))

    replay = audit_sub.add_parser("replay", parents=[common], help="re-run a stored request; exit 1 if it differs")
    replay.add_argument("id")
    replay.set_defaults(func=_guarded(cmd_audit_replay))

    redact = audit_sub.add_parser("redact", parents=[common], help="erase a record's payload (chain stays valid)")
    redact.add_argument("id")
    redact.add_argument("--reason", required=True, help="why (kept in the chain)")
    redact.set_defaults(func=_guarded(cmd_audit_redact))
