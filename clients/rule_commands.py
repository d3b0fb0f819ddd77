"""`localist rules …`: the tenant's rules and rulebooks (create or next version, list, show, retire)."""
from __future__ import annotations

import sys
from pathlib import Path

from .commands import _answer, _connection_args, _guarded
from .contract import Rule, RuleList, RuleVersion


def _version_lines(v: RuleVersion) -> list[str]:
    lines = [f"  {v.ref}  sha256 {v.sha256[:16]}…  by {v.created_by or 'dev mode'}"]
    if v.text is not None:
        lines += [f"    {line}" for line in f"{v.anchor}\n{v.text}".splitlines()]
    for m in v.members or ():
        lines.append(f"    {m.label}@{m.version}  sha256 {m.sha256[:16]}…")
    if v.anchors is not None:
        a = v.anchors
        lines.append(f"    anchors probed under {a.model} at ρ = {a.rho:g} among B = {a.num_blocks} blocks "
                     f"(ln B = {a.anchors[0].needed_nats:.3f} nats needed):" if a.anchors else "    no anchors")
        for p in a.anchors:
            margin = "—" if p.margin_nats is None else f"{p.margin_nats:.3f}"
            lines.append(f"      {p.anchor:<20} {p.information_nats:7.3f} nats  top {p.top_block:<16} margin {margin:>7}  "
                         + ("separable" if p.separable else "NOT SEPARABLE"))
    return lines


def render_rule(rule: Rule) -> str:
    state = "active" if rule.active else f"retired by {rule.retired_by or 'dev mode'}"
    lines = [f"{rule.kind} {rule.label} (id {rule.id}, {state}), latest version {rule.latest}"]
    for v in rule.versions:
        lines += _version_lines(v)
    return "\n".join(lines)


def render_rules(rules: RuleList) -> str:
    if not rules.data:
        return "(no rules)"
    return "\n".join(f"{r.label:<24} {r.kind:<9} v{r.latest:<4} {'active' if r.active else 'retired'}"
                     for r in rules.data)


def _text(value: str) -> str:
    """TEXT, or the contents of FILE for @FILE, or stdin for -."""
    if value == "-":
        return sys.stdin.read()
    return Path(value[1:]).read_text() if value.startswith("@") else value


def cmd_create(args) -> int:
    _answer(args, lambda client: client.rules.create(args.label, _text(args.text), anchor=args.anchor), render_rule)
    return 0


def cmd_book(args) -> int:
    _answer(args, lambda client: client.rules.create(args.label, rules=args.refs), render_rule)
    return 0


def cmd_list(args) -> int:
    _answer(args, lambda client: client.rules.list(include_retired=args.all), render_rules)
    return 0


def cmd_show(args) -> int:
    _answer(args, lambda client: client.rules.get(args.label), render_rule)
    return 0


def cmd_retire(args) -> int:
    _answer(args, lambda client: client.rules.retire(args.label), render_rule)
    return 0


def add_commands(sub) -> None:
    common = _connection_args()
    rules = sub.add_parser("rules", help="versioned rules and rulebooks to inject into requests by reference")
    rules_sub = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=True)

    create = rules_sub.add_parser("create", parents=[common], help="a rule, or its next version")
    create.add_argument("label")
    create.add_argument("text", help="the rule's text, @FILE, or - for stdin")
    create.add_argument("--anchor", help="its anchor header (default [LABEL])")
    create.set_defaults(func=_guarded(cmd_create))

    book = rules_sub.add_parser("book", parents=[common],
                                help="a rulebook, or its next version; its anchors are probed under the served model")
    book.add_argument("label")
    book.add_argument("refs", nargs="+", metavar="RULE", help="LABEL (latest version, pinned now) or LABEL@VERSION")
    book.set_defaults(func=_guarded(cmd_book))

    listing = rules_sub.add_parser("list", parents=[common], help="the tenant's rules and rulebooks")
    listing.add_argument("--all", action="store_true", help="retired ones too")
    listing.set_defaults(func=_guarded(cmd_list))

    show = rules_sub.add_parser("show", parents=[common], help="every version, with texts, members and anchor probes")
    show.add_argument("label")
    show.set_defaults(func=_guarded(cmd_show))

    retire = rules_sub.add_parser("retire", parents=[common], help="retire a rule or rulebook (versions stay readable)")
    retire.add_argument("label")
    retire.set_defaults(func=_guarded(cmd_retire))
