"""What common Server-Sent Events clients make of livecounter's streams: httpx-sse, sseclient-py and
aiohttp-sse-client (Python), the npm `eventsource` package (Node.js), curl, and Chromium's EventSource.

Each reads, as its users do, a counter's stream and a multi-counter stream of a real server: the
first event is the counter's value (type `message`; `counter` with JSON data on a multi stream),
the next one the value a POST made, and the retry field, where the client shows it, is in the
default window. A stream that sent `retry:` in a block of its own made httpx-sse yield an empty
`message` first (`int(event.data)` failed) and left sseclient-py's events without their retry.

The Node.js test installs `eventsource` from the npm registry, once per session, into a temp dir.
Without node and npm, curl or chromium, their tests are skipped on a developer's machine and fail
under CI=true (`.ci/run` installs them).
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp_sse_client import client as aiohttp_sse_client
from httpx_sse import aconnect_sse
from sseclient import SSEClient

from tests.helpers import SSE, WINDOW_MS, Server
from tests.test_browser import browser, open_page  # noqa: F401 (browser: a fixture)

# What every client must show. Counter 2 is POSTed to 5 before a stream opens, then once more.
SINGLE = [("message", "5"), ("message", "6")]
# A stream of counters 2 (at 6 by then) and 3, then a POST to 3.
MULTI = [("counter", {"id": "2", "value": 6}), ("counter", {"id": "3", "value": 0}),
         ("counter", {"id": "3", "value": 1})]
MULTI_PATH = "/counters/?ids=2,3"
EVENTSOURCE_PACKAGE = "eventsource@3"  # v3 (ESM, WHATWG API) runs on Node.js 18, Debian 12's nodejs


def need(program, package):
    if shutil.which(program) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is missing: .ci/run installs it with apt-get ({package})")
        pytest.skip(f"needs {program}: apt-get install {package}")


def multi(events):
    """(type, data) pairs of a multi stream's events, their JSON data read."""
    return [(kind, json.loads(data)) for kind, data in events]


def in_window(retry):
    """The retry a client took (milliseconds, as int or text), checked to be in the default window."""
    assert retry is not None, "the client took no retry field with the first event"
    assert WINDOW_MS[0] <= int(retry) <= WINDOW_MS[1], retry
    return int(retry)


async def post(base_url, path, times=1):
    async with aiohttp.ClientSession() as session:
        for _ in range(times):
            async with session.post(base_url + path) as response:
                assert response.status == 200, await response.text()


@pytest.fixture
async def server(data_file):
    """`python livecounter.py` on the test's data file (counters 1 … 9 at 0)."""
    server = await Server(data_file).start()
    yield server
    await server.stop()


async def test_httpx_sse_reads_the_value_first_and_every_change(client):
    base_url = str(client.make_url("")).rstrip("/")
    await post(base_url, "/counters/2/", times=5)
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        async with aconnect_sse(http, "GET", "/counters/2/") as source:
            events = source.aiter_sse()
            first = await asyncio.wait_for(anext(events), 5)
            in_window(first.retry)
            await post(base_url, "/counters/2/")
            second = await asyncio.wait_for(anext(events), 5)
            assert [(first.event, first.data), (second.event, second.data)] == SINGLE
            assert int(first.data) == 5  # what the user did

        async with aconnect_sse(http, "GET", MULTI_PATH) as source:
            events = source.aiter_sse()
            received = [await asyncio.wait_for(anext(events), 5) for _ in range(2)]
            in_window(received[0].retry)
            await post(base_url, "/counters/3/")
            received.append(await asyncio.wait_for(anext(events), 5))
            assert multi((event.event, event.data) for event in received) == MULTI
            assert received[0].json() == {"id": "2", "value": 6}


def sseclient_events(base_url, path, before, post_path):
    """sseclient-py over httpx's blocking client, as its README shows: the first `before` events,
    then the one after a POST to post_path."""
    with httpx.Client(base_url=base_url, timeout=5) as http, http.stream("GET", path, headers=SSE) as response:
        events = SSEClient(response.iter_bytes()).events()
        received = [next(events) for _ in range(before)]
        assert http.post(post_path).status_code == 200
        received.append(next(events))
    return received


