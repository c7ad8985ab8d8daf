"""Headless Chromium helpers: check that a report's images load, take a screenshot.

Used by the report test and ``scripts/screenshot_report.py``; no Python
dependency, just Debian's ``chromium`` binary.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-extensions"]

_PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {src: i.getAttribute("src").slice(0, 40), complete: i.complete, width: i.naturalWidth,
            height: i.naturalHeight};
  });
  document.body.setAttribute("data-tlslab-images", JSON.stringify(imgs));
  document.body.setAttribute("data-tlslab-height", String(document.documentElement.scrollHeight));
});
</script>"""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _probe(page: Path, chromium: str | None, width: int, timeout: float) -> tuple[list[dict], int]:
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError("no chromium binary")
    page = Path(page).resolve()
    text = page.read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, delete=False) as f:
        f.write(text.replace("</body>", _PROBE + "</body>"))
        probe = Path(f.name)
    try:
        cp = subprocess.run([chromium, *FLAGS, f"--window-size={width},1000", "--virtual-time-budget=15000",
                             "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=timeout)
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r'data-tlslab-images="([^"]*)"', cp.stdout)
    h = re.search(r'data-tlslab-height="(\d+)"', cp.stdout)
    if not m:
        raise RuntimeError(f"chromium did not run the probe (exit {cp.returncode}): {cp.stderr[-500:]}")
    return json.loads(html.unescape(m.group(1))), int(h.group(1)) if h else 0


def image_status(page: Path, chromium: str | None = None, timeout: float = 120) -> list[dict]:
    """Load ``page`` in headless Chromium; for every <img>: complete, natural width/height.

    The page itself has no script: a copy with a small probe appended is loaded
    from the same directory (so relative image paths resolve the same way).
    """
    return _probe(page, chromium, 1400, timeout)[0]


def page_height(page: Path, width: int = 1400, chromium: str | None = None, timeout: float = 120) -> int:
    return _probe(page, chromium, width, timeout)[1]


def screenshot(page: Path, png: Path, width: int = 1400, height: int | None = None, chromium: str | None = None,
               timeout: float = 120) -> Path:
    """Full-page PNG of ``page`` (height: the page's own scroll height unless given)."""
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError("no chromium binary (Debian: apt-get install chromium)")
    if not height:
        height = max(600, page_height(page, width, chromium, timeout) + 20)
    png = Path(png).resolve()
    cp = subprocess.run([chromium, *FLAGS, f"--window-size={width},{height}", "--virtual-time-budget=15000",
                         f"--screenshot={png}", Path(page).resolve().as_uri()],
                        capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {cp.returncode}): {cp.stderr[-500:]}")
    return png
