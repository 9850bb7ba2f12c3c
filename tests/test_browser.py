"""What a browser shows: the README's page-view snippet, the demo page and embed.js, in headless
Chromium, with the embedding pages served from another origin.

Needs Debian's chromium (`apt-get install chromium`; `.ci/run` installs it). Without it the tests are
skipped on a developer's machine and fail under CI=true.
"""

import asyncio
import contextlib
import json
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import xstatic.pkg.jquery
from aiohttp import web
from PIL import Image
from playwright.async_api import async_playwright

from livecounter import STREAM_QUERY_MAX, create_app
from tests.helpers import ZEROS, metric, wait_until

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Quiet on a closed network: no sync, no component updates, no background requests.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


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
def start_counter_server(aiohttp_server, tmp_path):
    """start(counters, **options): a counter server on a data file of those counters; its URL."""
    async def start(counters=ZEROS, **options):
        (tmp_path / "counters.json").write_text(json.dumps(counters))
        server = await aiohttp_server(create_app(tmp_path / "counters.json", **options), host="127.0.0.1")
        return f"http://127.0.0.1:{server.port}/"
    return start


@pytest.fixture
async def counter_url(start_counter_server):
    return await start_counter_server()


@pytest.fixture
def other_origin(aiohttp_server):
    """Serves one HTML page (and jQuery) from http://localhost:PORT/, another origin than the server's."""
    async def serve(html: str) -> str:
        async def page(request):
            return web.Response(text=html, content_type="text/html")

        async def no_icon(request):
            return web.Response(status=204)

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/favicon.ico", no_icon)
        app.router.add_static("/", xstatic.pkg.jquery.BASE_DIR)
        server = await aiohttp_server(app, host="localhost")
        return f"http://localhost:{server.port}/"
    return serve


async def open_page(browser, url, errors, *, fake_clock=False, requests=None, viewport=None):
    """A new page of url (browser: a Browser, each page in a context of its own, or a BrowserContext,
    whose pages share an origin's storage, locks and connections); with fake_clock the test moves the
    page's timers on (page.clock); the URL of every request it makes is appended to requests; viewport
    ({"width": …, "height": …}) in place of Playwright's 1280×720."""
    page = await browser.new_page(**({"viewport": viewport} if viewport else {}))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    if requests is not None:
        page.on("request", lambda request: requests.append(request.url))
    if fake_clock:
        await page.clock.install()
    await page.goto(url)
    return page


async def shows(page, selector, text, timeout=10_000):
    await page.wait_for_function(
        "([selector, text]) => [...document.querySelectorAll(selector)].length > 0 && "
        "[...document.querySelectorAll(selector)].every((e) => e.textContent.trim() === text)",
        arg=[selector, text], timeout=timeout)


async def value_of(counter_url, counter_id):
    async with aiohttp.ClientSession() as session:
        return int(await (await session.get(f"{counter_url}counters/{counter_id}/")).text())


async def counters_of(counter_url):
    async with aiohttp.ClientSession() as session:
        return await (await session.get(f"{counter_url}counters/")).json()


async def listeners_of(counter_url):
    async with aiohttp.ClientSession() as session:
        return await metric(session, counter_url.rstrip("/"), "listeners")


@contextlib.asynccontextmanager
async def another_watcher(counter_url, counter_id):
    """A stream of the counter's values, open (and counted: its first frame is in) until the block ends."""
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{counter_url}counters/{counter_id}/", headers={"Accept": "text/event-stream"})
        try:
            assert response.status == 200
            while (await response.content.readline()).strip() != b"":  # the retry field: the stream is open
                pass
            yield
        finally:
            response.close()


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The page-view snippet"):]
    return re.search(r"```html\n(.*?)```", section, re.S).group(1)


