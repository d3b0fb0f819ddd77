"""The compliance report as one self-contained HTML page (inline CSS and SVG, no external assets).

A reviewer reads: who asked what with which dial, the block table, a heatmap of attribution (blocks ×
generated tokens), entropy and pointer fidelity next to the theory's bounds, and whether the audit
chain verifies. Everything shown comes from the stored record; nothing is recomputed here.
"""
from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any

from localist.clients import contract as C

TEMPLATE = Template((Path(__file__).with_name("templates") / "report.html").read_text())
CELL_W, CELL_H, LABEL_W, HEAD_H = 22, 20, 150, 70


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _color(v: float) -> str:
    """White → deep blue as attribution goes 0 → 1."""
    v = min(max(v, 0.0), 1.0)
    r, g, b = (int(255 - (255 - c) * v) for c in (23, 63, 145))
    return f"rgb({r},{g},{b})"


def heatmap_svg(blocks: list[C.BlockInfo], tokens: list[C.TokenMetrics]) -> str:
    """Rows: blocks; columns: generated tokens; cell colour: the token's attribution to the block."""
    if not tokens:
        return '<p class="muted">No per-token detail was recorded (the request used <code>audit=summary</code>).</p>'
    width = LABEL_W + CELL_W * len(tokens) + 10
    height = HEAD_H + CELL_H * len(blocks) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="attribution heatmap" class="heatmap">']
    for j, tok in enumerate(tokens):
        x = LABEL_W + j * CELL_W + CELL_W / 2
        parts.append(f'<text x="{x:.1f}" y="{HEAD_H - 6}" transform="rotate(-60 {x:.1f} {HEAD_H - 6})" '
                     f'class="tok">{_e(repr(tok.text)[1:-1][:12])}</text>')
    for i, block in enumerate(blocks):
        y = HEAD_H + i * CELL_H
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + CELL_H * 0.7:.1f}" text-anchor="end" class="lbl">'
                     f'{_e(block.id)} · {_e(block.label)[:16]}</text>')
        for j, tok in enumerate(tokens):
            v = tok.attribution[i] if i < len(tok.attribution) else 0.0
            parts.append(f'<rect x="{LABEL_W + j * CELL_W}" y="{y}" width="{CELL_W - 1}" height="{CELL_H - 1}" '
                         f'fill="{_color(v)}"><title>{_e(block.label)} ← token {j} '
                         f'{_e(tok.text)!s}: {v:.3f}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def _bar(value: float | None, bound: float | None) -> str:
    """Measured value as a bar, the theory's bound as a tick (for fidelity a floor, for entropy a ceiling)."""
    if value is None:
        return '<span class="muted">not defined</span>'
    scale = max(1.0, value, bound or 0.0)
    parts = [f'<svg width="220" height="16" class="bar"><rect x="0" y="3" width="{200 * value / scale:.1f}" '
             f'height="10" fill="#173f91"/>']
    if bound is not None:
        x = 200 * bound / scale
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="16" stroke="#c0392b" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _block_rows(blocks: list[C.BlockInfo], attribution: list[float], target: int | None) -> str:
    rows = []
    for b in blocks:
        a = attribution[b.id] if b.id < len(attribution) else None
        mark = " ◀ target" if b.id == target else ""
        rows.append(
            f'<tr{" class=target" if b.id == target else ""}><td>{_e(b.id)}</td><td>{_e(b.label)}{mark}</td>'
            f'<td>{_e(b.kind)}</td><td>{_e(b.start)}–{_e(b.end)}</td>'
            f'<td>{"yes" if b.pinned else ""}</td><td>{"yes" if b.candidate else ""}</td>'
            f'<td>{_num(a)}</td><td><svg width="120" height="12"><rect width="{120 * (a or 0):.1f}" height="12" '
            f'fill="{_color(a or 0)}" stroke="#173f91" stroke-width="0.5"/></svg></td></tr>')
    return "\n".join(rows)


def _bound_row(label: str, value: float | None, bound: float | None, relation: str, held: float | None) -> str:
    """A measured value beside the theory's bound on that same value (docs/theory.md §3–§4)."""
    return (f'<tr><th>{label}</th><td>{_num(value)}</td><td>{relation} {_num(bound)} (bound)</td>'
            f'<td>{_bar(value, bound)}</td><td>{_num(held, 2)}</td></tr>')


def _metrics(blocks: list[C.BlockInfo], m: C.ChoiceMetrics | None) -> dict[str, str]:
    """The report's metric fields for choice 0; dashes when no metrics were recorded."""
    if m is None:
        return {"block_rows": _block_rows(blocks, [], None), "target": "", "target_source": "—", "sink": _num(None),
                "h_total": _num(None), "h_total_bits": _num(None), "h_block": _num(None), "h_block_bits": _num(None),
                "fidelity_row": _bound_row("Pointer fidelity, scored heads F<sub>S</sub>", None, None, "≥", None),
                "entropy_row": _bound_row("Candidate entropy (nats)", None, None, "≤", None),
                "fidelity_all": _num(None), "lambda_med": _num(None), "lambda_p90": _num(None), "rho_star": _num(None),
                "wrong": _num(None), "not_top": "", "epsilon": "", "heatmap": heatmap_svg(blocks, [])}
    t = m.theory
    return {
        "block_rows": _block_rows(blocks, m.attribution or [], m.target_block),
        "target": _e(m.target_block), "target_source": _e(m.target_source or "—"), "sink": _num(m.sink_mass),
        "h_total": _num(m.entropy.total_nats), "h_total_bits": _num(m.entropy.total_bits),
        "h_block": _num(m.entropy.block_nats), "h_block_bits": _num(m.entropy.block_bits),
        "fidelity_row": _bound_row("Pointer fidelity, scored heads F<sub>S</sub>", t.fidelity_measured,
                                   t.fidelity_bound, "≥", t.bound_held_fidelity),
        "entropy_row": _bound_row("Candidate entropy (nats)", t.entropy_measured_nats, t.entropy_bound_nats, "≤",
                                  t.bound_held_entropy),
        "fidelity_all": _num(m.pointer_fidelity),
        "lambda_med": _num(t.lambda_star_median), "lambda_p90": _num(t.lambda_star_p90),
        "rho_star": _num(t.rho_star_median), "wrong": _num(t.wrong_block_share), "not_top": _e(t.target_not_top),
        "epsilon": _e(t.epsilon), "heatmap": heatmap_svg(blocks, m.tokens or []),
    }


def _provenance(p: C.Provenance | None) -> str:
    if p is None:
        return '<span class="muted">not recorded (the record predates provenance)</span>'
    files = ", ".join(f"{_e(f.name)} <code>{_e(f.sha256[:16])}…</code>" for f in p.checkpoint_files)
    return (f"checkpoint <code>{_e(p.checkpoint_sha256)}</code> ({_e(p.checkpoint_format)}: {files}); "
            f"{_e(p.dtype)}, attention ISA {_e(p.attention_isa)}, tensor parallel {_e(p.tensor_parallel_size)}; "
            f"vLLM {_e(p.vllm_version)}, localist {_e(p.localist_version)}")


def _rules(request: C.RecordRequest | None, localist: C.LocalistResult | None) -> str:
    """The injected rule versions with the texts the request was answered with, and the anchor warnings."""
    if request is None or not request.rules:
        return ""
    rows = "".join(
        f"<tr><td>{_e(r.block)}</td><td><code>{_e(r.rule_id)}</code></td><td>{_e(r.rulebook or '—')}</td>"
        f"<td><code>{_e(r.sha256[:16])}…</code></td><td><pre>{_e(r.anchor)}\n{_e(r.text)}</pre></td></tr>"
        for r in request.rules)
    warned = "".join(f'<p class="bad">{_e(w)}</p>' for w in (localist.warnings or [])) if localist else ""
    return ("<h2>Injected rules</h2>\n<table class=\"grid\"><tr><th>block</th><th>rule id</th><th>rulebook</th>"
            f"<th>sha256</th><th>text as injected</th></tr>{rows}</table>\n{warned}")


def render_html(report: C.AuditReport) -> str:
    rec, ver = report.record, report.verification
    localist, request, output = rec.localist(), rec.request, rec.output
    blocks = localist.blocks if localist else request.blocks if request else []
    first = localist.choices[0] if localist and localist.choices else None
    out_choice = output.choices[0] if output and output.choices else None
    rho = localist.locality.rho if localist else request.rho if request else None
    created = datetime.fromtimestamp(rec.created_us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if ver.ok:
        verdict = (f'<span class="ok">✔ record verified</span> — its hashes, and {ver.links_checked} link(s) of the '
                   f'chain from it')
        covered = (f"Covered by the signed checkpoint at seq {ver.checkpoint_seq}" if ver.checkpoint_seq is not None
                   else "Not yet covered by a signed checkpoint (the head is signed periodically)")
    else:
        verdict = f'<span class="bad">✘ verification failed</span> at record {_e(ver.seq)}: {_e(ver.reason)}'
        covered = "Do not rely on this record"
    return TEMPLATE.substitute(
        title=_e(f"Audit report {rec.id}"),
        record_id=_e(rec.id), seq=_e(rec.seq), created=_e(created), tenant=_e(rec.tenant),
        status=_e(rec.status), model=_e(rec.model), weights=_e(request.weights_hash[:16] if request else ""),
        rho=_e(", ".join(f"{r:g}" for r in rho) if rho is not None else None),
        preset=_e(localist.locality.preset if localist and localist.locality.preset else "—"),
        audit_level=_e(localist.audit if localist else request.audit if request else "—"),
        dial_scope=_e(request.dial_scope if request and request.dial_scope else "—"),
        provenance=_provenance(request.provenance) if request else "—",
        rules=_rules(request, localist),
        verdict=verdict,
        covered=covered,
        hashes="<br>".join(f"{k}: <code>{_e(v)}</code>" for k, v in rec.hashes.model_dump().items()),
        redacted='<p class="bad">The payload of this record was erased (redaction); hashes remain.</p>'
        if rec.redacted else "",
        output=_e(out_choice.text if out_choice else None), finish=_e(out_choice.finish_reason if out_choice else None),
        error=f'<p class="bad">Error: {_e(rec.error)}</p>' if rec.error else "",
        no_metrics="" if localist and localist.choices else '<p class="bad">No metrics were recorded for this request.</p>',
        **_metrics(blocks, first),
    )
