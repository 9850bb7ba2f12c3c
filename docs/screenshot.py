"""Make docs/demo.png, the README's screenshot of the demo page.

    python docs/screenshot.py                 # writes docs/demo.png
    python docs/screenshot.py /tmp/demo.png   # or anywhere else

Starts `python livecounter.py` on a free port with a data file of its own (a few counters with
values; the shipped counters.json is not touched), opens / in headless Chromium through Playwright,
waits until the page is live and has counted its own view on counter 1, and saves a 1000×700
screenshot. Needs what tests/test_browser.py needs: Debian's chromium (apt-get install chromium;
without it, Playwright's own Chromium if `playwright install chromium` fetched one) and
`pip install -r requirements-dev.txt`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
CHROMIUM = Path("/usr/bin/chromium")
# The same as tests/test_browser.py: quiet on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
VIEWPORT = {"width": 1000, "height": 700}
COUNTERS = {"1": 1041, "2": 27, "3": 386, "home": 15230, "docs": 2417, "blog.launch": 908,
            "likes-42": 73, "signups": 12, "pricing": 641, "faq": 129}


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
                    # Live: the stream is open, and its first value made the page count its own view.
                    page.wait_for_selector("#status.live", timeout=10_000)
                    page.wait_for_function(
                        "document.querySelector(\"[data-id='1'] .value\")?.textContent === '%s'"
                        % f"{COUNTERS['1'] + 1:,}", timeout=10_000)
                    page.wait_for_timeout(1000)  # the highlight of that change fades (0.6 s)
                    page.screenshot(path=str(output))
                finally:
                    browser.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"{output}: {output.stat().st_size:,} bytes")


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS / "demo.png")