async def test_the_readme_snippet_counts_and_updates_live_across_origins(browser, counter_url, other_origin):
    snippet = (readme_snippet()
               .replace("https://code.jquery.com/jquery-3.7.1.min.js", "/jquery.min.js")
               .replace("https://counter.example.com/", counter_url))
    blog = await other_origin(f"<!doctype html><title>blog</title><body>{snippet}</body>")
    errors = []
    first = await open_page(browser, blog, errors)
    await shows(first, "#views", "1")
    second = await open_page(browser, blog, errors)  # another reader: both now show 2
    await shows(second, "#views", "2")
    await shows(first, "#views", "2")
    assert await value_of(counter_url, 1) == 2  # each page counted itself once
    assert errors == []


async def test_the_demo_page_shows_every_counter_live(browser, counter_url, tmp_path):
    errors = []
    page = await open_page(browser, counter_url, errors)
    await shows(page, "[data-id='1'] .value", "1")  # it counted its own view
    await shows(page, "[data-id='9'] .value", "0")
    assert await page.locator(".counter").count() == 9
    await shows(page, "#status", "live")

    async with aiohttp.ClientSession() as session:  # another client increments
        await session.post(f"{counter_url}counters/5/")
    await shows(page, "[data-id='5'] .value", "1")

    await page.click("[data-id='3'] button")  # "+1"
    await shows(page, "[data-id='3'] .value", "1")
    assert await value_of(counter_url, 3) == 1

    screenshot = tmp_path / "demo.png"
    await page.screenshot(path=screenshot, full_page=True)
    colors = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 20, "the screenshot is blank"
    assert errors == []


async def test_the_demo_page_shows_how_many_watch_each_counter_live(browser, counter_url):
    errors = []
    page = await open_page(browser, counter_url, errors)
    await shows(page, ".counter .watching", "1 watching")  # each card: the page's own stream watches it
    assert await page.locator(".watching").count() == 9
    async with another_watcher(counter_url, 5):
        await shows(page, "[data-id='5'] .watching", "2 watching")
        await shows(page, "[data-id='4'] .watching", "1 watching")
    await shows(page, "[data-id='5'] .watching", "1 watching")  # it left
    await shows(page, "#status", "live")
    assert errors == []


# What the demo page must hold: a short value, a three-digit one (which "N watching" used to sit
# beside or wrap under, by value) and a seven-digit one (which ran out of its card at 1280 px).
REAL_NUMBERS = {"likes": 42, "signups": 987, "home": 1234567}

# Each card's box, and the boxes of what it shows: the element's and its text's (a Range), since a
# block keeps its card's width while its text runs out of it.
CARD_BOXES = """[...document.querySelectorAll(".counter")].map((card) => {
    const box = (rect) => ({left: rect.left, top: rect.top, right: rect.right, bottom: rect.bottom});
    const shown = [...card.querySelectorAll(".id, .value, .watching, button")].flatMap((element) => {
        const text = document.createRange();
        text.selectNodeContents(element);
        return [{what: element.className || element.tagName, ...box(element.getBoundingClientRect())},
                {what: (element.className || element.tagName) + " text", ...box(text.getBoundingClientRect())}];
    });
    return {id: card.dataset.id, card: box(card.getBoundingClientRect()), shown,
            button: card.querySelector("button").getBoundingClientRect().top};
})"""


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 800}, {"width": 390, "height": 844}],
                         ids=["1280px", "390px"])
async def test_the_demo_page_keeps_real_numbers_inside_their_cards_and_lines_up_the_buttons(
        browser, start_counter_server, viewport):
    counter_url = await start_counter_server(REAL_NUMBERS)
    errors = []
    page = await open_page(browser, counter_url, errors, viewport=viewport)
    await shows(page, "[data-id='home'] .value", "1,234,567")  # grouped as the badge groups it
    await shows(page, "[data-id='signups'] .value", "987")
    await shows(page, ".counter .watching", "1 watching")
    await page.wait_for_timeout(100)  # any reflow after the last text settles
    cards = await page.evaluate(CARD_BOXES)
    assert len(cards) == 3
    for card in cards:
        for shown in card["shown"]:
            outside = [side for side in ("left", "top") if shown[side] < card["card"][side] - 0.5] + [
                side for side in ("right", "bottom") if shown[side] > card["card"][side] + 0.5]
            assert not outside, f"{card['id']}'s {shown['what']} leaves its card on the {outside}: {shown} in {card['card']}"
    rows = {}
    for card in cards:
        rows.setdefault(round(card["card"]["top"]), []).append(card)
    assert any(len(row) > 1 for row in rows.values()), "one card a row: the buttons' line-up goes untested"
    for row in rows.values():
        assert len({round(card["button"], 1) for card in row}) == 1, [(card["id"], card["button"]) for card in row]

    await page.click("[data-id='home'] button")  # a live change is grouped too
    await shows(page, "[data-id='home'] .value", "1,234,568")
    assert errors == []


