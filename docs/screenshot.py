"""Make docs/demo.png, the README's screenshot of the demo page, or check that it still shows the page.

    python docs/screenshot.py                 # writes docs/demo.png
    python docs/screenshot.py /tmp/demo.png   # or anywhere else
    python docs/screenshot.py --check         # exits 1 if docs/demo.png no longer shows the page (CI)

Starts `python livecounter.py` on a free port with a data file of its own (a few counters with
values; the shipped counters.json is not touched), opens / in headless Chromium through Playwright
and saves a 1000×700 screenshot once the page is still: live, its own view counted on counter 1
(1,041 becomes 1,042), "1 watching" on every card (its own stream), no highlight fading. So two runs
on one machine make the same pixels. --check renders into a temporary file the same way and
compares: more than 1% of the pixels differing noticeably (leeway for another Chromium's
antialiasing) means the page changed since docs/demo.png was made. Needs what tests/test_browser.py
needs: Debian's chromium (apt-get install chromium; without it, Playwright's own Chromium if
`playwright install chromium` fetched one) and `pip install -r requirements-dev.txt`.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops
from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
SCREENSHOT = DOCS / "demo.png"
CHROMIUM = Path("/usr/bin/chromium")
# The same as tests/test_browser.py: quiet on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
VIEWPORT = {"width": 1000, "height": 700}
COUNTERS = {"1": 1041, "2": 27, "3": 386, "home": 15230, "docs": 2417, "blog.launch": 908,
            "likes-42": 73, "signups": 12, "pricing": 641, "faq": 129}
# What the page shows once it is still: counter 1 with its own view, each card with its own stream.
STILL = """([counted, cards]) =>
    document.querySelector("#status.live") !== null
    && document.querySelector("[data-id='1'] .value")?.textContent === counted
    && document.getElementById("counted").textContent !== ""
    && [...document.querySelectorAll(".watching")].filter((e) => e.textContent === "1 watching").length === cards
    && document.querySelector(".changed") === null
    && document.getAnimations().length === 0"""
NOTICEABLE = 48  # of 255, in a channel: less is a glyph's edge shaded a little otherwise
MOST_DIFFERING = 0.01  # of the pixels (the screenshot the page's "N watching" lines made stale: 4.5%)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot(output: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="livecounter-screenshot-") as directory:
        data = Path(directory) / "counters.json"
        data.write_text(json.dumps(COUNTERS))
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "livecounter.py"), "--port", str(port), "--data", str(data),
             "--no-access-log"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            if "livecounter serving" not in server.stdout.readline():
                raise RuntimeError("livecounter did not start")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM) if CHROMIUM.exists() else None, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport=VIEWPORT)
                    page.goto(f"http://127.0.0.1:{port}/")
                    page.wait_for_function(STILL, arg=[f"{COUNTERS['1'] + 1:,}", len(COUNTERS)], timeout=15_000)
                    page.evaluate("document.fonts.ready.then(() => true)")
                    page.screenshot(path=str(output))
                finally:
                    browser.close()
        finally:
            server.terminate()
            server.wait(10)


def differing_share(made: Path, fresh: Path) -> float:
    """The share of pixels that differ noticeably between two screenshots (1.0 if their sizes do)."""
    with Image.open(made) as made_image, Image.open(fresh) as fresh_image:
        if made_image.size != fresh_image.size:
            return 1.0
        difference = ImageChops.difference(made_image.convert("RGB"), fresh_image.convert("RGB"))
    red, green, blue = difference.split()
    largest = ImageChops.lighter(ImageChops.lighter(red, green), blue)  # per pixel, its channels' largest
    return sum(largest.histogram()[NOTICEABLE + 1:]) / (largest.width * largest.height)


def check() -> int:
    if not SCREENSHOT.exists():
        print(f"{SCREENSHOT.relative_to(ROOT)} is missing: run `python docs/screenshot.py`", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="livecounter-screenshot-check-") as directory:
        fresh = Path(directory) / "demo.png"
        screenshot(fresh)
        share = differing_share(SCREENSHOT, fresh)
    if share > MOST_DIFFERING:
        print(f"{SCREENSHOT.relative_to(ROOT)} is stale: {share:.1%} of its pixels differ from the demo page "
              f"as it renders now (at most {MOST_DIFFERING:.0%} may). Run `python docs/screenshot.py` and "
              "commit docs/demo.png.", file=sys.stderr)
        return 1
    print(f"{SCREENSHOT.relative_to(ROOT)} shows the demo page ({share:.2%} of its pixels differ)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Make docs/demo.png, or check that it still shows the demo page.")
    parser.add_argument("output", nargs="?", type=Path, default=SCREENSHOT,
                        help="where to write it (default: docs/demo.png)")
    parser.add_argument("--check", action="store_true",
                        help="render the page and compare it with docs/demo.png: exit 1 if that is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    screenshot(args.output)
    print(f"{args.output}: {args.output.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
