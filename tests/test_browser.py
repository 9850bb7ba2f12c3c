"""The README's page-view snippet, as is, in headless Chromium on a page from another origin.

Needs Debian's chromium (`apt-get install chromium`; `.ci/run` installs it). Without it the test is
skipped on a developer's machine and fails under CI=true.
"""

import os
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
import xstatic.pkg.jquery
from aiohttp import web
from playwright.async_api import async_playwright

from livecounter import create_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Quiet on a closed network: no sync, no component updates, no background requests.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The page-view snippet"):]
    return re.search(r"```html\n(.*?)```", section, re.S).group(1)


@pytest.fixture
async def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it with apt-get")
        pytest.skip("needs Debian's chromium: apt-get install chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def counter_server(aiohttp_server, tmp_path):
    shutil.copy(ROOT / "counters.json", tmp_path / "counters.json")
    return await aiohttp_server(create_app(tmp_path / "counters.json"), host="127.0.0.1")


@pytest.fixture
async def blog_server(aiohttp_server, counter_server):
    """Another origin (localhost, another port) serving the README snippet on a page."""
    counter_url = f"http://127.0.0.1:{counter_server.port}/counters/1/"
    snippet = (readme_snippet()
               .replace("https://code.jquery.com/jquery-3.7.1.min.js", "/jquery.min.js")
               .replace("https://counter.example.com/counters/1/", counter_url))
    page = f"<!doctype html><html><head><title>blog</title></head><body>{snippet}</body></html>"

    async def serve_page(request):
        return web.Response(text=page, content_type="text/html")

    async def no_icon(request):
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/", serve_page)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_static("/", xstatic.pkg.jquery.BASE_DIR)
    return await aiohttp_server(app, host="localhost")


async def open_blog(browser, blog_server, errors):
    page = await browser.new_page()
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"http://localhost:{blog_server.port}/")
    return page


async def test_the_page_view_snippet_counts_and_updates_live_across_origins(browser, blog_server,
                                                                            counter_server):
    errors = []
    first = await open_blog(browser, blog_server, errors)
    await first.wait_for_function("document.getElementById('views').textContent === '1'", timeout=10_000)

    second = await open_blog(browser, blog_server, errors)  # another reader: both now show 2
    await second.wait_for_function("document.getElementById('views').textContent === '2'", timeout=10_000)
    await first.wait_for_function("document.getElementById('views').textContent === '2'", timeout=10_000)

    async with aiohttp.ClientSession() as session:
        response = await session.get(f"http://127.0.0.1:{counter_server.port}/counters/1/")
        assert await response.text() == "2\n"  # each page counted itself once
    assert errors == []