async def test_embed_js_shows_and_counts_on_another_origin(browser, counter_url, other_origin):
    blog = await other_origin(f"""<!doctype html><title>blog</title><body>
        <p>views: <span id="views" data-livecounter="2" data-livecounter-count>…</span></p>
        <p>likes: <span class="likes" data-livecounter="3">…</span> <span class="likes" data-livecounter="3">…</span></p>
        <script src="{counter_url}embed.js"></script></body>""")
    errors = []
    page = await open_page(browser, blog, errors)
    await shows(page, "#views", "1")  # counted once
    await shows(page, ".likes", "0")
    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/3/")
        metrics = await (await session.get(f"{counter_url}metrics")).text()
    await shows(page, ".likes", "1")
    assert "livecounter_listeners 1\n" in metrics  # one stream for all of the page's counters
    assert await value_of(counter_url, 2) == 1
    assert errors == []


async def test_embed_js_shows_how_many_watch_a_counter_live_on_another_origin(browser, counter_url, other_origin):
    # Only watcher elements of counter 2: the page's stream carries 2 (and so watches it) beside 3.
    blog = await other_origin(f"""<!doctype html><title>blog</title><body>
        <p>likes: <span id="likes" data-livecounter="3">…</span></p>
        <p><span class="watching" data-livecounter-watchers="2" data-livecounter-count>…</span> reading now
           (<span class="watching" data-livecounter-watchers="2">…</span>)</p>
        <script src="{counter_url}embed.js"></script></body>""")
    errors, requests = [], []
    page = await open_page(browser, blog, errors, requests=requests)
    await shows(page, ".watching", "1")  # the page alone: its own stream
    await shows(page, "#likes", "0")
    await page.wait_for_function("""[...document.querySelectorAll("[data-livecounter-watchers]")]
                                    .every((e) => e.dataset.livecounterState === 'live')""", timeout=10_000)
    assert [urlsplit(url).query for url in requests if "?ids=" in url] == ["ids=2,3&watchers=1"]
    assert await listeners_of(counter_url) == 1

    async with another_watcher(counter_url, 2):
        await shows(page, ".watching", "2")
    await shows(page, ".watching", "1")  # it left
    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/3/")
    await shows(page, "#likes", "1")
    assert await value_of(counter_url, 2) == 0  # data-livecounter-count counts views, not watcher counts
    assert errors == []


@pytest.mark.parametrize("scripts", [["classic"], ["module"], ["classic", "classic"], ["module", "classic"]],
                         ids=" and ".join)
async def test_embed_js_as_a_module_or_included_twice_streams_once_and_counts_once(
        browser, counter_url, other_origin, scripts):
    tags = {"classic": f'<script src="{counter_url}embed.js"></script>',
            "module": f'<script type="module" src="{counter_url}embed.js"></script>'}
    blog = await other_origin(f"""<!doctype html><title>blog</title><body>
        <p>views: <span id="views" data-livecounter="2" data-livecounter-count>…</span></p>
        <p>likes: <span id="likes" data-livecounter="3">…</span></p>
        {"".join(tags[script] for script in scripts)}</body>""")
    errors = []
    page = await open_page(browser, blog, errors)
    await shows(page, "#views", "1")
    await page.wait_for_function("document.getElementById('likes').dataset.livecounterState === 'live'",
                                 timeout=10_000)
    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/3/")
    await shows(page, "#likes", "1")
    await asyncio.sleep(0.5)  # a second stream or POST, had a second copy made them, is in by now
    assert await listeners_of(counter_url) == 1
    assert await value_of(counter_url, 2) == 1
    await shows(page, "#views", "1")
    assert uncaught(errors) == []