async def test_sseclient_py_reads_the_value_first_and_every_change(server):
    await post(server.url, "/counters/2/", times=5)
    received = await asyncio.wait_for(
        asyncio.to_thread(sseclient_events, server.url, "/counters/2/", 1, "/counters/2/"), 15)
    assert [(event.event, event.data) for event in received] == SINGLE
    in_window(received[0].retry)  # sseclient-py keeps a retry field on the event whose block has it

    received = await asyncio.wait_for(
        asyncio.to_thread(sseclient_events, server.url, MULTI_PATH, 2, "/counters/3/"), 15)
    assert multi((event.event, event.data) for event in received) == MULTI
    in_window(received[0].retry)


async def test_aiohttp_sse_client_reads_the_value_first_and_every_change(client):
    # It keeps the retry it took to itself (no public attribute): the types and data are checked.
    base_url = str(client.make_url("")).rstrip("/")
    await post(base_url, "/counters/2/", times=5)
    async with aiohttp.ClientSession() as session:
        async with aiohttp_sse_client.EventSource(base_url + "/counters/2/", session=session) as source:
            first = await asyncio.wait_for(anext(source), 5)
            await post(base_url, "/counters/2/")
            second = await asyncio.wait_for(anext(source), 5)
            assert [(first.type, first.data), (second.type, second.data)] == SINGLE

        async with aiohttp_sse_client.EventSource(base_url + MULTI_PATH, session=session) as source:
            received = [await asyncio.wait_for(anext(source), 5) for _ in range(2)]
            await post(base_url, "/counters/3/")
            received.append(await asyncio.wait_for(anext(source), 5))
            assert multi((event.type, event.data) for event in received) == MULTI


# Prints each `message` or `counter` event as a JSON line, `count` of them, then closes; an error
# event is printed too, and ends it (the package would reconnect).
NODE_SCRIPT = """\
import { EventSource } from "eventsource";

const [url, count] = process.argv.slice(2);
let left = Number(count);
const source = new EventSource(url);
for (const type of ["message", "counter"]) {
  source.addEventListener(type, (event) => {
    console.log(JSON.stringify({ type: event.type, data: event.data }));
    if (--left === 0) source.close();
  });
}
source.addEventListener("error", (event) => {
  console.log(JSON.stringify({ type: "error", message: event.message ?? null, code: event.code ?? null }));
  source.close();
  process.exitCode = 1;
});
"""


@pytest.fixture(scope="session")
def node_eventsource(tmp_path_factory):
    """A script using the npm `eventsource` package, installed (once a session) beside it with npm,
    whose cache is in the same temp dir."""
    need("node", "nodejs")
    need("npm", "npm")
    directory = tmp_path_factory.mktemp("node-eventsource")
    installed = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--no-update-notifier", "--cache", str(directory / "npm-cache"),
         "--prefix", str(directory), EVENTSOURCE_PACKAGE],
        check=False, capture_output=True, text=True, timeout=180, cwd=directory)
    assert installed.returncode == 0, f"npm install {EVENTSOURCE_PACKAGE} failed:\n{installed.stderr}"
    version = json.loads((directory / "node_modules" / "eventsource" / "package.json").read_text())["version"]
    assert int(version.split(".")[0]) >= 3, f"eventsource {version}: the script uses v3's API"
    script = directory / "events.mjs"
    script.write_text(NODE_SCRIPT)
    return script


