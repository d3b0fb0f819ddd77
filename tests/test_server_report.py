"""The compliance report: JSON form, self-contained HTML, and a headless-Chromium screenshot of its heatmap.

Set LOCALIST_REPORT_SCREENSHOT=docs/report-screenshot.png to refresh the committed sample.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

MSG = [{"role": "user", "content": "Case C7: the applicant earns 3200 EUR a month and asks for 60000 EUR. "
        "Which rule decides, and what is the decision?"}]
BLOCKS = [
    {"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR requires a second approval."},
    {"label": "R2", "kind": "rule", "text": "Rule R2: Claims filed more than 30 days late are not eligible."},
    {"label": "R3", "kind": "rule", "text": "Rule R3: An account needs a valid identity document."},
    {"label": "D1", "kind": "document", "text": "Document D1: monthly income 3200 EUR, requested loan 60000 EUR."},
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is missing: `apt-get install -y chromium` (Debian) — `make test` installs it")


@pytest.fixture(scope="module")
async def report_record(localist_server):
    import httpx

    async with httpx.AsyncClient(base_url=localist_server.base_url, headers=localist_server.headers(),
                                 timeout=120) as api:
        r = await api.post("/v1/chat/completions", json={
            "model": localist_server.model, "messages": MSG, "max_tokens": 24, "temperature": 0.8, "seed": 2,
            "ignore_eos": True, "locality": "localist", "blocks": BLOCKS, "target_block": "R1", "audit": "per_token"})
        assert r.status_code == 200, r.text
        return r.json()


async def test_json_report(localist_server, api, report_record):
    r = await api.get(f"/v1/audit/{report_record['id']}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    rep = r.json()
    assert rep["record"]["id"] == report_record["id"] and rep["record"]["metrics"]["localist"] == report_record["localist"]
    assert rep["verification"]["ok"] is True and rep["verification"]["seq"] == rep["record"]["seq"]
    assert rep["verification"]["links_checked"] >= 1


async def test_html_report_is_self_contained_with_heatmap(localist_server, api, report_record):
    r = await api.get(f"/v1/audit/{report_record['id']}/report", headers={"accept": "text/html"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"""(src|href)\s*=|url\(|@import""", page), "the report must not load anything"
    m = report_record["localist"]["choices"][0]
    blocks, tokens = report_record["localist"]["blocks"], m["tokens"]
    heatmap = page[page.index('aria-label="attribution heatmap"'):]
    heatmap = heatmap[:heatmap.index("</svg>")]
    assert heatmap.count("<rect") == len(blocks) * len(tokens) == len(blocks) * 24
    for b in BLOCKS:
        assert f">{b['label']}" in page
    assert "record verified" in page and "◀ target" in page
    assert f"{m['pointer_fidelity']:.3f}" in page


def test_screenshot_shows_the_heatmap(localist_server, report_record, tmp_path):
    import httpx
    from PIL import Image

    page = httpx.get(f"{localist_server.base_url}/v1/audit/{report_record['id']}/report",
                     params={"format": "html"}, headers=localist_server.headers(), timeout=60).text
    html_path = tmp_path / "report.html"
    html_path.write_text(page, encoding="utf-8")
    png = tmp_path / "report.png"
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1280,1500", f"--screenshot={png}", html_path.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and png.exists(), out.stderr[-2000:]
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 1500)
    # a cell of attribution v is rgb(255 − 232v, 255 − 192v, 255 − 110v): above v = 0.55 it is clearly blue
    # (b − r > 60, b − g > 30); each such cell covers (22 − 1) × (20 − 1) pixels
    blue = sum(1 for r, g, b in img.getdata() if b > 120 and b - r > 60 and b - g > 30)
    strong = sum(1 for t in report_record["localist"]["choices"][0]["tokens"] for v in t["attribution"] if v > 0.55)
    assert strong > 0
    assert blue >= 0.9 * strong * 21 * 19, f"only {blue} blue pixels for {strong} strong cells: no heatmap"
    target = os.environ.get("LOCALIST_REPORT_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