OBJECT_MEMBERS = ["constructor", "__proto__", "toString", "hasOwnProperty", "valueOf"]


async def test_ids_named_like_object_members_are_counted_and_shown(browser, start_counter_server, other_origin):
    counter_url = await start_counter_server(dict.fromkeys(OBJECT_MEMBERS, 0))
    spans = "".join(f'<p>{name}: <span data-livecounter="{name}" data-livecounter-count>…</span></p>'
                    for name in OBJECT_MEMBERS)
    blog = await other_origin(f"""<!doctype html><title>blog</title><body>{spans}
        <script src="{counter_url}embed.js"></script></body>""")
    errors = []
    page = await open_page(browser, blog, errors)
    for name in OBJECT_MEMBERS:
        await shows(page, f"[data-livecounter='{name}']", "1")  # counted once, each
    demo = await open_page(browser, counter_url, errors)
    for name in OBJECT_MEMBERS:
        await shows(demo, f"[data-id='{name}'] .value", "1")
    await demo.click("[data-id='__proto__'] button")
    await shows(page, "[data-livecounter='__proto__']", "2")
    await shows(demo, "[data-id='__proto__'] .value", "2")
    await shows(demo, "#summary", "5 counters.")
    assert await counters_of(counter_url) == {**dict.fromkeys(OBJECT_MEMBERS, 1), "__proto__": 2}
    assert uncaught(errors) == []


async def test_the_demo_page_with_no_counters_says_so_and_how_to_make_one(browser, start_counter_server):
    # A POST to counter 1 would make it; the admin token lets the page's PUT command work too.
    counter_url = await start_counter_server({}, auto_create=True, admin_token="secret")
    errors = []
    page = await open_page(browser, counter_url, errors, fake_clock=True)
    await shows(page, "#status", "idle")
    await asyncio.sleep(0.5)
    assert "counted" not in await page.inner_text("main")
    assert await counters_of(counter_url) == {}
    await shows(page, "#summary", "No counters yet.")
    hint = await page.inner_text("#empty")
    assert "--auto-create" in hint
    assert f"curl -X POST {counter_url}counters/ID/" in hint
    put = f"""curl -X PUT -H "Authorization: Bearer $LIVECOUNTER_ADMIN_TOKEN" -d '{{"value": 0}}' {counter_url}counters/ID/"""
    assert put in hint

    # The command as shown, run in a shell with the token set, makes counter ID; the page shows it
    # at its next listing, and the hint is gone.
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", put, env={**os.environ, "LIVECOUNTER_ADMIN_TOKEN": "secret"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    output, _ = await shell.communicate()
    assert (shell.returncode, output) == (0, b"0\n")
    await page.clock.fast_forward("00:31")
    await shows(page, "[data-id='ID'] .value", "0")
    await shows(page, "#summary", "1 counter.")
    assert not await page.is_visible("#empty")
    assert uncaught(errors) == []


async def test_the_demo_page_says_how_many_counters_it_shows(browser, start_counter_server):
    counter_url = await start_counter_server({str(i): 0 for i in range(1, 151)})
    errors = []
    page = await open_page(browser, counter_url, errors)
    await shows(page, "#summary", "150 counters, 100 of them shown (a stream takes at most 100).")
    await shows(page, "[data-id='1'] .value", "1")
    await shows(page, "#counted", "This page counted its own view on counter 1.")
    await shows(page, "#status", "live")
    assert await page.locator(".counter").count() == 100
    assert await counters_of(counter_url) == {"1": 1, **{str(i): 0 for i in range(2, 151)}}
    # It asks for the counters it shows, not for every counter (a million would be 24 MB a visit).
    listings = await page.evaluate("""performance.getEntriesByType("resource").map((entry) => entry.name)
                                      .filter((url) => /counters\\/(\\?(?!ids=)|$)/.test(url))""")
    assert listings and all(url == f"{counter_url}counters/?limit=100" for url in listings), listings
    assert uncaught(errors) == []


