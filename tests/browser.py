"""Headless Chromium (Debian package) with a probe: which images loaded, console errors."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(
  'error: ' + (e.message || (e.target && (e.target.id || e.target.tagName)) || 'resource')), true);
for (const k of ['error', 'warn']) {
  const orig = console[k];
  console[k] = (...a) => { window.__errors.push(k + ': ' + a.join(' ')); orig.apply(console, a); };
}
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({id: i.id, alt: i.alt, complete: i.complete,
    width: i.naturalWidth}));
  const h2 = [...document.querySelectorAll('h2')];
  const head = h2.find(h => h.textContent.startsWith('Headline'));
  const rows = head && head.nextElementSibling ? head.nextElementSibling.querySelectorAll(
    'table tr').length : 0;
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs, h2: h2.map(h => h.textContent), headline_rows: rows,
    errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium is not installed: run `apt-get install -y chromium` (Debian)")
    return found


def render(page: Path, tmp: Path, screenshot: Path | None = None) -> dict:
    """Load ``page`` with the probe injected first in <head>; returns the probe's JSON plus the
    browser's console lines (``console``)."""
    probed = tmp / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=10000"]
    out = subprocess.run([*args, "--dump-dom", probed.as_uri()], capture_output=True,
                         text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
    assert found, f"the probe never ran: {out.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in out.stderr.splitlines() if "CONSOLE" in line]
    if screenshot is not None:
        subprocess.run([*args, "--hide-scrollbars", "--window-size=1200,6000",
                        f"--screenshot={screenshot}", probed.as_uri()], capture_output=True,
                       timeout=120)
    return result
