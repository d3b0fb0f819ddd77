"""Compliance review: gather the last day's low-fidelity answers into one self-contained HTML bundle.

    LOCALIST_BASE_URL=http://127.0.0.1:8000 LOCALIST_API_KEY=... \\
        python examples/compliance_review.py --since 24h --below 0.5 --out review.html

Lists the audit records created since then whose response-level pointer fidelity is below the
threshold (answers that did not attend to the evidence they were supposed to use), fetches each
record's HTML report concurrently with the async client, checks the audit chain, and writes one HTML
page: a summary table, then every report (each in a sandboxed iframe, so their styles stay apart).
"""
import argparse
import asyncio
import html
import time
from datetime import datetime, timezone

from localist.clients import AsyncClient
from localist.clients.commands import when


async def review(since: str, below: float, out: str, concurrency: int) -> int:
    async with AsyncClient() as client:  # $LOCALIST_BASE_URL and $LOCALIST_API_KEY
        flagged = [r async for r in client.audit.list(since=since, fidelity_max=below, status="completed")]
        gate = asyncio.Semaphore(concurrency)

        async def report(record_id: str) -> str:
            async with gate:
                return await client.audit.report(record_id, format="html")

        reports = await asyncio.gather(*(report(r.id) for r in flagged))
        chain = await client.audit.verify()

    rows = "".join(
        f"<tr><td>{html.escape(r.created_at[:19])}</td><td><a href='#{html.escape(r.id)}'>{html.escape(r.id)}</a></td>"
        f"<td>{html.escape(r.model or '')}</td><td>{r.fidelity:.3f}</td><td>{html.escape(', '.join(r.blocks))}</td></tr>"
        for r in flagged)
    sections = "".join(
        f"<section id='{html.escape(r.id)}'><h2>{html.escape(r.id)}</h2>"
        f"<iframe sandbox srcdoc=\"{html.escape(page, quote=True)}\"></iframe></section>"
        for r, page in zip(flagged, reports))
    status = "valid" if chain.ok else f"BROKEN at seq {chain.first_broken.seq}: {chain.first_broken.reason}"
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Compliance review: fidelity below {below}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25rem .5rem}}iframe{{width:100%;height:80vh;border:1px solid #999}}</style>
</head><body>
<h1>Low-fidelity answers</h1>
<p>Generated {generated}; records since {html.escape(since)} with pointer fidelity below {below}:
<strong>{len(flagged)}</strong>. Audit chain: <strong>{html.escape(status)}</strong>
({chain.checked} records checked).</p>
<table><tr><th>created (UTC)</th><th>record</th><th>model</th><th>fidelity</th><th>blocks</th></tr>{rows}</table>
{sections}
</body></html>
"""
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(page)
    print(f"{len(flagged)} low-fidelity record(s) -> {out}")
    for r in flagged:
        print(f"flagged: {r.id} fidelity={r.fidelity:.4f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", default="24h", help="ISO 8601, unix seconds, or 30m/24h/7d ago (default 24h)")
    parser.add_argument("--below", type=float, default=0.5, help="flag answers with fidelity below this")
    parser.add_argument("--out", default=f"compliance-review-{time.strftime('%Y%m%d')}.html")
    parser.add_argument("--concurrency", type=int, default=4, help="reports fetched at once")
    args = parser.parse_args()
    return asyncio.run(review(when(args.since), args.below, args.out, args.concurrency))


if __name__ == "__main__":
    raise SystemExit(main())