async def test_the_demo_page_shows_a_counter_created_while_it_is_open(browser, start_counter_server):
    counter_url = await start_counter_server(ZEROS, admin_token="secret")
    errors = []
    page = await open_page(browser, counter_url, errors, fake_clock=True)
    await shows(page, "#status", "live")
    async with aiohttp.ClientSession() as session:
        response = await session.put(f"{counter_url}counters/new/", json={"value": 7},
                                     headers={"Authorization": "Bearer secret"})
        assert response.status == 200
        await page.clock.fast_forward("00:31")  # past the next listing of the counters (every 30 s)
        await shows(page, "[data-id='new'] .value", "7")
        await shows(page, "#summary", "10 counters.")
        await shows(page, "#status", "live")
        await session.post(f"{counter_url}counters/new/")
        await shows(page, "[data-id='new'] .value", "8")  # the page's new stream has it

    async def one_stream():  # the new one in place of the old
        return await listeners_of(counter_url) == 1
    await wait_until(one_stream, message="the old stream is still open")
    assert uncaught(errors) == []


LONG_IDS = [f"{i:03d}-{'x' * 60}" for i in range(100)]  # 64 characters each, the most an id may have


def streams_of(requests, counter_url):
    """The multi-counter streams among the requests' URLs: {the part after counters/: its ids}."""
    base = f"{counter_url}counters/"
    return {url[len(base):]: parse_qs(urlsplit(url).query)["ids"][0].split(",")
            for url in requests if url.startswith(base + "?ids=")}


