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

from localist.server import schemas as S

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


def heatmap_svg(blocks: list[dict], tokens: list[dict]) -> str:
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
                     f'class="tok">{_e(repr(tok.get("text", ""))[1:-1][:12])}</text>')
    for i, block in enumerate(blocks):
        y = HEAD_H + i * CELL_H
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + CELL_H * 0.7:.1f}" text-anchor="end" class="lbl">'
                     f'{_e(block["id"])} · {_e(block["label"])[:16]}</text>')
        for j, tok in enumerate(tokens):
            attribution = tok.get("attribution") or []
            v = attribution[i] if i < len(attribution) else 0.0
            parts.append(f'<rect x="{LABEL_W + j * CELL_W}" y="{y}" width="{CELL_W - 1}" height="{CELL_H - 1}" '
                         f'fill="{_color(v)}"><title>{_e(block["label"])} ← token {j} '
                         f'{_e(tok.get("text"))!s}: {v:.3f}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def _bar(value: float | None, bound: float | None, invert: bool = False) -> str:
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


def _block_rows(blocks: list[dict], attribution: list[float], target: int | None) -> str:
    rows = []
    for b in blocks:
        a = attribution[b["id"]] if b["id"] < len(attribution) else None
        mark = " ◀ target" if b["id"] == target else ""
        rows.append(
            f'<tr{" class=target" if b["id"] == target else ""}><td>{_e(b["id"])}</td><td>{_e(b["label"])}{mark}</td>'
            f'<td>{_e(b["kind"])}</td><td>{_e(b["start"])}–{_e(b["end"])}</td>'
            f'<td>{"yes" if b.get("pinned") else ""}</td><td>{"yes" if b.get("candidate") else ""}</td>'
            f'<td>{_num(a)}</td><td><svg width="120" height="12"><rect width="{120 * (a or 0):.1f}" height="12" '
            f'fill="{_color(a or 0)}" stroke="#173f91" stroke-width="0.5"/></svg></td></tr>')
    return "\n".join(rows)


def render_html(report: S.AuditReport) -> str:
    rec, ver = report.record, report.verification
    localist = (rec.metrics or {}).get("localist") or {}
    blocks = localist.get("blocks") or (rec.request or {}).get("blocks") or []
    choices = localist.get("choices") or []
    first = choices[0] if choices else {}
    theory = first.get("theory") or {}
    entropy = first.get("entropy") or {}
    output = rec.output or {}
    out_choice = (output.get("choices") or [{}])[0]
    request = rec.request or {}
    rho = (localist.get("locality") or {}).get("rho") or request.get("rho")
    created = datetime.fromtimestamp(rec.created_us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if ver.ok:
        verdict = (f'<span class="ok">✔ record verified</span> — its hashes, and {ver.links_checked} link(s) of the '
                   f'chain from it')
        covered = (f"Covered by the signed checkpoint at seq {ver.checkpoint_seq}" if ver.checkpoint_seq is not None
                   else "Not yet covered by a signed checkpoint (the head is signed periodically)")
    else:
        verdict = f'<span class="bad">✘ verification failed</span> at record {_e(ver.seq)}: {_e(ver.reason)}'
        covered = "Do not rely on this record"
    target_source = first.get("target_source")
    fidelity_row = (f'<tr><th>Pointer fidelity F</th><td>{_num(first.get("pointer_fidelity"))}</td>'
                    f'<td>≥ {_num(theory.get("fidelity_bound"))} (bound)</td>'
                    f'<td>{_bar(first.get("pointer_fidelity"), theory.get("fidelity_bound"))}</td>'
                    f'<td>{_num(theory.get("bound_held_fidelity"), 2)}</td></tr>')
    entropy_row = (f'<tr><th>Candidate entropy (nats)</th><td>{_num(theory.get("entropy_measured_nats"))}</td>'
                   f'<td>≤ {_num(theory.get("entropy_bound_nats"))} (bound)</td>'
                   f'<td>{_bar(theory.get("entropy_measured_nats"), theory.get("entropy_bound_nats"))}</td>'
                   f'<td>{_num(theory.get("bound_held_entropy"), 2)}</td></tr>')
    return TEMPLATE.substitute(
        title=_e(f"Audit report {rec.id}"),
        record_id=_e(rec.id), seq=_e(rec.seq), created=_e(created), tenant=_e(rec.tenant),
        status=_e(rec.status), model=_e(rec.model), weights=_e((request.get("weights_hash") or "")[:16]),
        rho=_e(", ".join(f"{r:g}" for r in rho) if isinstance(rho, list) else rho),
        preset=_e((localist.get("locality") or {}).get("preset") or "—"),
        audit_level=_e(localist.get("audit") or request.get("audit") or "—"),
        verdict=verdict,
        covered=covered,
        hashes="<br>".join(f"{k}: <code>{_e(v)}</code>" for k, v in rec.hashes.model_dump().items()),
        redacted='<p class="bad">The payload of this record was erased (redaction); hashes remain.</p>'
        if rec.redacted else "",
        output=_e(out_choice.get("text")), finish=_e(out_choice.get("finish_reason")),
        error=f'<p class="bad">Error: {_e(rec.error)}</p>' if rec.error else "",
        block_rows=_block_rows(blocks, first.get("attribution") or [], first.get("target_block")),
        target=_e(first.get("target_block")), target_source=_e(target_source or "—"),
        sink=_num(first.get("sink_mass")),
        h_total=_num(entropy.get("total_nats")), h_total_bits=_num(entropy.get("total_bits")),
        h_block=_num(entropy.get("block_nats")), h_block_bits=_num(entropy.get("block_bits")),
        fidelity_row=fidelity_row, entropy_row=entropy_row,
        lambda_med=_num(theory.get("lambda_star_median")), lambda_p90=_num(theory.get("lambda_star_p90")),
        rho_star=_num(theory.get("rho_star_median")), wrong=_num(theory.get("wrong_block_share")),
        not_top=_e(theory.get("target_not_top")), epsilon=_e(theory.get("epsilon")),
        heatmap=heatmap_svg(blocks, first.get("tokens") or []),
        no_metrics="" if choices else '<p class="bad">No metrics were recorded for this request.</p>',
    )