async def node_events(script: Path, base_url, path, before, post_path):
    """What the npm package's EventSource gets from path, as (type, data): its first `before`
    events, then the one after a POST to post_path."""
    count = before + 1
    node = await asyncio.create_subprocess_exec("node", str(script), base_url + path, str(count),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        received = []
        while len(received) < count:
            line = await asyncio.wait_for(node.stdout.readline(), 10)
            assert line, f"node ended: {(await node.stderr.read()).decode()}"
            event = json.loads(line)
            assert event["type"] != "error", event
            received.append((event["type"], event["data"]))
            if len(received) == before:
                await post(base_url, post_path)
        assert await asyncio.wait_for(node.wait(), 5) == 0  # closed by the script: nothing more came
        return received
    finally:
        if node.returncode is None:
            node.kill()
            await node.wait()


async def test_the_npm_eventsource_package_reads_the_value_first_and_every_change(node_eventsource, server):
    # It keeps the retry it took to itself (a private field): the types and data are checked.
    await post(server.url, "/counters/2/", times=5)
    assert await node_events(node_eventsource, server.url, "/counters/2/", 1, "/counters/2/") == SINGLE
    assert multi(await node_events(node_eventsource, server.url, MULTI_PATH, 2, "/counters/3/")) == MULTI


async def curl_blocks(base_url, path, before, post_path):
    """`curl -sN` of a stream: its first `before` blocks (up to each blank line), then the one after
    a POST to post_path."""
    curl = await asyncio.create_subprocess_exec("curl", "-sN", "-H", "Accept: text/event-stream", base_url + path,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        blocks = [await asyncio.wait_for(curl.stdout.readuntil(b"\n\n"), 5) for _ in range(before)]
        await post(base_url, post_path)
        blocks.append(await asyncio.wait_for(curl.stdout.readuntil(b"\n\n"), 5))
        return blocks
    finally:
        curl.kill()
        await curl.wait()


def retry_and_rest(block: bytes):
    """A stream's first block: the milliseconds of its retry field (in the window), and the rest."""
    match = re.fullmatch(rb"retry: (\d+)\n(.*)", block, re.DOTALL)
    assert match, f"the first block starts with the retry field: {block!r}"
    return in_window(match[1]), match[2]


async def test_curl_shows_the_retry_field_in_the_first_events_block(server):
    need("curl", "curl")
    await post(server.url, "/counters/2/", times=5)
    first, second = await curl_blocks(server.url, "/counters/2/", 1, "/counters/2/")
    assert retry_and_rest(first)[1] == b"event: message\ndata: 5\n\n"
    assert second == b"event: message\ndata: 6\n\n"

    first, second, third = await curl_blocks(server.url, MULTI_PATH, 2, "/counters/3/")
    assert retry_and_rest(first)[1] == b'event: counter\ndata: {"id": "2", "value": 6}\n\n'
    assert second == b'event: counter\ndata: {"id": "3", "value": 0}\n\n'
    assert third == b'event: counter\ndata: {"id": "3", "value": 1}\n\n'


CHROMIUM_EVENTS = """(path) => {
    window.seen = [];
    const source = window.source = new EventSource(path);
    for (const type of ["message", "counter"]) {
        source.addEventListener(type, (event) => window.seen.push([event.type, event.data]));
    }
}"""


async def chromium_events(page, base_url, path, before, post_path):
    """What `new EventSource(path)` on the page gets: its first `before` events, then the one after
    a POST to post_path; the source is closed after."""
    await page.evaluate(CHROMIUM_EVENTS, path)
    await page.wait_for_function(f"window.seen.length >= {before}", timeout=5_000)
    await post(base_url, post_path)
    await page.wait_for_function(f"window.seen.length >= {before + 1}", timeout=5_000)
    received = await page.evaluate("window.source.close(), window.seen")
    return [tuple(event) for event in received]


async def test_chromium_reads_the_value_first_and_every_change(browser, server):  # noqa: F811 (the fixture)
    # Chromium keeps the retry it took to itself: the types and data are checked.
    await post(server.url, "/counters/2/", times=5)
    errors = []
    page = await open_page(browser, server.url + "/", errors)  # the demo page, of the server's origin
    assert await chromium_events(page, server.url, "/counters/2/", 1, "/counters/2/") == SINGLE
    assert multi(await chromium_events(page, server.url, MULTI_PATH, 2, "/counters/3/")) == MULTI
    assert errors == []