async def test_long_ids_are_split_into_streams_of_short_urls(browser, start_counter_server, other_origin):
    counter_url = await start_counter_server(dict.fromkeys(LONG_IDS, 0))
    spans = "".join(f'<span data-livecounter="{name}" data-livecounter-count>…</span> ' for name in LONG_IDS)
    blog = await other_origin(f"""<!doctype html><title>blog</title><body><p>{spans}</p>
        <script src="{counter_url}embed.js"></script></body>""")
    errors, requests = [], []
    page = await open_page(browser, blog, errors, requests=requests)
    await shows(page, "[data-livecounter]", "1")  # every counter shown, and counted once
    streams = streams_of(requests, counter_url)  # 100 ids of 64 characters: 6,504 characters in one URL
    assert all(len(query) <= STREAM_QUERY_MAX for query in streams), [len(query) for query in streams]
    assert sorted(name for ids in streams.values() for name in ids) == LONG_IDS  # each in one stream
    assert len(streams) == -(-len(LONG_IDS) // ((STREAM_QUERY_MAX - len("?ids")) // 65))  # as few as fit
    assert await listeners_of(counter_url) == len(streams)
    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/{LONG_IDS[-1]}/")
    await shows(page, f"[data-livecounter='{LONG_IDS[-1]}']", "2")

    requests.clear()  # the demo page, showing the same 100 counters, splits its streams alike
    demo = await open_page(browser, counter_url, errors, requests=requests)
    await shows(demo, "#status", "live")
    await shows(demo, f"[data-id='{LONG_IDS[-1]}'] .value", "2")
    await shows(demo, f"[data-id='{LONG_IDS[0]}'] .value", "1")
    demo_streams = streams_of(requests, counter_url)  # with &watchers=1, and the same ids in each
    assert all(query.endswith("&watchers=1") and len(query) <= STREAM_QUERY_MAX for query in demo_streams)
    assert list(demo_streams.values()) == list(streams.values())
    assert await counters_of(counter_url) == {**dict.fromkeys(LONG_IDS, 1), LONG_IDS[-1]: 2}
    assert errors == []


async def test_asking_for_watcher_counts_counts_in_the_url_length(browser, start_counter_server, other_origin):
    # 30 ids of 64 characters and one of 41 make a query of exactly 1,996 characters: one stream. With
    # "&watchers=1" (11 more) it would be 2,007: the counter with a watchers element starts a second.
    ids = LONG_IDS[:30] + ["z" * 41]
    counter_url = await start_counter_server(dict.fromkeys(ids, 0))
    spans = "".join(f'<span data-livecounter="{name}">…</span> ' for name in ids)
    blog = await other_origin(f"""<!doctype html><title>blog</title><body><p>{spans}</p>
        <p><span id="watching" data-livecounter-watchers="{ids[-1]}">…</span> watching</p>
        <script src="{counter_url}embed.js"></script></body>""")
    errors, requests = [], []
    page = await open_page(browser, blog, errors, requests=requests)
    await shows(page, "[data-livecounter]", "0")
    await shows(page, "#watching", "1")
    streams = streams_of(requests, counter_url)
    assert [(len(query), query.endswith("&watchers=1")) for query in streams] == [(1954, False), (57, True)]
    assert list(streams.values()) == [ids[:30], ids[30:]]
    assert errors == []


# --- tabs: one stream shared by the tabs of an origin -----------------------------------------------

TAB_PAGE = """<!doctype html><title>blog</title><body>
    <p>views: <span id="views" data-livecounter="2" data-livecounter-count>…</span></p>
    <p>likes: <span id="likes" data-livecounter="3">…</span></p>
    <script src="{counter_url}embed.js"></script></body>"""


async def states_of(pages):
    return {await page.get_attribute("#likes", "data-livecounter-state") for page in pages}


async def test_seven_tabs_share_one_stream_and_each_counts_its_view(browser, counter_url, other_origin):
    # One browser context: its tabs share an origin's locks, channels and connections. Each holding a
    # stream of its own, the seventh (over HTTP/1.1, six connections to a host) never had a value.
    blog = await other_origin(TAB_PAGE.format(counter_url=counter_url))
    context = await browser.new_context()
    errors, tabs = [], []
    for views in range(1, 8):
        tabs.append(await open_page(context, blog, errors))
        await shows(tabs[-1], "#views", str(views))  # the value at once, then its own view counted
    for tab in tabs:
        await shows(tab, "#views", "7")
        await shows(tab, "#likes", "0")
    assert await states_of(tabs) == {"live"}
    assert await listeners_of(counter_url) == 1
    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/3/")
    for tab in tabs:
        await shows(tab, "#likes", "1")

    await tabs.pop(0).close()  # the tab that holds the stream: another takes it over
    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/3/")
    for tab in tabs:
        await shows(tab, "#likes", "2")

    async def all_live():
        return await states_of(tabs) == {"live"}
    await wait_until(all_live, timeout=10, message="a tab does not say it is live again")

    async def one_stream():
        return await listeners_of(counter_url) == 1
    await wait_until(one_stream, message="the closed tab's stream is still open, or more were opened")
    assert await value_of(counter_url, 2) == 7  # every view counted once, none again on the new stream
    for tab in tabs:
        await shows(tab, "#views", "7")
    await context.close()
    assert errors == []


async def test_tabs_sharing_a_stream_show_its_watcher_count_and_a_late_tab_gets_it(
        browser, counter_url, other_origin):
    blog = await other_origin(f"""<!doctype html><title>blog</title><body>
        <p>likes: <span id="likes" data-livecounter="3">…</span>, <span id="watching"
           data-livecounter-watchers="3">…</span> watching</p>
        <script src="{counter_url}embed.js"></script></body>""")
    context = await browser.new_context()
    errors = []
    first = await open_page(context, blog, errors)
    await shows(first, "#watching", "1")
    second = await open_page(context, blog, errors)  # no new count goes out: it has the holder's
    await shows(second, "#watching", "1")
    await shows(second, "#likes", "0")
    assert await listeners_of(counter_url) == 1  # the tabs of an origin count once together
    async with another_watcher(counter_url, 3):
        for tab in (first, second):  # relayed to the tab that doesn't hold the stream
            await shows(tab, "#watching", "2")
    for tab in (first, second):
        await shows(tab, "#watching", "1")

    await first.close()  # the holder: the second opens the stream again, and is its only watcher
    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/3/")
    await shows(second, "#likes", "1")
    await shows(second, "#watching", "1")
    async with another_watcher(counter_url, 3):  # its own stream has the counts now
        await shows(second, "#watching", "2")
    await shows(second, "#watching", "1")
    await second.wait_for_function("document.getElementById('watching').dataset.livecounterState === 'live'")
    await context.close()
    assert errors == []


@pytest.mark.parametrize("missing", ["navigator.locks", "BroadcastChannel"])
async def test_without_locks_or_channels_each_tab_has_its_own_stream(browser, counter_url, other_origin, missing):
    blog = await other_origin(TAB_PAGE.format(counter_url=counter_url))
    context = await browser.new_context()
    await context.add_init_script({"navigator.locks": "delete Navigator.prototype.locks;",
                                   "BroadcastChannel": "delete window.BroadcastChannel;"}[missing])
    errors = []
    first = await open_page(context, blog, errors)
    await shows(first, "#views", "1")
    second = await open_page(context, blog, errors)
    await shows(second, "#views", "2")
    assert await first.evaluate(f"typeof {missing}") == "undefined"
    assert await listeners_of(counter_url) == 2
    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/3/")
    for tab in (first, second):
        await shows(tab, "#likes", "1")
        await shows(tab, "#views", "2")
    assert await states_of([first, second]) == {"live"}
    await context.close()
    assert errors == []


# --- outages: a stream answered 502 or 503 for a while --------------------------------------------

@pytest.fixture
async def flaky_proxy(aiohttp_server, counter_url):
    """A proxy in front of the counter server with a switch, as nginx in front of a livecounter that
    restarts: `down(status)` ends the streams it carries and answers `status` (502, 503) to every
    request until `up()`. `refused` counts the event-stream requests it refused."""
    class Proxy:
        def __init__(self):
            self.status, self.refused, self.streams = None, 0, set()

        def down(self, status):
            self.status = status
            for upstream in list(self.streams):
                upstream.close()

        def up(self):
            self.status = None

    proxy = Proxy()
    session = aiohttp.ClientSession()

    async def relay(request):
        if proxy.status:
            proxy.refused += "text/event-stream" in request.headers.get("Accept", "")
            return web.Response(status=proxy.status, text="down\n",
                                headers={"Access-Control-Allow-Origin": "*"})
        headers = {name: request.headers[name] for name in ("Accept", "Content-Type") if name in request.headers}
        async with session.request(request.method, counter_url + request.path_qs.lstrip("/"),
                                   headers=headers, data=await request.read()) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                name: upstream.headers[name] for name in ("Content-Type", "Cache-Control", "Access-Control-Allow-Origin")
                if name in upstream.headers})
            await response.prepare(request)
            proxy.streams.add(upstream)
            try:
                async for data in upstream.content.iter_any():
                    await response.write(data)
            except aiohttp.ClientError:  # down(): the stream ends, as it does when livecounter stops
                pass
            finally:
                proxy.streams.discard(upstream)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", relay)
    proxy.url = f"http://127.0.0.1:{(await aiohttp_server(app, host='127.0.0.1')).port}/"
    yield proxy
    proxy.down(502)  # the server's cleanup waits for handlers: end the streams the page still holds
    await session.close()


