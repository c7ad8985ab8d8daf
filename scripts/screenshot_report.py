#!/usr/bin/env python3
"""Screenshot a tlslab HTML report with headless Chromium (Debian: apt-get install chromium).

    python scripts/screenshot_report.py results/reference/index.html [-o results/reference/screenshot.png]
        [--width 1400] [--height N]

The page is rendered at --width; the screenshot covers the whole page (its
scroll height, measured in a first headless load) unless --height is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tlslab.report.browser import find_chromium, screenshot  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", help="the report's index.html")
    ap.add_argument("-o", "--output", default=None, help="PNG to write (default: next to the page, screenshot.png)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=None, help="default: the page's full height")
    args = ap.parse_args()
    page = Path(args.page)
    if page.is_dir():
        page = page / "index.html"
    if not page.is_file():
        print(f"screenshot_report: {page} does not exist", file=sys.stderr)
        return 2
    if not find_chromium():
        print("screenshot_report: no chromium binary (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    png = Path(args.output) if args.output else page.with_name("screenshot.png")
    screenshot(page, png, args.width, args.height)
    print(f"screenshot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