def uncaught(errors):
    """The errors but Chromium's own line for each request that failed (an error status, a dropped
    connection): an outage makes those on purpose, and the page's code never sees them as errors."""
    return [error for error in errors if not error.startswith("Failed to load resource: ")]


async def test_embed_js_reopens_its_stream_after_a_502_and_counts_the_view_once(
        browser, counter_url, flaky_proxy, other_origin):
    blog = await other_origin(f"""<!doctype html><title>blog</title><body>
        <p>views: <span id="views" data-livecounter="2" data-livecounter-count>…</span></p>
        <p>likes: <span id="likes" data-livecounter="3">…</span></p>
        <script src="{flaky_proxy.url}embed.js"></script></body>""")
    errors = []
    page = await open_page(browser, blog, errors)
    await shows(page, "#views", "1")
    await shows(page, "#likes", "0")

    flaky_proxy.down(502)  # the stream ends; the browser's own retry gets a 502 and gives up
    state = "(state) => document.getElementById('views').dataset.livecounterState === state"
    await page.wait_for_function(state, arg="offline", timeout=15_000)
    await wait_until(lambda: flaky_proxy.refused >= 2, timeout=15)  # embed.js reopened it, and got a 502 again
    await shows(page, "#views", "1")  # the value stays shown meanwhile
    await shows(page, "#likes", "0")
    flaky_proxy.up()
    await page.wait_for_function(state, arg="live", timeout=15_000)

    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/3/")
    await shows(page, "#likes", "1")
    await shows(page, "#views", "1")
    assert await value_of(counter_url, 2) == 1  # counted once, not again on the new stream
    assert uncaught(errors) == []


async def test_the_demo_page_reopens_its_stream_after_a_503_and_says_so(browser, counter_url, flaky_proxy):
    errors = []
    page = await open_page(browser, flaky_proxy.url, errors)
    await shows(page, "#status", "live")
    await shows(page, "[data-id='1'] .value", "1")

    flaky_proxy.down(503)
    await shows(page, "#status", "reconnecting…")  # the browser retries by itself first
    await page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('offline, retrying in ')", timeout=15_000)
    await wait_until(lambda: flaky_proxy.refused >= 2, timeout=15)
    await shows(page, "[data-id='1'] .value", "1")  # the cards keep their values
    flaky_proxy.up()
    await shows(page, "#status", "live", timeout=15_000)

    async with aiohttp.ClientSession() as session:
        await session.post(f"{counter_url}counters/5/")
    await shows(page, "[data-id='5'] .value", "1")
    assert await value_of(counter_url, 1) == 1  # its own view, counted once
    assert uncaught(errors) == []


async def test_a_badge_renders_in_a_page_of_another_origin_with_its_value_unclipped(
        browser, start_counter_server, other_origin, tmp_path):
    counter_url = await start_counter_server({"2": 1234567})
    page_url = await other_origin(f'<!doctype html><body style="margin:0;background:#fff">'
                                  f'<img id="badge" src="{counter_url}counters/2/badge.svg"></body>')
    page = await browser.new_page()
    await page.goto(page_url)
    await page.wait_for_function("document.getElementById('badge').complete")
    width = await page.evaluate("document.getElementById('badge').naturalWidth")
    assert width > 60
    path = tmp_path / "badge.png"
    await page.screenshot(path=path, clip={"x": 0, "y": 0, "width": width, "height": 20})
    colors = Image.open(path).convert("RGB").getcolors(100_000)
    assert len(colors) > 10  # grey, green, white text with its antialiasing: not a blank or broken image
    assert any(abs(r - 0x44) < 40 and g > 0xa0 and b < 0x60 for _, (r, g, b) in colors)  # the value's green

    # The badge itself: the value in its text, every text inside its box in the font this browser has.
    await page.goto(f"{counter_url}counters/2/badge.svg")
    texts = await page.evaluate("""[...document.querySelectorAll("text")].map((text) => {
        const box = text.getBBox();
        return [text.textContent, box.x, box.x + box.width]; })""")
    rects = await page.evaluate("""[...document.querySelectorAll("g rect")].slice(0, 2).map((rect) =>
        [rect.x.baseVal.value, rect.x.baseVal.value + rect.width.baseVal.value])""")
    assert [text for text, _, _ in texts] == ["views", "views", "1,234,567", "1,234,567"]
    for (text, left, right), (box_left, box_right) in zip(texts[1::2], rects):
        assert box_left <= left and right <= box_right, (text, left, right, box_left, box_right)
