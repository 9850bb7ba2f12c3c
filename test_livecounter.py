"""Behaviour of livecounter as a client sees it, over real sockets.

Most tests run the app in the test's event loop behind pytest-aiohttp's real TCP server; the ones
about start-up, shutdown, restarts and crashes run `python livecounter.py` as a separate process.
"""

import asyncio
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import types
import sys
import time

import aiohttp
import pytest
from aiohttp import web

import livecounter
from livecounter import create_app

from tests.helpers import (
    HERE,
    SSE,
    Server,
    ZEROS,
    wait_until,
    first_chunk,
    frame,
    free_port,
    metric,
    open_fds,
    open_raw,
    read_frame,
    read_retry,
    read_until_value,
    recv_all,
    saved_values,
    recv_until,
    retry_of,
    rss_bytes,
    sse_request)


HOW_TO_MAKE = " (an admin PUT creates it; with --auto-create, a POST)"  # in every "unknown counter"


# --- values over plain HTTP ------------------------------------------------------------------------

async def test_get_answers_the_value_as_text_or_json(client):
    response = await client.get("/counters/2/")
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.read() == b"0\n"

    response = await client.get("/counters/2/", headers={"Accept": "application/json"})
    assert response.content_type == "application/json"
    assert await response.json() == {"id": "2", "value": 0}

    response = await client.get("/counters/2/", headers={"Accept": "text/html,application/xhtml+xml,*/*"})
    assert await response.read() == b"0\n"


async def test_post_increments_and_answers_the_new_value(client):
    for expected in (1, 2, 3):
        response = await client.post("/counters/5/", headers={"Content-Length": "0"})
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.read() == b"%d\n" % expected
    assert await (await client.get("/counters/5/")).read() == b"3\n"
    assert await (await client.get("/counters/4/")).read() == b"0\n"


async def test_only_reads_say_no_cache(client):
    # A value read must not be cached; the answer to a POST is never cached, so it says nothing.
    response = await client.post("/counters/5/")
    assert "Cache-Control" not in response.headers
    response = await client.get("/counters/5/")
    assert response.headers["Cache-Control"] == "no-cache"


async def test_the_path_without_trailing_slash_works_too(client):
    assert await (await client.post("/counters/7")).read() == b"1\n"
    assert await (await client.get("/counters/7")).read() == b"1\n"
    response = await client.get("/counters/7", headers=SSE)
    assert await read_frame(response) == frame(1)
    response.close()


async def test_head_answers_headers_only(client):
    response = await client.head("/counters/3/")
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.read() == b""

    response = await client.head("/counters/3/", headers=SSE)
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    assert await response.read() == b""


async def test_list_of_all_counters(client):
    await client.post("/counters/9/")
    response = await client.get("/counters/")
    assert response.content_type == "application/json"
    assert await response.json() == {str(i): (1 if i == 9 else 0) for i in range(1, 10)}
    assert await (await client.get("/counters")).json() == await response.json()


async def test_the_listing_in_pages_says_the_total_and_links_the_next(make_client, tmp_path):
    counters = {f"c{i}": i for i in range(25)}
    (tmp_path / "many.json").write_text(json.dumps(counters))
    client = await make_client(data_path=tmp_path / "many.json")
    response = await client.get("/counters/?limit=10")
    assert await response.json() == {f"c{i}": i for i in range(10)}
    assert response.headers["X-Total-Count"] == "25"
    assert response.headers["Link"] == '<?limit=10&after=c9>; rel="next"'
    assert "X-Total-Count" in response.headers["Access-Control-Expose-Headers"]
    response = await client.get("/counters/?limit=10&after=c19")
    assert await response.json() == {f"c{i}": i for i in range(20, 25)}
    assert "Link" not in response.headers  # the last page
    response = await client.get("/counters/?after=c23")  # limit: the largest page
    assert await response.json() == {"c24": 24}
    for query, reason in [("limit=0", b"limit must be a number from 1 to 1000\n"),
                          ("limit=1001", b"limit must be a number from 1 to 1000\n"),
                          ("limit=x", b"limit must be a number from 1 to 1000\n"),
                          ("limit=%C2%B2", b"limit must be a number from 1 to 1000\n"),  # a superscript 2
                          ("after=gone", b"after='gone' names no counter (deleted since?): list from the start\n")]:
        response = await client.get(f"/counters/?{query}")
        assert (response.status, await response.read()) == (400, reason), query


async def test_a_listing_larger_than_a_slice_is_whole_valid_json(make_client, tmp_path):
    counters = {f"c{i}": i for i in range(livecounter.LISTING_SLICE * 2 + 7)}
    (tmp_path / "many.json").write_text(json.dumps(counters))
    client = await make_client(data_path=tmp_path / "many.json")
    response = await client.get("/counters/")
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-cache"
    assert await response.json() == counters
    response = await client.head("/counters/")
    assert (response.status, response.headers["X-Total-Count"], await response.read()) == (200, str(len(counters)), b"")


async def test_a_million_counters_are_listed_without_stalling_other_requests(tmp_path):
    """The demo page lists the counters every 30 s: with a million of them (24 MB of JSON), the listing
    must not stall the server. /healthz is asked every 20 ms while a whole listing and 21 pages (20 at
    once) go out."""
    data_file = tmp_path / "counters.json"
    data_file.write_text(json.dumps({f"counter-{i}": i for i in range(1_000_000)}))
    server = await Server(data_file).start()
    latencies = []
    async with aiohttp.ClientSession() as session:
        async def listing():
            # curl reads the 24 MB, not this process: its loop must stay free to time /healthz.
            curl = await asyncio.create_subprocess_exec(
                "curl", "-sf", "-o", str(tmp_path / "listing.json"), f"{server.url}/counters/")
            assert await curl.wait() == 0
            # Twenty pages at once, deep in the listing: each searches a million ids.
            pages = await asyncio.gather(*(session.get(f"{server.url}/counters/?limit=10&after=counter-{n}")
                                           for n in range(990_000, 1_000_000, 500)))
            assert [len(await page.json()) for page in pages] == [10] * 20
            page = await session.get(f"{server.url}/counters/?limit=100&after=counter-999000")
            return await page.json()
        listed = asyncio.create_task(listing())
        while not listed.done():
            started = asyncio.get_running_loop().time()
            assert (await session.get(f"{server.url}/healthz")).status == 200
            latencies.append(asyncio.get_running_loop().time() - started)
            await asyncio.sleep(0.02)
        page = await listed
    await server.stop()
    # At most 100 ms, but for a hiccup of this shared machine now and then (never a listing's stall:
    # encoded in one go, it held every request up for 0.93 s).
    slow = [(index, round(latency, 3)) for index, latency in enumerate(latencies) if latency > 0.1]
    assert len(slow) <= len(latencies) // 20 and max(latencies) <= 0.3, slow
    assert len(latencies) >= 10, latencies  # asked all along the listing, not once before it
    listing = json.loads((tmp_path / "listing.json").read_text())
    assert len(listing) == 1_000_000 and listing["counter-999999"] == 999_999
    assert page == {f"counter-{i}": i for i in range(999_001, 999_101)}


# --- Server-Sent Events ----------------------------------------------------------------------------

async def test_event_stream_bytes_on_the_wire(client):
    sock = await open_raw(client, sse_request())
    received = await recv_until(sock, b"\n\n\r\n")
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    assert headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert headers["access-control-allow-origin"] == "*"
    # The retry field first, a block of its own (no event), in one chunk with the first frame.
    first_chunk(body, b"event: message\ndata: 0\n\n")

    await client.post("/counters/2/")
    received = await recv_until(sock, b"\n\n\r\n")
    assert received == b"18\r\nevent: message\ndata: 1\n\n\r\n"  # a change: the frame alone
    sock.close()


async def test_http10_stream_is_not_chunked(client):
    sock = await open_raw(client, sse_request(version="1.0"))
    received = await recv_until(sock, b"data: 0\n\n")
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower()
    retry, first = body.split(b"\n", 1)
    retry_of(retry + b"\n")
    assert first == frame(0)
    await client.post("/counters/2/")
    assert await recv_until(sock, b"\n\n") == frame(1)
    sock.close()


async def test_every_stream_draws_its_own_retry_in_the_window(client):
    # After a restart every client reconnects once its stream's retry has passed: drawn for each
    # stream, so that they don't all come back in the same instant.
    retries = set()
    for path in ("/counters/2/", "/counters/?ids=2,3") * 4:
        stream = await client.get(path, headers=SSE)
        retries.add(await read_retry(stream))  # 1000-5000 ms, the default window
        assert await read_frame(stream) == (frame(0) if "ids" not in path
                                             else b'event: counter\ndata: {"id": "2", "value": 0}\n\n')
        stream.close()
    assert len(retries) > 1, retries  # 8 draws of 4,001 values, all alike: not by chance


async def test_an_answer_held_by_pushpin_starts_with_its_own_retry(make_client):
    client = await make_client(grip_urls=("http://127.0.0.1:9/",), reconnect_window=livecounter.ReconnectWindow(1, 2))
    retries = set()
    for _ in range(4):
        response = await client.get("/counters/?ids=2", headers={**SSE, "Grip-Sig": "anything: no key is set"})
        assert response.headers["Grip-Hold"] == "stream"
        retry, first = (await response.read()).split(b"\n", 1)
        retries.add(retry_of(retry + b"\n", window_ms=(1000, 2000)))
        assert first == b'event: counter\ndata: {"id": "2", "value": 0}\n\n'
    assert len(retries) > 1, retries


async def test_every_listener_receives_every_change(client):
    listeners = [await client.get("/counters/4/", headers=SSE) for _ in range(3)]
    for listener in listeners:
        assert listener.headers["Content-Type"] == "text/event-stream"
        assert await read_frame(listener) == frame(0)
    other = await client.get("/counters/5/", headers=SSE)
    assert await read_frame(other) == frame(0)

    for value in (1, 2, 3):
        await client.post("/counters/4/")
        for listener in listeners:
            assert await read_frame(listener) == frame(value)
    await client.post("/counters/5/")
    assert await read_frame(other) == frame(1)  # counter 4's changes never reached it


async def test_a_late_listener_starts_from_the_current_value(client):
    for _ in range(5):
        await client.post("/counters/6/")
    listener = await client.get("/counters/6/", headers=SSE)
    assert await read_frame(listener) == frame(5)


async def test_a_burst_of_increments_ends_every_listener_on_the_final_value(client):
    listeners = [await client.get("/counters/1/", headers=SSE) for _ in range(20)]
    for listener in listeners:
        await read_frame(listener)
    await asyncio.gather(*(client.post("/counters/1/") for _ in range(500)))
    for listener in listeners:
        values = await read_until_value(listener, 500)
        assert values == sorted(set(values)), "values arrive in order, each once"


async def test_idle_streams_get_keepalive_comments(make_client):
    client = await make_client(keepalive_interval=0.2)
    listener = await client.get("/counters/2/", headers=SSE)
    assert await read_frame(listener) == frame(0)
    assert await read_frame(listener, timeout=2) == b":\n\n"
    assert await read_frame(listener, timeout=2) == b":\n\n"
    await client.post("/counters/2/")
    assert await read_until_value(listener, 1) == [1]


async def test_listeners_past_the_limit_get_503_with_retry_after(make_client):
    client = await make_client(max_listeners=2)
    first = await client.get("/counters/1/", headers=SSE)
    second = await client.get("/counters/2/", headers=SSE)
    refused = await client.get("/counters/3/", headers=SSE)
    assert refused.status == 503
    assert refused.headers["Retry-After"].isdigit()
    assert (await refused.text()).count("\n") == 1
    first.close()
    await asyncio.sleep(1)  # the sweep notices the closed stream
    again = await client.get("/counters/3/", headers=SSE)
    assert again.status == 200
    second.close()


async def test_a_multi_counter_stream_sends_each_counter_then_every_change(client):
    await client.post("/counters/3/")
    stream = await client.get("/counters/?ids=2,3,2", headers=SSE)
    assert stream.status == 200
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert await read_frame(stream) == b'event: counter\ndata: {"id": "2", "value": 0}\n\n'
    assert await read_frame(stream) == b'event: counter\ndata: {"id": "3", "value": 1}\n\n'
    await client.post("/counters/3/")
    await client.post("/counters/4/")  # not watched
    await client.post("/counters/2/")
    assert json.loads((await read_frame(stream)).split(b"data: ")[1]) == {"id": "3", "value": 2}
    assert json.loads((await read_frame(stream)).split(b"data: ")[1]) == {"id": "2", "value": 1}
    raw = await open_raw(client, sse_request("/counters/?ids=9"))
    payload = b'event: counter\ndata: {"id": "9", "value": 0}\n\n'
    first_chunk((await recv_until(raw, b"\n\n\r\n")).partition(b"\r\n\r\n")[2], payload)
    raw.close()


async def test_a_multi_counter_stream_refuses_bad_id_lists(make_client):
    client = await make_client()
    for query, status, reason in (
        ("?ids=1,nope", 404, f"unknown counter 'nope'{HOW_TO_MAKE}\n"),
        ("?ids=1,a b", 400, "invalid counter id 'a b'"),
        ("?ids=1,,2", 400, "invalid counter id ''"),
        ("", 400, "name the counters to stream: ?ids=1,2,3\n"),
        ("?ids=" + ",".join(f"c{i}" for i in range(101)), 400, "too many ids: one stream takes at most 100\n"),
    ):
        response = await client.get("/counters/" + query, headers=SSE)
        assert response.status == status, query
        assert reason in await response.text()
    client = await make_client(auto_create=True)
    stream = await client.get("/counters/?ids=" + ",".join(f"c{i}" for i in range(100)), headers=SSE)
    assert stream.status == 200  # unknown ids are fine under auto-create, and 100 is allowed
    assert await read_frame(stream) == b'event: counter\ndata: {"id": "c0", "value": 0}\n\n'


async def test_a_grip_sig_that_is_not_utf8_gets_a_direct_stream(make_client):
    # Bytes that aren't UTF-8 can't be Pushpin's signature: the stream is served here, like any other.
    client = await make_client(grip_urls=("http://127.0.0.1:9/",), grip_key="the key Pushpin signs Grip-Sig with")
    sock = await open_raw(client, b"GET /counters/2/ HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                                  b"Grip-Sig: \xff\xfe\r\n\r\n")
    head, _, body = (await recv_until(sock, b"\r\n\r\n")).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"grip-hold" not in head.lower()
    first_chunk(await recv_until(sock, b"\n\n\r\n", body), b"event: message\ndata: 0\n\n")
    await client.post("/counters/2/")
    assert await recv_until(sock, b"\n\n\r\n") == b"18\r\nevent: message\ndata: 1\n\n\r\n"
    sock.close()


# --- listeners that stop reading -------------------------------------------------------------------

async def test_a_frozen_listener_skips_values_and_catches_up_with_the_latest(client):
    frozen = await open_raw(client, sse_request(), rcvbuf=1024)  # never reads until the end
    healthy = await client.get("/counters/2/", headers=SSE)
    assert await read_frame(healthy) == frame(0)

    posts = 3000
    for value in range(1, posts + 1):
        await client.post("/counters/2/")
        if value % 500 == 0:  # the healthy listener keeps up all along
            assert (await read_until_value(healthy, value))[-1] == value

    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # thaw: a tiny window reads slowly
    received = await recv_until(frozen, b"data: %d\n" % posts, timeout=5)
    values = [int(line[6:]) for line in received.split(b"\n") if line.startswith(b"data: ")]
    assert values == sorted(values)
    assert len(values) < posts, "the frozen listener skipped values instead of buffering them all"
    frozen.close()


async def test_a_listener_stuck_past_the_timeout_is_disconnected(data_file):
    # The command line runs on uvloop (when installed), the in-process tests on asyncio's loop.
    server = await Server(data_file, "--stall-timeout", "1").start()
    stuck = await open_raw(server.port, sse_request(), rcvbuf=1024)
    async with aiohttp.ClientSession() as session:
        healthy = await session.get(f"{server.url}/counters/2/", headers=SSE)
        await read_frame(healthy)
        for _ in range(3000):
            await session.post(f"{server.url}/counters/2/")
        assert (await read_until_value(healthy, 3000))[-1] == 3000
        await asyncio.sleep(2.5)  # past the stall timeout and the next sweep

        loop = asyncio.get_running_loop()
        received = b""

        async def read_to_the_end():
            nonlocal received
            while data := await loop.sock_recv(stuck, 65536):
                received += data
        try:  # the server closed it: reading ends instead of waiting
            await asyncio.wait_for(read_to_the_end(), 5)
        except ConnectionResetError:
            pass  # aborted: what the server had queued is dropped
        assert b"data: 3000\n" not in received, "it was dropped, not caught up"
        stuck.close()
        await session.post(f"{server.url}/counters/2/")
        assert await read_until_value(healthy, 3001) == [3001]
    await server.stop()


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/counters/a%20b/", "/counters/" + "x" * 65 + "/", "/counters/%C3%A9/", "/counters/a:b/",
    "/counters/a%2Fb/",
])
async def test_an_invalid_id_gets_400_with_a_reason(client, path):
    for request_path in (path, path.rstrip("/")):
        for method, headers in (("GET", {}), ("GET", SSE), ("POST", {}), ("PUT", {}), ("DELETE", {}),
                                ("PATCH", {})):
            response = await client.request(method, request_path, headers=headers)
            assert response.status == 400, (method, request_path)
            assert await response.text() == ("invalid counter id: an id is 1-64 letters, digits, '.', '_' or '-', "
                                             "and not only dots\n")
            assert response.headers["Access-Control-Allow-Origin"] == "*"
        response = await client.options(request_path)  # a preflight passes: the request then gets its 400
        assert response.status == 204


async def test_an_id_of_only_dots_gets_400(make_client):
    # Browsers resolve "." and ".." in a path (aiohttp's client too, hence raw requests): no page could
    # reach such a counter. Auto-create and the admin token are on, so only the id refuses them.
    client = await make_client(auto_create=True, admin_token="s3cret")
    reason = b"invalid counter id: an id is 1-64 letters, digits, '.', '_' or '-', and not only dots\n"
    for path in ("/counters/./", "/counters/.", "/counters/../", "/counters/..", "/counters/.../", "/counters/..."):
        for method, headers in (("GET", ""), ("GET", "Accept: text/event-stream\r\n"), ("POST", ""),
                                ("PUT", "Authorization: Bearer s3cret\r\n"),
                                ("DELETE", "Authorization: Bearer s3cret\r\n")):
            body = b'{"value": 5}' if method == "PUT" else b""
            answer = await recv_all(await open_raw(client, (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode() + body))
            assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(reason), (method, path, answer)
    answer = await recv_all(await open_raw(
        client, b"GET /counters/?ids=1,.. HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(b"invalid counter id '..': " + reason[20:]), answer
    for valid in ("..a", "a..", ".a"):  # dots with anything else are ids like any other
        assert await (await client.post(f"/counters/{valid}/")).text() == "1\n"
    assert set(await (await client.get("/counters/")).json()) == set(ZEROS) | {"..a", "a..", ".a"}


async def test_an_unknown_counter_gets_404(client):
    for method, headers in (("GET", {}), ("GET", SSE), ("POST", {}), ("HEAD", {})):
        response = await client.request(method, "/counters/nope/", headers=headers)
        assert response.status == 404
    # It says how a counter is made: none exists until an admin makes it, or --auto-create lets a POST.
    assert await (await client.get("/counters/nope/")).text() == f"unknown counter 'nope'{HOW_TO_MAKE}\n"
    assert await (await client.get("/counters/" + "a" * 64 + "/")).text() == f"unknown counter '{'a' * 64}'{HOW_TO_MAKE}\n"


async def test_a_wrong_method_gets_405_with_allow(client):
    for method in ("PATCH", "PROPFIND"):
        response = await client.request(method, "/counters/1/")
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"}
    response = await client.post("/counters/")
    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "OPTIONS"}
    assert await response.text() == "POST is not allowed here: GET, HEAD, OPTIONS\n"


async def test_an_oversized_body_gets_413(client):
    response = await client.post("/counters/1/", data=b"x" * 5000)
    assert response.status == 413
    assert await response.text() == "request body too large: at most 1024 bytes (an increment needs none)\n"

    async def chunked_body():
        for _ in range(10):
            yield b"x" * 500
    response = await client.post("/counters/1/", data=chunked_body())
    assert response.status == 413

    response = await client.post("/counters/1/", data={"views": "1"})  # a small form is fine
    assert response.status == 200
    assert await (await client.get("/counters/1/")).text() == "1\n"


async def test_a_client_that_leaves_during_its_body_changes_nothing_and_logs_no_error(client, caplog):
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(b"POST /counters/1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")  # 2 of 5 bytes
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
    await asyncio.sleep(0.3)
    assert await (await client.get("/counters/1/")).text() == "0\n"
    assert "Error handling request" not in caplog.text and "Traceback" not in caplog.text, caplog.text


async def test_an_increment_past_the_largest_exact_integer_gets_409(make_client, tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"big": 2**53 - 2}))
    client = await make_client(data_path=path)
    assert await (await client.post("/counters/big/")).text() == f"{2**53 - 1}\n"
    response = await client.post("/counters/big/")
    assert response.status == 409
    assert await response.text() == f"counter 'big' is at its maximum, {2**53 - 1}\n"
    assert await (await client.get("/counters/big/")).text() == f"{2**53 - 1}\n"


# --- durable mode, auto-create, admin writes, abuse limits -------------------------------------------

async def test_durable_answers_only_once_the_increment_is_on_disk(make_client, data_file):
    client = await make_client(durable=True, save_interval=60)
    listener = await client.get("/counters/3/", headers=SSE)
    await read_frame(listener)
    for expected in (1, 2, 3):
        assert await (await client.post("/counters/3/")).text() == f"{expected}\n"
        assert saved_values(data_file)["3"] == expected  # on disk before the answer
    answers = await asyncio.gather(*(client.post("/counters/3/") for _ in range(200)))
    assert sorted([int(await answer.text()) for answer in answers]) == list(range(4, 204))
    assert saved_values(data_file)["3"] == 203
    assert (await read_until_value(listener, 203))[-1] == 203


@pytest.mark.parametrize("create", ["auto-create", "PUT"])
async def test_a_durable_stream_starts_from_the_disk_for_a_counter_not_saved_yet(make_client, monkeypatch, create):
    # A counter made while a save is in flight isn't on disk: its stream must not start from its value
    # in memory (the save in flight then announces an older one, and the stream goes backwards).
    gate = threading.Event()
    append = livecounter.Journal._append

    def held_append(journal, line):
        gate.wait(10)
        append(journal, line)
    monkeypatch.setattr(livecounter.Journal, "_append", held_append)
    client = await make_client(durable=True, auto_create=create == "auto-create", admin_token="s3cret")
    first = asyncio.ensure_future(client.post("/counters/new/") if create == "auto-create" else
                                  client.put("/counters/new/", json={"value": 5}, headers={"Authorization": "Bearer s3cret"}))
    await asyncio.sleep(0.2)  # its save is in flight, held
    second = asyncio.ensure_future(client.post("/counters/new/"))
    await asyncio.sleep(0.2)  # waiting for the next save
    stream = await client.get("/counters/new/", headers=SSE)
    if create == "PUT":  # not on disk: no such counter yet, for a stream
        assert stream.status == 404
    else:
        assert await read_frame(stream) == frame(0)
    gate.set()
    assert (await first).status == 200 and (await second).status == 200
    if create == "auto-create":
        assert await read_until_value(stream, 2) in ([1, 2], [2])
    stream.close()


async def test_auto_create_makes_counters_up_to_the_limit(make_client, data_file):
    client = await make_client(auto_create=True, max_counters=11, save_interval=0.1)
    assert await (await client.get("/counters/new-page/")).text() == "0\n"  # reads as 0, not created
    listener = await client.get("/counters/new-page/", headers=SSE)
    assert await read_frame(listener) == frame(0)
    assert "new-page" not in await (await client.get("/counters/")).json()

    assert await (await client.post("/counters/new-page/")).text() == "1\n"
    assert await read_frame(listener) == frame(1)
    assert await (await client.post("/counters/other/")).text() == "1\n"
    refused = await client.post("/counters/one-too-many/")
    assert refused.status == 403
    assert await refused.text() == "counter 'one-too-many' not created: the limit of 11 counters is reached\n"
    counters = await (await client.get("/counters/")).json()
    assert len(counters) == 11 and "one-too-many" not in counters
    assert await (await client.post("/counters/new-page/")).text() == "2\n"  # existing ones still count
    assert (await client.post("/counters/bad id/")).status == 400
    await asyncio.sleep(0.5)
    assert saved_values(data_file)["new-page"] == 2


async def test_without_auto_create_a_post_to_an_unknown_counter_is_404(client):
    response = await client.post("/counters/new-page/")
    assert response.status == 404
    assert "new-page" not in await (await client.get("/counters/")).json()


async def test_admin_writes_need_the_token(make_client):
    closed = await make_client()
    response = await closed.put("/counters/1/", json={"value": 5}, headers={"Authorization": "Bearer x"})
    assert response.status == 403
    assert "LIVECOUNTER_ADMIN_TOKEN" in await response.text()

    client = await make_client(admin_token="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                    {"Authorization": "Bearer"}):
        for method in ("PUT", "DELETE"):
            response = await client.request(method, "/counters/1/", json={"value": 5}, headers=headers)
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await (await client.get("/counters/1/")).text() == "0\n"


async def test_an_authorization_that_is_not_utf8_gets_401(make_client):
    client = await make_client(admin_token="s3cret")
    for method in ("PUT", "DELETE"):
        answer = await recv_all(await open_raw(client, f"{method} /counters/1/ HTTP/1.1\r\nHost: x\r\n".encode()
                                               + b"Authorization: Bearer \xff\xfe\r\nContent-Length: 12\r\n"
                                                 b'Connection: close\r\n\r\n{"value": 5}'))
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 401 "), answer
        assert b"\r\naccess-control-allow-origin: *\r\n" in head + b"\r\n"
        assert b"\r\nwww-authenticate: bearer" in head
    assert await (await client.get("/counters/1/")).text() == "0\n"


async def test_a_put_body_nested_too_deep_gets_400(make_client):
    client = await make_client(admin_token="s3cret")
    response = await client.put("/counters/2/", data=b"[" * 1000, headers={"Authorization": "Bearer s3cret"})
    assert response.status == 400
    assert await response.text() == 'the body must be JSON like {"value": 27}\n'


async def test_admin_sets_creates_and_deletes_counters(make_client, data_file):
    client = await make_client(admin_token="s3cret", save_interval=0.1)
    admin = {"Authorization": "Bearer s3cret"}
    listener = await client.get("/counters/2/", headers=SSE)
    assert await read_frame(listener) == frame(0)

    response = await client.put("/counters/2/", json={"value": 1000}, headers=admin)
    assert response.status == 200 and await response.text() == "1000\n"
    assert await read_frame(listener) == frame(1000)  # listeners see a set value like any change
    assert await (await client.put("/counters/fresh/", json={"value": -7}, headers=admin)).text() == "-7\n"
    assert await (await client.post("/counters/fresh/")).text() == "-6\n"

    for body in (b"", b"{", b"[]", b'{"value": "3"}', b'{"value": 1.5}', b'{"value": true}',
                 b'{"value": 9007199254740992}', b'{"count": 3}'):
        response = await client.put("/counters/2/", data=body, headers=admin)
        assert response.status == 400, body
    assert await (await client.get("/counters/2/")).text() == "1000\n"

    response = await client.delete("/counters/2/", headers=admin)
    assert response.status == 204
    assert await asyncio.wait_for(listener.content.read(), 5) == b""  # its stream ended
    assert (await client.get("/counters/2/")).status == 404
    assert (await client.delete("/counters/2/", headers=admin)).status == 404
    await asyncio.sleep(0.5)
    saved = saved_values(data_file)
    assert "2" not in saved and saved["fresh"] == -6


async def test_post_rate_limits_each_client(make_client):
    client = await make_client(post_rate=2, trust_proxy=True)
    answers = [await client.post("/counters/1/", headers={"X-Forwarded-For": "203.0.113.5"})
               for _ in range(5)]
    assert [answer.status for answer in answers] == [200, 200, 200, 200, 429]  # a burst of 2 x 2
    assert int(answers[-1].headers["Retry-After"]) >= 1
    assert await answers[-1].text() == "too many increments of this counter from this address\n"
    other = await client.post("/counters/1/", headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9"})
    assert other.status == 200  # another client has its own bucket
    await asyncio.sleep(0.6)
    assert (await client.post("/counters/1/", headers={"X-Forwarded-For": "203.0.113.5"})).status == 200
    assert await (await client.get("/counters/1/")).text() == "6\n"


async def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(make_client):
    client = await make_client(post_rate=1)
    statuses = [(await client.post("/counters/1/", headers={"X-Forwarded-For": f"10.0.0.{i}"})).status
                for i in range(4)]
    assert statuses.count(429) == 2  # one bucket for the real address, whatever the header says


async def test_post_rate_counts_each_counter_of_a_client_apart(make_client):
    # A page with three counted embed.js ids makes three increments at once: none is refused.
    client = await make_client(post_rate=1)  # bursts of 2
    for _ in range(2):
        answers = [await client.post(f"/counters/{counter_id}/") for counter_id in (1, 2, 3)]
        assert [answer.status for answer in answers] == [200, 200, 200]
    past_the_burst = await client.post("/counters/2/")
    assert past_the_burst.status == 429 and int(past_the_burst.headers["Retry-After"]) >= 1
    assert (await client.post("/counters/4/")).status == 200  # the other counters' buckets are their own
    assert json.loads(await (await client.get("/counters/")).text())["2"] == 2


def test_the_rate_limiter_forgets_the_least_recently_seen_buckets(monkeypatch):
    # Each request forgets at most one bucket, not a scan of them all, and a client that keeps going
    # is the most recently seen: it keeps its bucket, and its limit.
    from livecounter import RateLimiter
    monkeypatch.setattr(RateLimiter, "MAX_BUCKETS", 3)
    limiter = RateLimiter(rate=0.01, burst=2)
    waits = []
    for i in range(20):
        assert limiter.retry_after(("2001:db8::1", f"page-{i}")) == 0  # a new bucket has its burst
        waits.append(limiter.retry_after(("2001:db8::ffff", "1")))
        assert len(limiter._buckets) <= 3
    assert waits[:2] == [0, 0] and all(wait > 0 for wait in waits[2:]), waits


async def test_streams_per_client_are_capped(make_client):
    client = await make_client(max_listeners_per_ip=2)
    streams = [await client.get("/counters/1/", headers=SSE) for _ in range(2)]
    refused = await client.get("/counters/1/", headers=SSE)
    assert refused.status == 429
    assert refused.headers["Retry-After"].isdigit()
    assert "too many streams from 127.0.0.1" in await refused.text()
    assert (await client.get("/counters/1/")).status == 200  # plain reads are not streams
    for stream in streams:
        stream.close()


# --- CORS ------------------------------------------------------------------------------------------

async def test_every_response_allows_any_origin_by_default(client):
    origin = {"Origin": "https://blog.example"}
    responses = [
        await client.get("/counters/1/", headers=origin),
        await client.post("/counters/1/", headers=origin),
        await client.get("/counters/", headers=origin),
        await client.get("/counters/nope/", headers=origin),
        await client.get("/counters/a b/", headers=origin),
        await client.patch("/counters/1/", headers=origin),
        await client.post("/counters/", headers=origin),
        await client.post("/counters/1/", data=b"x" * 5000, headers=origin),
        await client.delete("/counters/1/", headers=origin),
        await client.get("/counters/?ids=1,nope", headers={**origin, **SSE}),
        await client.get("/no/such/path", headers=origin),
        await client.head("/counters/1/", headers={**origin, **SSE}),
        await client.get("/healthz", headers=origin),
        await client.get("/metrics", headers=origin),
        await client.get("/", headers=origin),
        await client.get("/counters/1/", headers={**origin, **SSE}),
    ]
    for response in responses:
        assert response.headers["Access-Control-Allow-Origin"] == "*", response


async def test_an_unknown_path_gets_404_with_a_reason(client):
    for method in ("GET", "POST", "OPTIONS"):
        response = await client.request(method, "/nope/")
        assert response.status == 404
        assert await response.text() == "no such path: the counters are at counters/\n"


async def test_preflight_is_answered(client):
    response = await client.options("/counters/1/", headers={
        "Origin": "https://blog.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-requested-with",
    })
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "DELETE" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "content-type, x-requested-with"


async def test_preflight_is_answered_on_every_path(client):
    for path in ("/", "/embed.js", "/embed.js/", "/metrics", "/metrics/", "/healthz", "/healthz/",
                 "/counters", "/counters/", "/counters/1", "/counters/1/"):
        response = await client.options(path, headers={"Origin": "https://blog.example",
                                                       "Access-Control-Request-Method": "GET"})
        assert response.status == 204, path
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "GET" in response.headers["Access-Control-Allow-Methods"]


async def test_retry_after_is_readable_from_other_origins(make_client):
    client = await make_client(post_rate=1, max_listeners=1)
    stream = await client.get("/counters/1/", headers=SSE)
    refusals = [await client.get("/counters/2/", headers=SSE)]  # past --max-listeners
    refusals += [await client.post("/counters/1/") for _ in range(3)][2:]  # past the burst of 2
    assert [refusal.status for refusal in refusals] == [503, 429]
    for refusal in refusals:
        assert refusal.headers["Retry-After"].isdigit()
        assert refusal.headers["Access-Control-Expose-Headers"] == "Retry-After"
    stream.close()


async def test_cors_origin_restricts(make_client):
    client = await make_client(cors_origin="https://mine.example")
    origin = {"Origin": "https://other.example"}
    for response in (await client.post("/counters/1/", headers=origin),
                     await client.get("/counters/nope/", headers=origin),
                     await client.get("/counters/1/", headers={**origin, **SSE})):
        assert response.headers["Access-Control-Allow-Origin"] == "https://mine.example"


# --- pages and operator endpoints -------------------------------------------------------------------

async def test_browsers_get_the_demo_page_and_others_a_pointer(client):
    page = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.content_type == "text/html"
    html = await page.text()
    assert "<title>livecounter</title>" in html and "EventSource" in html
    assert "http" not in html.replace("http-equiv", ""), "no external resource: it works offline"
    text = await client.get("/")
    assert text.content_type == "text/plain"
    assert "counters/" in await text.text()


async def test_embed_js_is_served_to_any_origin(client):
    response = await client.get("/embed.js", headers={"Origin": "https://blog.example"})
    assert response.content_type == "text/javascript"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "data-livecounter" in await response.text()


def node() -> str:
    """Node.js, to run the pages' JavaScript: skipped without it, failed under CI (.ci/run installs it)."""
    path = shutil.which("node")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is missing: .ci/run installs it (apt-get install nodejs)")
        pytest.skip("needs node: apt-get install nodejs")
    return path


# Ids on either side of each part of the rule, and characters a regex dialect might read differently:
# "$" before a final newline (Python's), a "/" in the route's lookahead, non-ASCII letters and digits.
TRICKY_IDS = ["1", "a", "A-Z_0.9", "x" * 64, "x" * 65, "-", "_", "", ".", "..", "...", "." * 64, "." * 65,
              ".a", "a.", "..a", "a..", "._", "a/b", "/", "./", "../", "..\n", ".\n", "a\n", "\n", "a b",
              "a%2F", "é", "\u212a", "\uff41", "\u0661", "a\u2028", "a\x00"]


async def test_embed_js_takes_the_ids_the_server_takes(client):
    script = await (await client.get("/embed.js")).text()
    valid = re.search(r"^ *var VALID = (.+?);  //", script, re.M).group(1)
    tested = subprocess.run(
        [node(), "-e", f"const VALID = {valid};\n"
                       "const ids = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
                       "process.stdout.write(JSON.stringify(ids.map((id) => VALID.test(id))));"],
        input=json.dumps(TRICKY_IDS), capture_output=True, text=True, timeout=30)
    assert tested.returncode == 0, tested.stderr
    taken_by_embed_js = dict(zip(TRICKY_IDS, json.loads(tested.stdout)))
    taken_by_server = {counter_id: bool(livecounter.COUNTER_ID.fullmatch(counter_id)) for counter_id in TRICKY_IDS}
    assert taken_by_embed_js == taken_by_server
    assert taken_by_server["x" * 64] and not taken_by_server[".."]  # the rule as the README states it


async def test_the_pages_scripts_are_valid_javascript(client, tmp_path):
    page = await (await client.get("/", headers={"Accept": "text/html"})).text()
    inline = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(inline) == 1
    scripts = {"demo page": inline[0], "embed.js": await (await client.get("/embed.js")).text()}
    # Each as a classic script and as a module (embed.js is both): node reads .mjs as a module,
    # which also refuses what its CommonJS wrapper would let pass (a "return" outside a function).
    for name, script in scripts.items():
        for extension in ("cjs", "mjs"):
            path = tmp_path / f"script.{extension}"
            path.write_text(script)
            checked = subprocess.run([node(), "--check", str(path)], capture_output=True, text=True, timeout=30)
            assert checked.returncode == 0, f"{name} as .{extension}: {checked.stderr}"


async def test_pages_and_operator_endpoints_work_with_a_trailing_slash_too(client):
    for path in ("/healthz", "/metrics", "/embed.js"):
        plain, slashed = await client.get(path), await client.get(path + "/")
        assert slashed.status == 200, path
        assert slashed.content_type == plain.content_type
    assert await (await client.get("/healthz/")).text() == "ok\n"


async def test_metrics_in_prometheus_text_format(make_client):
    from prometheus_client.parser import text_string_to_metric_families

    client = await make_client(save_interval=0.05)
    listener = await client.get("/counters/1/", headers=SSE)
    await read_frame(listener)
    for _ in range(3):
        await client.post("/counters/1/")
    await read_until_value(listener, 3)
    await asyncio.sleep(0.3)
    response = await client.get("/metrics")
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {sample.name: sample.value
               for family in text_string_to_metric_families(await response.text())
               for sample in family.samples}
    assert samples["livecounter_listeners"] == 1
    assert samples["livecounter_counters"] == 9
    assert samples["livecounter_increments_total"] == 3
    assert 1 <= samples["livecounter_broadcasts_total"] <= 3
    assert samples["livecounter_broadcasts_total"] + samples["livecounter_coalesced_updates_total"] >= 3
    assert samples["livecounter_saves_total"] >= 1
    assert samples["livecounter_save_errors_total"] == 0
    assert samples["livecounter_last_save_duration_seconds"] > 0
    assert samples["livecounter_last_save_success_timestamp_seconds"] > 1.7e9
    assert samples["livecounter_saves_failing"] == 0


async def test_the_last_save_timestamp_is_the_start_until_a_save(make_client):
    """An idle server never saves: the age of its data file's last save must not look like an outage."""
    started = time.time()
    client = await make_client()
    response = await client.get("/metrics")
    timestamp = next(float(line.split()[1]) for line in (await response.text()).splitlines()
                     if line.startswith("livecounter_last_save_success_timestamp_seconds "))
    assert started - 1 <= timestamp <= time.time()


# --- who's watching, and badges ---------------------------------------------------------------------

async def watchers_of(client, counter_id="2"):
    response = await client.get(f"/counters/{counter_id}/watchers/")
    assert response.status == 200, await response.text()
    return int(await response.text())


async def test_watchers_are_the_open_streams_that_carry_a_counter(client):
    assert await watchers_of(client) == 0
    single = await client.get("/counters/2/", headers=SSE)
    await read_frame(single)
    await wait_until(lambda: watchers_of(client), message="a single stream counts")
    multi = await client.get("/counters/?ids=2,3", headers=SSE)
    await read_frame(multi)
    count_stream = await client.get("/counters/2/watchers/", headers=SSE)  # doesn't count
    await read_frame(count_stream)
    await wait_until(lambda: watchers_of(client, "3"))
    assert (await watchers_of(client), await watchers_of(client, "3")) == (2, 1)
    response = await client.get("/counters/2/watchers", headers={"Accept": "application/json"})
    assert (await response.json(), response.headers["Cache-Control"]) == ({"id": "2", "watchers": 2}, "no-cache")
    single.close()
    await wait_until(lambda: _equals(watchers_of(client), 1), message="a stream that closed is uncounted")
    multi.close()
    await wait_until(lambda: _equals(watchers_of(client, "3"), 0))
    assert await watchers_of(client) == 0
    count_stream.close()


async def _equals(awaitable, expected):
    return await awaitable == expected


async def test_the_watchers_resource_answers_like_a_counter(make_client):
    client = await make_client()
    assert (await client.get("/counters/nope/watchers/")).status == 404
    for method in ("POST", "PUT", "DELETE"):
        response = await client.request(method, "/counters/2/watchers/")
        assert response.status == 405, method
        assert response.headers["Allow"] == "GET,HEAD,OPTIONS"
    response = await client.head("/counters/2/watchers/")
    assert (response.status, await response.read()) == (200, b"")
    response = await client.options("/counters/2/watchers/")
    assert response.status == 204
    assert (await client.get("/counters/bad%20id/watchers/")).status == 400
    auto = await make_client(auto_create=True)
    assert (await auto.get("/counters/anything/watchers/")).status == 200
    assert await watchers_of(auto, "anything") == 0


async def test_a_stream_of_the_watcher_count_gets_each_change_at_most_twice_a_second(data_file):
    """1,000 streams arrive, then leave: the count's stream gets a few frames, not 1,000, at most one
    every half second, and the last one is exact."""
    server = await Server(data_file, "--max-listeners-per-ip", "2000").start()
    counts = await client_of_counts(server.port)
    arrivals = [await open_raw(server.port, sse_request("/counters/2/")) for _ in range(1000)]
    await wait_until(lambda: counts.values[-1] == 1000, timeout=10, message="the final count goes out")
    for sock in arrivals[:500]:
        sock.close()
    await wait_until(lambda: counts.values[-1] == 500, timeout=5)
    for sock in arrivals[500:]:
        sock.close()
    await wait_until(lambda: counts.values[-1] == 0, timeout=5)
    await asyncio.sleep(0.6)  # nothing more comes
    counts.reader.cancel()
    assert counts.values[0] == 0
    assert 3 <= len(counts.values) <= 12, counts.values  # not 2,000
    gaps = [later - earlier for earlier, later in zip(counts.times[1:], counts.times[2:])]
    assert all(gap > 0.45 for gap in gaps), gaps  # after the first, one frame per half second at most
    await server.stop()


async def client_of_counts(port, path="/counters/2/watchers/"):
    """A stream of a watcher count, read as it comes: .values and the .times they arrived."""
    sock = await open_raw(port, sse_request(path))
    counts = types.SimpleNamespace(values=[], times=[])
    loop = asyncio.get_running_loop()

    async def read():
        received = b""
        while data := await loop.sock_recv(sock, 65536):
            received += data
            for value in re.findall(rb"data: (\d+)\n\n", received):
                counts.values.append(int(value))
                counts.times.append(loop.time())
            received = received.rpartition(b"\n\n")[2]
    counts.reader = asyncio.create_task(read())
    await wait_until(lambda: counts.values, message="the first count")
    return counts


async def test_frozen_vanished_and_deleted_streams_in_the_count(make_client):
    client = await make_client(admin_token="secret")
    frozen = await open_raw(client, sse_request("/counters/2/"), rcvbuf=2048)  # never read
    vanished = await open_raw(client, sse_request("/counters/2/"))
    count_stream = await client.get("/counters/2/watchers/", headers=SSE)
    await wait_until(lambda: _equals(watchers_of(client), 2), message="frozen or not, an open stream counts")
    vanished.close()
    await wait_until(lambda: _equals(watchers_of(client), 1), message="a client that vanished is uncounted")
    response = await client.delete("/counters/2/", headers={"Authorization": "Bearer secret"})
    assert response.status == 204
    assert await asyncio.wait_for(count_stream.content.read(), 5)  # the count's stream ends too
    assert count_stream.content.at_eof()
    assert (await client.get("/counters/2/watchers/")).status == 404
    frozen.close()


async def test_a_multi_stream_with_watchers_sends_each_count_and_counts_itself(client):
    sock = await open_raw(client, sse_request("/counters/?ids=2,3&watchers=1"))
    received = await recv_until(sock, b'{"id": "3", "watchers": 1}\n\n')
    body = received.partition(b"\r\n\r\n")[2]
    first_chunk(body, b'event: counter\ndata: {"id": "2", "value": 0}\n\n'
                      b'event: counter\ndata: {"id": "3", "value": 0}\n\n'
                      b'event: watchers\ndata: {"id": "2", "watchers": 1}\n\n'
                      b'event: watchers\ndata: {"id": "3", "watchers": 1}\n\n')
    other = await client.get("/counters/2/", headers=SSE)
    await read_frame(other)
    received = await recv_until(sock, b"\n\n\r\n")
    assert received.split(b"\r\n")[1] == b'event: watchers\ndata: {"id": "2", "watchers": 2}\n\n', received
    await client.post("/counters/3/")
    received = await recv_until(sock, b"\n\n\r\n")
    assert received.split(b"\r\n")[1] == b'event: counter\ndata: {"id": "3", "value": 1}\n\n', received
    plain = await client.get("/counters/?ids=2,3", headers=SSE)  # without watchers=1: as before
    await read_retry(plain)
    assert await read_frame(plain) == b'event: counter\ndata: {"id": "2", "value": 0}\n\n'
    assert await read_frame(plain) == b'event: counter\ndata: {"id": "3", "value": 1}\n\n'
    response = await client.get("/counters/?ids=2&watchers=yes", headers=SSE)
    assert (response.status, await response.text()) == (400, "watchers must be 1 (send the counters' watcher "
                                                              "counts too) or 0\n")
    sock.close()


async def test_a_watcher_count_settles_whenever_a_stream_leaves_as_another_arrives(make_client):
    """Four streams on a counter; a multi stream with watchers=1 opens and one of the four leaves a
    moment later, at a different moment each round (while the new stream's first frames go out, or
    just after). The multi stream's last count is the real one within the coalescing interval. (On
    6b9bdae it stayed on 5 when the departure came while the new stream was being taken over.)"""
    client = await make_client(max_listeners_per_ip=10_000)
    for round_, delay in enumerate([0, 0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4] * 2):
        counter = str(round_ % 9 + 1)
        four = [await client.get(f"/counters/{counter}/", headers=SSE) for _ in range(4)]
        for stream in four:
            await read_frame(stream)
        await asyncio.sleep(0.6)  # the count rests: the next change of it is calm
        multi = await client.get(f"/counters/?ids={counter}&watchers=1", headers=SSE)
        counts = []

        async def read_counts():
            while True:
                block = await multi.content.readuntil(b"\n\n")
                if found := re.search(rb'"watchers": (\d+)', block):
                    counts.append(int(found[1]))
        reading = asyncio.create_task(read_counts())
        await asyncio.sleep(delay)
        four.pop().close()
        await wait_until(lambda: counts and counts[-1] == 4, timeout=1.5,
                         message=f"round {round_} (departure after {delay} s): the count settles on 4, not {counts}")
        assert await (await client.get(f"/counters/{counter}/watchers/")).text() == "4\n"
        reading.cancel()
        multi.close()
        for stream in four:
            stream.close()
        await wait_until(lambda: _watchers_are(client, counter, 0))


async def _watchers_are(client, counter, count):
    return await (await client.get(f"/counters/{counter}/watchers/")).text() == f"{count}\n"


async def test_a_counter_deleted_and_made_again_counts_its_watchers_from_0(make_client):
    client = await make_client(admin_token="secret")
    admin = {"Authorization": "Bearer secret"}
    stream = await client.get("/counters/2/", headers=SSE)
    await read_frame(stream)
    await wait_until(lambda: _equals(watchers_of(client), 1))
    await asyncio.sleep(0.6)  # the count went out
    assert (await client.delete("/counters/2/", headers=admin)).status == 204
    assert (await client.put("/counters/2/", json={"value": 0}, headers=admin)).status == 200
    count_stream = await client.get("/counters/2/watchers/", headers=SSE)
    assert await read_frame(count_stream) == frame(0)
    again = await client.get("/counters/2/", headers=SSE)
    await read_frame(again)
    assert await read_until_value(count_stream, 1) == [1]  # not held back as "1 was sent already"
    again.close()


async def test_garbage_from_a_pushpin_stats_socket_is_logged_and_reading_goes_on(make_client, caplog):
    """A stats socket that sends what no Pushpin would (a PUB socket of the test's own: only malformed
    reports need it; tests/test_pushpin.py reads a real Pushpin's)."""
    import zmq
    import zmq.asyncio
    context = zmq.asyncio.Context()
    publisher = context.socket(zmq.PUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    client = await make_client(grip_urls=("http://127.0.0.1:9/",), grip_stats=(f"tcp://127.0.0.1:{port}",))

    def report(subscribers, ttl=b"60"):
        return b'sub J{"channel": "counter-2", "from": "p1", "subscribers": %s, "ttl": %s}' % (subscribers, ttl)
    try:
        async def counted(expected, message):
            await publisher.send(message)
            return await watchers_of(client) == expected
        await wait_until(lambda: counted(5, report(b"5")), message="a report is read")  # PUB drops until joined
        for garbage in (b"sub Jnot json", report(b"-3"), report(b"1e999"), report(b"2", b"1e999"),
                        b"sub T" + b"[" * 5000, b"sub J" + b"[" * 100_000 + b"]" * 100_000):
            await publisher.send(garbage)
        await wait_until(lambda: counted(7, report(b"7")), message="reading went on")
    finally:
        publisher.close(linger=0)
        context.term()
    assert len([r for r in caplog.records if "stats message this can't read" in r.getMessage()]) == 1


async def test_a_shutdown_ends_the_streams_of_watcher_counts(data_file):
    server = await Server(data_file).start()
    sock = await open_raw(server.port, sse_request("/counters/2/watchers/"))
    await recv_until(sock, b"data: 0\n\n")
    assert await server.stop() == 0
    assert (await recv_all(sock)).endswith(b"0\r\n\r\n")


def parsed_badge(svg: bytes):
    import xml.etree.ElementTree as ElementTree
    root = ElementTree.fromstring(svg)
    texts = [element.text for element in root.iter("{http://www.w3.org/2000/svg}text")]
    return root, texts


async def test_a_badge_shows_the_value_and_never_counts(make_client):
    client = await make_client(admin_token="secret")
    await client.put("/counters/2/", json={"value": 1234567}, headers={"Authorization": "Bearer secret"})
    for _ in range(3):
        response = await client.get("/counters/2/badge.svg")
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/svg+xml"
    assert response.headers["Cache-Control"] == "no-cache, max-age=0"
    assert response.headers["Expires"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    root, texts = parsed_badge(await response.read())
    assert texts == ["views", "views", "1,234,567", "1,234,567"]
    assert await (await client.get("/counters/2/")).text() == "1234567\n"  # seeing it counted nothing

    response = await client.get("/counters/2/badge.svg", params={"label": 'a <"&"> b', "style": "flat-square"})
    root, texts = parsed_badge(await response.read())
    assert texts[0] == 'a <"&"> b' and root.find("{http://www.w3.org/2000/svg}title").text == 'a <"&"> b: 1,234,567'
    assert 'rx="0"' in (await response.text())
    for query, reason in [({"label": "x" * 41}, "label must be 1 to 40 printable characters\n"),
                          ({"label": ""}, "label must be 1 to 40 printable characters\n"),
                          ({"label": "a\x01"}, "label must be 1 to 40 printable characters\n"),
                          ({"style": "3d"}, "style must be one of flat, flat-square\n")]:
        response = await client.get("/counters/2/badge.svg", params=query)
        assert (response.status, await response.text()) == (400, reason), query
    assert (await client.get("/counters/nope/badge.svg")).status == 404
    assert (await client.post("/counters/2/badge.svg")).status == 405
    response = await client.head("/counters/2/badge.svg")
    assert (response.status, await response.read()) == (200, b"")


async def test_badges_work_with_a_trailing_slash_too_and_an_unknown_counter_is_a_badge(client):
    for path in ("/counters/1/badge.svg/", "/counters/1/watchers/badge.svg/"):
        response = await client.get(path)
        assert (response.status, response.headers["Content-Type"]) == (200, "image/svg+xml"), path
    for path in ("/counters/nope/badge.svg", "/counters/nope/watchers/badge.svg/"):
        response = await client.get(path)  # an image that says so, not a broken one (as shields.io)
        assert (response.status, response.headers["Content-Type"]) == (404, "image/svg+xml"), path
        assert parsed_badge(await response.read())[1][2] == "not found"
    assert (await client.get("/counters/a b/badge.svg/")).status == 400


async def test_a_badge_of_the_watcher_count(client):
    stream = await client.get("/counters/2/", headers=SSE)
    await read_frame(stream)
    await wait_until(lambda: _equals(watchers_of(client), 1))
    response = await client.get("/counters/2/watchers/badge.svg")
    assert response.headers["Content-Type"] == "image/svg+xml"
    assert parsed_badge(await response.read())[1] == ["watching", "watching", "1", "1"]
    stream.close()


# --- embedding -------------------------------------------------------------------------------------

async def test_it_mounts_as_a_sub_app(aiohttp_client, data_file):
    async def own_page(request):
        return web.Response(text="mine\n")

    parent = web.Application()
    parent.add_subapp("/live/", create_app(data_path=data_file))
    parent.router.add_get("/mine", own_page)
    client = await aiohttp_client(parent)
    assert await (await client.get("/mine")).text() == "mine\n"  # livecounter's catch-all stays in /live/
    assert await (await client.get("/live/nope")).text() == "no such path: the counters are at counters/\n"
    listener = await client.get("/live/counters/3/", headers=SSE)
    assert await read_frame(listener) == frame(0)
    assert await (await client.post("/live/counters/3/")).text() == "1\n"
    assert await read_frame(listener) == frame(1)
    assert await (await client.get("/live/counters/")).json() == {**{str(i): 0 for i in range(1, 10)}, "3": 1}
    assert (await client.get("/counters/3/")).status == 404


async def test_over_tls_streams_are_refused_with_the_reason(aiohttp_server, aiohttp_client, data_file, tmp_path):
    # A sub-app inside an app that serves HTTPS itself: values work, streams say what to do.
    import ssl
    import subprocess
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = await aiohttp_server(create_app(data_file), ssl=context)
    async with aiohttp.ClientSession() as session:
        url = f"https://127.0.0.1:{server.port}/counters/1/"
        assert await (await session.post(url, ssl=False)).text() == "1\n"
        refused = await session.get(url, headers=SSE, ssl=False)
        assert refused.status == 503
        assert "terminate TLS in a proxy" in await refused.text()


# --- persistence, in process -----------------------------------------------------------------------

async def test_changes_are_written_behind_within_the_save_interval(make_client, data_file):
    client = await make_client(save_interval=0.1)
    for _ in range(3):
        await client.post("/counters/8/")
    await asyncio.sleep(0.5)
    assert saved_values(data_file)["8"] == 3


async def test_health_reports_failing_saves_and_recovery(make_client, tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "counters.json").write_text(json.dumps(ZEROS))
    client = await make_client(data_path=directory / "counters.json", save_interval=0.1)
    assert await (await client.get("/healthz")).text() == "ok\n"

    shutil.rmtree(directory)  # the directory is gone: saves fail
    assert await (await client.post("/counters/1/")).text() == "1\n"
    await asyncio.sleep(0.5)
    response = await client.get("/healthz")
    assert response.status == 503
    assert "No such file or directory" in await response.text()
    assert await (await client.get("/counters/1/")).text() == "1\n"  # reads keep working

    directory.mkdir()
    await asyncio.sleep(0.5)
    assert (await client.get("/healthz")).status == 200
    assert saved_values(directory / "counters.json")["1"] == 1


async def test_health_local_leaves_out_a_failing_pushpin(make_client, tmp_path):
    client = await make_client(grip_urls=("http://127.0.0.1:9/",))  # nothing listens there
    await client.post("/counters/1/")
    response = await wait_until(lambda: _status_is(client.get("/healthz"), 503), message="the outage shows")
    assert "publishing to http://127.0.0.1:9/publish/" in await response.text()
    response = await client.get("/healthz?local")  # a load balancer checking through Pushpins
    assert (response.status, await response.text()) == (200, "ok\n")


async def test_reads_are_cacheable_only_with_a_cache_to_purge(make_client):
    for options, caching in [({}, {"Cache-Control": "no-cache"}),
                             ({"purge_urls": ("http://127.0.0.1:9/",), "cache_seconds": 60},
                              {"Cache-Control": "public, max-age=0, s-maxage=60", "Vary": "Accept"})]:
        client = await make_client(**options)
        for path, accept in [("/counters/2/", "text/plain"), ("/counters/2/", "application/json"),
                             ("/counters/2/watchers/", "text/plain")]:
            response = await client.get(path, headers={"Accept": accept})
            assert {name: response.headers.get(name) for name in caching} == caching, (path, accept)
        for path in ("/counters/2/badge.svg", "/counters/"):  # never kept
            assert "s-maxage" not in (await client.get(path)).headers["Cache-Control"], path
        stream = await client.get("/counters/2/", headers=SSE)  # a direct stream: never kept
        assert stream.headers["Cache-Control"] == "no-cache"
        stream.close()
        if options:  # a multi-counter stream held by Pushpin: never kept either (no purge names it)
            grip = await make_client(**options, grip_urls=("http://127.0.0.1:9/",))
            held = await grip.get("/counters/?ids=2,3", headers={**SSE, "Grip-Sig": "unchecked: no key"})
            assert held.headers["Grip-Hold"] == "stream" and held.headers["Cache-Control"] == "no-cache"
            held = await grip.get("/counters/2/", headers={**SSE, "Grip-Sig": "unchecked: no key"})
            assert held.headers["Cache-Control"] == caching["Cache-Control"]
        response = await client.post("/counters/2/")
        assert "Cache-Control" not in response.headers


async def _status_is(request, status):
    response = await request
    return response if response.status == status else None


async def test_a_missing_data_file_starts_empty_and_is_made_by_the_first_change(make_client, tmp_path):
    path = tmp_path / "new.json"
    client = await make_client(data_path=path, save_interval=0.1, admin_token="s3cret")
    assert await (await client.get("/counters/")).json() == {}
    await asyncio.sleep(0.3)
    assert not path.exists()  # nothing changed: nothing written (a start that fails leaves no file)
    await client.put("/counters/first/", json={"value": 3}, headers={"Authorization": "Bearer s3cret"})
    await asyncio.sleep(0.5)
    assert json.loads(path.read_text()) == {"first": 3}


async def test_a_save_keeps_a_symlinked_data_file_and_its_mode(make_client, tmp_path):
    # A data file may be a link (to a volume, say) to a private file: a save replaces the file it
    # points to, which keeps its mode, and the link stays a link.
    real = tmp_path / "volume" / "counters.json"
    real.parent.mkdir()
    real.write_text(json.dumps(ZEROS))
    real.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    client = await make_client(data_path=link, save_interval=0.1)
    assert await (await client.post("/counters/1/")).text() == "1\n"
    await asyncio.sleep(0.5)
    assert link.is_symlink() and link.resolve() == real
    assert saved_values(link)["1"] == 1
    journal = real.with_name("counters.json.journal")  # beside the file the link points to
    assert real.stat().st_mode & 0o777 == 0o600 and journal.stat().st_mode & 0o777 == 0o600
    await client.close()  # a stop folds the journal into the file
    assert link.is_symlink() and json.loads(real.read_text())["1"] == 1
    assert real.stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in real.parent.iterdir()) == ["counters.json", "counters.json.journal"]
    assert journal.read_bytes() == b""  # no temporary file left, and the journal empty


# --- GRIP publishing, to a fake Pushpin ------------------------------------------------------------

async def test_a_publish_timeout_is_reported_and_publishing_goes_on(aiohttp_server, make_client, monkeypatch):
    # On Python 3.10 aiohttp's timeout is asyncio.TimeoutError, not the builtin TimeoutError: a
    # publisher that caught only the latter died at the first slow answer, silently.
    monkeypatch.setattr(livecounter, "PUBLISH_TIMEOUT", 0.2)
    published = []  # the content of every item the fake Pushpin accepted
    stalling = True

    async def publish(request):
        items = (await request.json())["items"]
        if stalling:
            await asyncio.sleep(1)  # past the timeout: the publisher gives up before this answer
            return web.Response(text="Published\n")
        published.extend(item["formats"]["http-stream"].get("content") for item in items)
        return web.Response(text="Published\n")

    pushpin = web.Application()
    pushpin.router.add_post("/publish/", publish)
    fake = await aiohttp_server(pushpin)
    client = await make_client(grip_urls=(str(fake.make_url("/")),))
    assert await (await client.post("/counters/1/")).text() == "1\n"

    async def health_is(status):
        while (response := await client.get("/healthz")).status != status:
            await asyncio.sleep(0.05)
        return await response.text()
    reason = await asyncio.wait_for(health_is(503), 5)
    assert f"publishing to {fake.make_url('/publish/')} failed: TimeoutError" in reason

    stalling = False  # the retry goes through
    await asyncio.wait_for(health_is(200), 5)
    assert frame(1).decode() in published
    assert await (await client.post("/counters/1/")).text() == "2\n"

    async def published_value_2():
        while frame(2).decode() not in published:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(published_value_2(), 5)  # a later change is published too
    metrics = (await (await client.get("/metrics")).text()).splitlines()
    assert "livecounter_grip_publishing_failing 0" in metrics
    assert not {"livecounter_grip_publish_errors_total 0", "livecounter_grip_publishes_total 0"} & set(metrics)


async def fake_pushpin(aiohttp_server):
    """A publish endpoint that takes everything: the items it got, and its URL."""
    items = []

    async def publish(request):
        items.extend((await request.json())["items"])
        return web.Response(text="Published\n")
    pushpin = web.Application()
    pushpin.router.add_post("/publish/", publish)
    return items, str((await aiohttp_server(pushpin)).make_url("/"))


async def test_hints_follow_only_channels_with_streams_held_lately(aiohttp_server, make_client):
    """A hint (every stream of a channel asks its next link) closes a gap only streams held just
    before a publish can fall in: changes of counters nobody was given cost their two items, no more."""
    items, url = await fake_pushpin(aiohttp_server)
    client = await make_client(grip_urls=(url,))
    for counter_id in "12345":
        await client.post(f"/counters/{counter_id}/")
    held = await client.get("/counters/6/", headers={**SSE, "Grip-Sig": "unchecked: no key"})
    assert held.headers["Grip-Hold"] == "stream"
    await client.post("/counters/6/")
    await asyncio.sleep(0.6)  # past every hint's delay
    actions = [(item["channel"], item["formats"]["http-stream"].get("action", "send")) for item in items]
    assert sorted(channel for channel, action in actions if action == "hint") == ["counter-6", "counters:6"]
    assert len([action for _, action in actions if action == "send"]) == 12


async def test_every_held_stream_has_the_same_next_link_also_under_a_prefix(tmp_path, aiohttp_client):
    """Pushpin refreshes at most ten distinct next links a second (docs/pushpin.md): every stream has
    /counters/?after=last under the app's prefix, whatever its counter is called."""
    (tmp_path / "counters.json").write_text(json.dumps({"counters": 0, "counters2": 0, "2": 0}))
    for prefix in ("", "/counters-app"):
        app = create_app(tmp_path / "counters.json", grip_urls=("http://127.0.0.1:9/",))
        if prefix:
            parent, app = web.Application(), app
            parent.add_subapp(prefix + "/", app)
            app = parent
        client = await aiohttp_client(app)
        for path in ("/counters/counters/", "/counters/counters2", "/counters/counters/watchers/",
                     "/counters/?ids=2,counters&watchers=1", "/counters/2/"):
            held = await client.get(prefix + path, headers={**SSE, "Grip-Sig": "unchecked: no key"})
            assert held.headers["Grip-Link"] == f"<{prefix}/counters/?after=last>; rel=next; timeout=30", path


async def test_a_held_stream_counts_itself_only_where_it_is_counted(make_client):
    """A multi stream with watchers=1 counts itself in its first watchers frame: held by Pushpin, it is
    counted only through Pushpin's stats (--grip-stats), so without them it doesn't count itself."""
    client = await make_client(grip_urls=("http://127.0.0.1:9/",))
    held = await client.get("/counters/?ids=2&watchers=1", headers={**SSE, "Grip-Sig": "unchecked: no key"})
    assert (await held.read()).endswith(b'event: watchers\ndata: {"id": "2", "watchers": 0}\n\n')
    direct = await client.get("/counters/?ids=2&watchers=1", headers=SSE)
    await read_retry(direct)
    await read_frame(direct)
    assert await read_frame(direct) == b'event: watchers\ndata: {"id": "2", "watchers": 1}\n\n'
    direct.close()


async def test_a_stop_does_not_wait_for_a_pushpin_or_cache_that_is_down(data_file):
    server = await Server(data_file, "--grip-url", "http://127.0.0.1:9/", "--purge-url", "http://127.0.0.1:9/").start()
    async with aiohttp.ClientSession() as session:
        await session.post(f"{server.url}/counters/1/")
        await wait_until(lambda: _status_is(session.get(f"{server.url}/healthz"), 503))
    started = time.monotonic()
    assert await server.stop() == 0
    assert time.monotonic() - started < 1.5  # not 2 s for each, one after the other
    log = server.log.read_text()
    assert "stopping with the latest value of 1 counter not published to every Pushpin" in log
    assert "stopping with 1 read not purged from every cache" in log


async def test_a_stop_says_what_a_publish_still_in_flight_carried(data_file):
    """A Pushpin that takes the publish request and never answers: the stop waits 2 s for it, then says
    that the counter's latest value may not have got there (it was in flight, not queued)."""
    async def hang(reader, writer):
        await reader.read(65536)
        await asyncio.sleep(10)
        writer.close()
    pushpin = await asyncio.start_server(hang, "127.0.0.1", 0)
    try:
        port = pushpin.sockets[0].getsockname()[1]
        server = await Server(data_file, "--grip-url", f"http://127.0.0.1:{port}/").start()
        async with aiohttp.ClientSession() as session:
            await session.post(f"{server.url}/counters/1/")
        await asyncio.sleep(0.3)  # the publish is at the Pushpin, unanswered
        started = time.monotonic()
        assert await server.stop() == 0
        assert 1.5 < time.monotonic() - started < 4
        assert "stopping with the latest value of 1 counter not published to every Pushpin" in server.log.read_text()
    finally:
        pushpin.close()


async def test_anonymous_streams_under_auto_create_leave_no_publisher_state(aiohttp_server, make_client):
    """--auto-create lets anyone watch any id: each stream's arrival and departure publishes a watcher
    count. What the publisher keeps of those channels goes once their count is back to 0."""
    items, url = await fake_pushpin(aiohttp_server)
    client = await make_client(grip_urls=(url,), auto_create=True, max_counters=10)
    for n in range(200):
        stream = await client.get(f"/counters/anonymous-{n}/", headers=SSE)
        await read_frame(stream)
        stream.close()
    grip = client.app[livecounter.GRIP]
    await wait_until(lambda: grip.tracked == 0, timeout=5, message="forgotten")
    assert await metric(client.session, str(client.make_url("")), "grip_channels") == 0


class FakePushpin:
    """A publish endpoint that answers, fails (500) or hangs past the publish timeout, as told; it keeps
    the latest content (or action) it took for each channel."""

    def __init__(self):
        self.latest = {}  # channel -> the last content or action ("close", "hint") it took
        self.mode = "answer"
        self.url = None

    async def start(self, aiohttp_server):
        async def publish(request):
            items = (await request.json())["items"]
            if self.mode == "hang":
                await asyncio.sleep(3600)
            if self.mode == "fail":
                return web.Response(status=500, text="failing on purpose\n")
            for item in items:
                content = item["formats"]["http-stream"]
                self.latest[item["channel"]] = content.get("content", content.get("action"))
            return web.Response(text="Published\n")
        app = web.Application()
        app.router.add_post("/publish/", publish)
        self.url = str((await aiohttp_server(app)).make_url("/"))
        return self

    def value_of(self, channel):
        """The number in the last event published on the channel (None: none, or an action)."""
        found = re.search(r"data: (\d+)|\"(?:value|watchers)\": (\d+)", self.latest.get(channel) or "")
        return int(found[1] or found[2]) if found else None


async def test_a_publish_that_times_out_while_its_channel_is_forgotten_stops_no_publishing(
        aiohttp_server, make_client, monkeypatch):
    """Two Pushpins. A direct stream's count 1 goes out, then B hangs and the stream closes: its count 0
    hangs at B while the channel, at 0, is forgotten. Once B answers again, both get every later
    change, and /healthz is 200. (On 6b9bdae the retry's lookup of the forgotten channel raised
    KeyError, which ended publishing to every Pushpin for good.)"""
    monkeypatch.setattr(livecounter, "PUBLISH_TIMEOUT", 0.5)
    a, b = await FakePushpin().start(aiohttp_server), await FakePushpin().start(aiohttp_server)
    client = await make_client(grip_urls=(a.url, b.url))
    stream = await client.get("/counters/1/", headers=SSE)
    await read_frame(stream)
    await wait_until(lambda: a.value_of("watchers-1") == 1 and b.value_of("watchers-1") == 1)
    b.mode = "hang"
    stream.close()
    await wait_until(lambda: a.value_of("watchers-1") == 0)
    await asyncio.sleep(0.8)  # B's request timed out meanwhile, and the channel was let go
    b.mode = "answer"
    for expected in (1, 2, 3):
        assert await (await client.post("/counters/1/")).text() == f"{expected}\n"
    await wait_until(lambda: a.value_of("counter-1") == 3 and b.value_of("counter-1") == 3, timeout=10,
                     message="both Pushpins get the later changes")
    assert b.value_of("watchers-1") == 0
    await wait_until(lambda: _status_is(client.get("/healthz"), 200), timeout=10, message="healthy again")


async def test_an_error_nobody_expected_ends_no_background_loop(aiohttp_server, make_client, monkeypatch, caplog):
    """A bug that raises in a loop (publishing, saving) is logged once with its traceback, said by
    /healthz, and the loop goes on: the next change gets out once it stops raising."""
    pushpin = await FakePushpin().start(aiohttp_server)
    client = await make_client(grip_urls=(pushpin.url,), save_interval=0.05)
    broken = {"publish_items", "_append"}
    publish_items, append = livecounter.publish_items, livecounter.Journal._append

    def breaking(name, original):
        def maybe_broken(*arguments):
            if name in broken:
                raise RuntimeError(f"a bug in {name}")
            return original(*arguments)
        return maybe_broken
    monkeypatch.setattr(livecounter, "publish_items", breaking("publish_items", publish_items))
    monkeypatch.setattr(livecounter.Journal, "_append", breaking("_append", append))
    assert await (await client.post("/counters/2/")).text() == "1\n"
    await wait_until(lambda: _status_is(client.get("/healthz"), 503))
    await wait_until(lambda: "RuntimeError: a bug in _append" in caplog.text and "a bug in publish_items" in caplog.text)
    await asyncio.sleep(0.5)  # more rounds fail meanwhile
    assert caplog.text.count("Traceback") == 2, "each outage's traceback once"
    assert "RuntimeError: a bug in" in await (await client.get("/healthz")).text()
    broken.clear()
    await wait_until(lambda: pushpin.value_of("counter-2") == 1, timeout=10)
    assert await (await client.post("/counters/2/")).text() == "2\n"
    await wait_until(lambda: pushpin.value_of("counter-2") == 2, timeout=10)
    await wait_until(lambda: _status_is(client.get("/healthz"), 200), timeout=10)
    await wait_until(lambda: saved_values(client.app[livecounter.SETTINGS].data_path)["2"] == 2)  # saves go on


async def test_ids_auto_created_or_watched_leave_no_state_even_when_publishing_lags(aiohttp_server, make_client):
    """Streams of 300 anonymous ids (--auto-create), once each, while a slow Pushpin keeps the
    publisher's queue behind and no cache answers its PURGEs: once the streams are gone and the queue
    is through, the publisher keeps nothing of their channels, and no purge of theirs waits. (On
    6b9bdae ~90% of them stayed for good, and one path per id waited for the cache.)"""
    pushpin = FakePushpin()

    async def slow_publish(request):
        await asyncio.sleep(0.3)
        return web.Response(text="Published\n")
    app = web.Application()
    app.router.add_post("/publish/", slow_publish)
    slow = str((await aiohttp_server(app)).make_url("/"))
    client = await make_client(grip_urls=(slow,), purge_urls=("http://127.0.0.1:9/",), auto_create=True,
                               max_counters=10)
    streams = []
    for n in range(300):
        stream = await client.get(f"/counters/anonymous-{n}/", headers=SSE)
        await read_frame(stream)
        streams.append(stream)
        if len(streams) > 20:
            streams.pop(0).close()
    for stream in streams:
        stream.close()
    url = str(client.make_url(""))
    await wait_until(lambda: _metrics_are(client, url, listeners=0), timeout=5)
    await wait_until(lambda: _metrics_are(client, url, grip_channels=0, grip_unpublished_counters=0,
                                          watched_counters=0, unpurged_paths=0), timeout=20,
                     message="nothing kept of the anonymous ids")
    del pushpin


async def _metrics_are(client, url, **expected):
    for name, value in expected.items():
        if await metric(client.session, url, name) != value:
            return False
    return True


# --- the command line, as separate processes -------------------------------------------------------

async def test_values_survive_a_restart(data_file):
    server = await Server(data_file).start()
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            await session.post(f"{server.url}/counters/3/")
    assert await server.stop() == 0
    assert json.loads(data_file.read_text())["3"] == 3

    server = await Server(data_file).start()
    async with aiohttp.ClientSession() as session:
        assert await (await session.get(f"{server.url}/counters/3/")).text() == "3\n"
    await server.stop()


async def test_a_stop_whose_last_save_makes_a_compaction_due_compacts_once_and_exits_0(tmp_path):
    """Found by an attack on the journal: the stop's last save made a compaction due, whose task ran
    beside the stop's own compaction; two threads wrote the same temporary file, and the stop logged
    a failed save and exited 1 (4 runs in 6), though every value was saved."""
    for attempt in range(4):
        directory = tmp_path / str(attempt)
        directory.mkdir()
        data_file = directory / "counters.json"
        data_file.write_text(json.dumps(ZEROS))
        record = b'{"1": 0}\n'  # a journal just short of a compaction: the last save passes it
        (directory / "counters.json.journal").write_bytes(record * (livecounter.COMPACT_AT_LEAST // len(record)))
        server = await Server(data_file, "--save-interval", "60").start()
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                assert (await session.post(f"{server.url}/counters/1/")).status == 200
        assert await server.stop() == 0, server.log.read_text()[-1500:]
        assert " ERROR " not in server.log.read_text()
        assert json.loads(data_file.read_text())["1"] == 5
        assert (directory / "counters.json.journal").read_bytes() == b""


async def test_the_journal_keeps_the_data_files_mode_across_stops(tmp_path):
    """Found by an attack: the empty journal a stop left was made with the default mode (0644 beside a
    0600 data file, and root's beside a service user's, which then couldn't append to it)."""
    data_file = tmp_path / "counters.json"
    data_file.write_text(json.dumps(ZEROS))
    data_file.chmod(0o600)
    for _ in range(2):
        server = await Server(data_file, "--save-interval", "0.05").start()
        async with aiohttp.ClientSession() as session:
            assert (await session.post(f"{server.url}/counters/1/")).status == 200
            await asyncio.sleep(0.3)
        journal = tmp_path / "counters.json.journal"
        assert journal.stat().st_mode & 0o777 == 0o600, oct(journal.stat().st_mode)
        assert await server.stop() == 0
        assert journal.stat().st_mode & 0o777 == 0o600 and journal.read_bytes() == b""


async def test_durable_a_deleted_counters_streams_end_even_if_it_is_made_again_in_the_same_save(tmp_path):
    """Found by an attack: with --durable, a DELETE and the POST that makes the counter again, held by
    the same group commit, released only the counter's latest value: its streams went on (50, then 1)
    instead of ending, 16 times in 20."""
    data_file = tmp_path / "counters.json"
    data_file.write_text(json.dumps({**ZEROS, "k": 50}))
    server = await Server(data_file, "--durable", "--auto-create", env={"LIVECOUNTER_ADMIN_TOKEN": "s3cret"}).start()
    admin = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession() as session:
        for attempt in range(20):
            stream = await session.get(f"{server.url}/counters/k/", headers=SSE)
            await read_frame(stream)
            busy = [asyncio.create_task(session.post(f"{server.url}/counters/1/")) for _ in range(20)]  # saves in flight
            await asyncio.sleep(0.005)
            deleted, made = await asyncio.gather(session.delete(f"{server.url}/counters/k/", headers=admin),
                                                 session.post(f"{server.url}/counters/k/"))
            await asyncio.gather(*busy)
            assert (deleted.status, made.status) == (204, 200)
            assert await asyncio.wait_for(stream.content.read(), 2) is not None  # it ended
            stream.close()
            assert (await session.put(f"{server.url}/counters/k/", json={"value": 50}, headers=admin)).status == 200
    assert await server.stop() == 0


async def test_shutdown_is_prompt_and_saves_with_vanished_and_frozen_listeners(data_file):
    server = await Server(data_file, "--save-interval", "60").start()
    vanished = await open_raw(server.port, sse_request("/counters/4/"))
    await recv_until(vanished, b"\n\n")
    vanished.close()
    frozen = await open_raw(server.port, sse_request("/counters/4/"), rcvbuf=1024)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            await session.post(f"{server.url}/counters/4/")
    assert await server.stop(timeout=5) == 0
    assert json.loads(data_file.read_text())["4"] == 5
    frozen.close()


async def test_sigint_saves_too(data_file):
    server = await Server(data_file, "--save-interval", "60").start()
    async with aiohttp.ClientSession() as session:
        await session.post(f"{server.url}/counters/6/")
    assert await server.stop(signal.SIGINT) == 0
    assert json.loads(data_file.read_text())["6"] == 1


async def test_kill_9_during_saves_leaves_a_valid_file(data_file):
    acknowledged = 0
    for _ in range(8):
        server = await Server(data_file, "--save-interval", "0.001").start()

        async def post_until_killed(session):
            nonlocal acknowledged
            try:
                while True:
                    response = await session.post(f"{server.url}/counters/1/")
                    acknowledged += response.status == 200
            except aiohttp.ClientError:
                pass

        async with aiohttp.ClientSession() as session:
            posting = [asyncio.create_task(post_until_killed(session)) for _ in range(4)]
            await asyncio.sleep(random.uniform(0.2, 0.6))
            await server.stop(signal.SIGKILL)
            for task in posting:
                task.cancel()
            await asyncio.gather(*posting, return_exceptions=True)
        json.loads(data_file.read_text())  # valid JSON after every kill
        counters = saved_values(data_file)  # and what a restart takes from it and its journal
        assert set(counters) == {str(i) for i in range(1, 10)}
        assert 0 <= counters["1"] <= acknowledged + 4  # +4: requests in flight when killed
    assert counters["1"] > 0


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"1": 1.5}', "holds 1.5, not an integer"),
    ('{"1": true}', "holds true, not an integer"),
    ('{"1": "3"}', 'holds "3", not an integer'),
    ('{"a b": 1}', "invalid counter id 'a b'"),
    ('{"..": 1}', "invalid counter id '..'"),
    ('{"1": 9007199254740992}', "outside"),
    ('{"1": 1, "1": 2}', "appears twice"),
    ("\xff", "cannot read"),
])
async def test_a_bad_data_file_stops_the_server_with_one_clear_line(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_bytes(content.encode("latin-1"))
    before = path.read_bytes()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "livecounter.py"), "--data", str(path), "--port", str(free_port()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and problem in lines[0], lines[0]
    assert path.read_bytes() == before


async def test_options_come_from_environment_variables(data_file):
    port = free_port()
    server = Server(data_file, env={"LIVECOUNTER_PORT": str(port), "LIVECOUNTER_CORS_ORIGIN": "https://a.example"})
    server.args = ["--data", str(data_file)]
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    await server.start()
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{server.url}/counters/1/")
        assert response.headers["Access-Control-Allow-Origin"] == "https://a.example"
    await server.stop()


async def test_the_reconnect_window_sets_the_retry_field(data_file):
    for how in ("option", "variable"):
        server = (Server(data_file, "--reconnect-window", "2-2") if how == "option"
                  else Server(data_file, env={"LIVECOUNTER_RECONNECT_WINDOW": "2-2"}))
        await server.start()
        async with aiohttp.ClientSession() as session:
            for path in ("/counters/1/", "/counters/?ids=1,2"):
                async with session.get(f"{server.url}{path}", headers=SSE) as stream:
                    assert await read_retry(stream, window_ms=(2000, 2000)) == 2000, how
        await server.stop()


def test_a_reconnect_window_is_min_max_seconds(monkeypatch, capsys):
    from livecounter import ReconnectWindow, parse_args
    assert parse_args(["--reconnect-window", "0.5-2.5"]).reconnect_window == ReconnectWindow(0.5, 2.5)
    assert parse_args([]).reconnect_window == ReconnectWindow(1, 5)
    assert str(ReconnectWindow(1, 5)) == "1-5"
    for text, reason in (("0-5", "the shortest wait must be a number of seconds above 0: 0-5"),
                         ("5-1", "the longest wait must be at least the shortest, at most 86,400 s: 5-1"),
                         ("3", "must be MIN-MAX in seconds, e.g. 1-5, not '3'"),
                         ("1-five", "must be MIN-MAX in seconds, e.g. 1-5, not '1-five'"),
                         ("1-inf", "the longest wait must be at least the shortest, at most 86,400 s: 1-inf")):
        with pytest.raises(SystemExit):
            parse_args([f"--reconnect-window={text}"])
        assert f"argument --reconnect-window: {reason}\n" in capsys.readouterr().err
    with pytest.raises(ValueError, match="longest"):  # an embedder's window, for create_app, too
        ReconnectWindow(2, 1)


async def test_the_access_log_is_on_unless_turned_off(data_file):
    for args, logged in (((), True), (("--no-access-log",), False)):
        server = await Server(data_file, *args).start()
        async with aiohttp.ClientSession() as session:
            await session.post(f"{server.url}/counters/5/", headers={"User-Agent": "probe/1"})
        await server.stop()
        log = server.log.read_text()
        server.log.unlink()
        assert ('"POST /counters/5/ HTTP/1.1" 200' in log and '"probe/1"' in log) == logged, log


async def test_without_pyzmq_grip_stats_says_what_is_missing(data_file, tmp_path):
    (tmp_path / "zmq.py").write_text("raise ImportError('no zmq here')\n")  # shadows the installed one
    server = Server(data_file, "--grip-stats", "ipc:///nowhere", env={"PYTHONPATH": str(tmp_path)})
    process = await asyncio.create_subprocess_exec(*server.command, *server.args, env=server.env,
                                                   stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert stderr.decode() == ("livecounter: --grip-stats needs the ZeroMQ client pyzmq: .venv/bin/pip install pyzmq "
                               '(or, installed as a package, pip install "livecounter[pushpin-stats]")\n')


def test_the_command_line_wins_over_the_environment_for_grip_urls(monkeypatch):
    from livecounter import parse_args
    monkeypatch.setenv("LIVECOUNTER_GRIP_URL", "http://a.example/ http://c.example/")
    assert parse_args(["--grip-url", "http://b.example/"]).grip_urls == ("http://b.example/",)
    assert parse_args([]).grip_urls == ("http://a.example/", "http://c.example/")
    monkeypatch.delenv("LIVECOUNTER_GRIP_URL")
    assert parse_args([]).grip_urls == ()


async def test_the_access_log_is_in_the_combined_format_with_the_client_address(data_file):
    server = await Server(data_file, "--trust-proxy").start()
    async with aiohttp.ClientSession() as session:
        await session.post(f"{server.url}/counters/5/", headers={
            "X-Forwarded-For": "198.51.100.7, 203.0.113.5", "Referer": "https://blog.example/",
            "User-Agent": 'probe/1 "quoted"'})
        await session.get(f"{server.url}/counters/5/", headers={"User-Agent": "probe/2"})
    await server.stop()
    log = server.log.read_text()
    timestamp = r"\[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]"
    # With --trust-proxy, the address the proxy appended; the request's own without X-Forwarded-For.
    assert re.search(rf'(^|\s)203\.0\.113\.5 - - {timestamp} "POST /counters/5/ HTTP/1\.1" 200 2 '
                     r'"https://blog\.example/" "probe/1 \\"quoted\\""$', log, re.M), log
    assert re.search(rf'(^|\s)127\.0\.0\.1 - - {timestamp} "GET /counters/5/ HTTP/1\.1" 200 2 "-" "probe/2"$',
                     log, re.M), log


async def test_help_documents_every_option():
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "livecounter.py"), "--help", stdout=asyncio.subprocess.PIPE)
    stdout, _ = await process.communicate()
    text = " ".join(stdout.decode().split())
    # Every Settings field but the admin token is an option, and every option has its variable.
    assert {field.name for field in livecounter.OPTIONS} >= {
        field.name for field in dataclasses.fields(livecounter.Settings)} - {"admin_token"}
    for option in livecounter.OPTIONS:
        flag = livecounter.flag_of(option)
        assert f"{flag} " in text
        assert "LIVECOUNTER_" + flag[2:].replace("-", "_").upper() in text
    # Each says what to write: a URL, a number of seconds, ...
    assert "--grip-url URL" in text and "--data FILE" in text and "--save-interval SECONDS" in text
    # ... and what an on/off variable takes; --trust-proxy never goes where clients reach livecounter.
    assert "on/off variables take 1, true, yes, on for on, 0, false, no, off for off" in text
    assert "never when clients reach livecounter directly" in text
    # The help and the README say the same defaults (two that disagreed once).
    readme = " ".join((HERE / "README.md").read_text().split())
    assert "ipc:///var/run/pushpin/pushpin-stats" in text and "ipc:///var/run/pushpin/pushpin-stats" in readme
    assert "the open-file limit less a tenth of it" in text and "the open-file limit less a tenth of it" in readme


async def test_a_start_with_no_data_file_says_how_to_make_a_counter(tmp_path):
    server = await Server(tmp_path / "none.json").start()
    await server.stop()
    assert "starting with no counters (an admin PUT makes one, or --auto-create lets a POST make it)" in \
        server.log.read_text()
    assert not (tmp_path / "none.json").exists()  # nothing changed: no file made


def test_every_file_the_readme_names_is_in_the_clone():
    """The README's commands and links name deploy/ and docs/ files a newcomer copies: each is there."""
    readme = (HERE / "README.md").read_text()
    named = set(re.findall(r"(?<![\w/])((?:deploy|docs|bench|tests)/[\w./-]*\w)", readme))
    named |= {path for path in re.findall(r"/opt/livecounter/([\w./-]*\w)", readme) if "/" in path or "." in path}
    missing = sorted(path for path in named if not (HERE / path).exists() and path != "venv/bin/pip")
    assert not missing, f"the README names files the clone lacks: {missing}"


async def test_version_is_shown():
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "livecounter.py"), "--version", stdout=asyncio.subprocess.PIPE)
    stdout, _ = await process.communicate()
    assert stdout.decode() == f"livecounter {livecounter.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", livecounter.__version__)


@pytest.mark.parametrize("given", [["--grip-key", ""], []])
async def test_an_empty_grip_key_is_refused_at_start_with_one_line(data_file, given):
    env = {**os.environ, "LIVECOUNTER_GRIP_KEY": ""} if not given else None
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "livecounter.py"), "--data", str(data_file), "--port", str(free_port()),
        "--grip-url", "http://127.0.0.1:9/", *given, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    named = "argument --grip-key" if given else "LIVECOUNTER_GRIP_KEY"
    assert stderr.decode().splitlines() == [f"livecounter: {named}: is empty: give Pushpin's sig_key, or leave it unset"]
    with pytest.raises(ValueError):
        create_app(data_file, grip_key="")


async def test_a_taken_port_is_one_clear_line_and_leaves_no_file(tmp_path):
    data_file = tmp_path / "counters.json"  # none yet: a start that fails must not make it
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "livecounter.py"), "--data", str(data_file),
            "--port", str(taken.getsockname()[1]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 1
    assert "cannot listen on 127.0.0.1" in stderr.decode().splitlines()[-1]
    assert [path.name for path in tmp_path.iterdir()] == []


async def test_port_0_says_the_port_it_got(data_file):
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "livecounter.py"), "--data", str(data_file), "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    Server.started.append(process)
    line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
    port = int(re.fullmatch(r"livecounter serving http://127\.0\.0\.1:(\d+)/ \(Ctrl\+C to stop\)\n", line)[1])
    assert port != 0
    async with aiohttp.ClientSession() as session:
        assert await (await session.post(f"http://127.0.0.1:{port}/counters/1/")).text() == "1\n"
    process.terminate()
    assert await asyncio.wait_for(process.wait(), 10) == 0


@pytest.mark.parametrize("argv, environment, reason", [
    (["--port", "80000"], {}, "argument --port: must be a port from 0 to 65535 (0: any free port), not '80000'"),
    (["--grip-url", "127.0.0.1:5561"], {}, "argument --grip-url: must be an http:// or https:// URL with a host"),
    (["--purge-url", "127.0.0.1:6081"], {}, "argument --purge-url: must be an http:// or https:// URL with a host"),
    (["--cors-origin", "https://a.example https://b.example"], {}, "argument --cors-origin: must be one origin"),
    (["--save-interval", "0"], {}, "argument --save-interval: must be a number from 0.001 to 1,000,000, not '0'"),
    ([], {"LIVECOUNTER_AUTO_CREATE": "enabled"}, "LIVECOUNTER_AUTO_CREATE: must be one of 1, true, yes, on (on) "
                                                 "or 0, false, no, off (off), not 'enabled'"),
    ([], {"LIVECOUNTER_PORT": "http"}, "LIVECOUNTER_PORT: must be a whole number, not 'http'"),
    ([], {"LIVECOUNTER_GRIP_URL": "http://127.0.0.1:5561/ 5562"}, "LIVECOUNTER_GRIP_URL: must be an http:// "),
    ([], {"LIVECOUNTER_MAX_LISTENERS_PER_IP": "0"}, "LIVECOUNTER_MAX_LISTENERS_PER_IP: must be a whole number from 1 to 1,000,000,000"),
    (["--redis", "redis://127.0.0.1:6379/l"], {}, "argument --redis: must be redis://HOST:PORT[/DB]"),  # not database 0
    (["--redis", "redis://127.0.0.1:abc/"], {}, "argument --redis: must be redis://HOST:PORT[/DB]"),
])
def test_a_setting_that_is_not_one_stops_the_start_with_one_line_naming_it(monkeypatch, capsys, argv, environment, reason):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        livecounter.parse_args(argv)
    assert stopped.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"livecounter: {reason}"), line


def test_settings_come_from_variables_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("LIVECOUNTER_AUTO_CREATE", "Yes")
    monkeypatch.setenv("LIVECOUNTER_SAVE_INTERVAL", "2.5")
    monkeypatch.setenv("LIVECOUNTER_GRIP_URL", "http://127.0.0.1:5561/ http://127.0.0.1:5571/")
    monkeypatch.setenv("LIVECOUNTER_CORS_ORIGIN", "https://site.example/")
    args = livecounter.parse_args(["--save-interval", "0.5"])
    assert args.auto_create is True and args.save_interval == 0.5
    assert args.grip_urls == ("http://127.0.0.1:5561/", "http://127.0.0.1:5571/")
    assert args.cors_origin == "https://site.example"  # a trailing slash no browser sends is dropped
    monkeypatch.setenv("LIVECOUNTER_AUTO_CREATE", "off")
    assert livecounter.parse_args([]).auto_create is False


async def test_unsafe_combinations_are_warned_of_at_the_start(data_file):
    server = Server(data_file, "--host", "0.0.0.0", "--trust-proxy", "--grip-url", "http://127.0.0.1:9/")
    server.url = f"http://0.0.0.0:{server.port}"
    await server.start()
    await server.stop()
    log = server.log.read_text()
    assert "--trust-proxy while listening on 0.0.0.0: anyone who reaches livecounter directly can name any " \
           "address in X-Forwarded-For" in log
    assert "--grip-url without --grip-key: any request with a Grip-Sig header is taken for Pushpin's" in log
    quiet = await Server(data_file, "--trust-proxy").start()  # on 127.0.0.1: behind a proxy, as it should be
    await quiet.stop()
    assert "WARNING" not in quiet.log.read_text().replace(log, "")


async def test_the_cors_origin_goes_out_without_the_trailing_slash(make_client):
    client = await make_client(cors_origin="https://site.example/")
    response = await client.get("/counters/1/", headers={"Origin": "https://site.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://site.example"


# --- every edge: races, leaks and stops, against the server process ---------------------------------

def stream_values(received: bytes) -> list[int]:
    """Every value on a single-counter stream so far, whatever its framing (chunked or not)."""
    return [int(value) for value in re.findall(rb"event: message\ndata: (-?\d+)\n\n", received)]


async def read_for(sock, seconds, received=b""):
    """What the socket receives in the next `seconds` (less if the server closes it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
        except asyncio.TimeoutError:
            break
        if not data:
            break
        received += data
    return received


async def post_forever(session, url, stop):
    acknowledged = 0
    while not stop.is_set():
        async with session.post(url) as response:
            assert response.status == 200
            acknowledged = max(acknowledged, int(await response.text()))
    return acknowledged


@pytest.mark.parametrize("mode, idle_listeners", [("default", 1), ("default", 1000), ("--durable", 1)])
async def test_a_new_stream_never_goes_backwards_while_posts_run(data_file, mode, idle_listeners):
    # A new stream's first frame is the newest value; a broadcast pending or resting at that moment
    # carried an older one, and in durable mode the change waiting for its save is older still.
    server = await Server(data_file, "--max-listeners-per-ip", "2000", *([mode] if mode != "default" else [])).start()
    idle = [await open_raw(server.port, sse_request("/counters/2/")) for _ in range(idle_listeners)]
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        posters = [asyncio.create_task(post_forever(session, f"{server.url}/counters/2/", stop)) for _ in range(8)]
        try:
            for _ in range(40):
                sock = await open_raw(server.port, sse_request("/counters/2/"))
                values = stream_values(await read_for(sock, 0.15, await recv_until(sock, b"data: ")))
                sock.close()
                assert values, "the stream sent nothing"
                assert values == sorted(values), f"a stream went backwards: {values[:20]}"
        finally:
            stop.set()
            acknowledged = max(await asyncio.gather(*posters))
        sock = await open_raw(server.port, sse_request("/counters/2/"))
        assert stream_values(await recv_until(sock, b"data: %d\n" % acknowledged))[-1] == acknowledged
        sock.close()
    for sock in idle:
        sock.close()
    assert await server.stop() == 0


async def test_stream_limits_hold_for_requests_that_arrive_together(data_file):
    server = await Server(data_file, "--max-listeners-per-ip", "2", "--max-listeners", "3",
                          "--trust-proxy").start()
    try:
        for round in range(10):
            # 40 requests written back to back: from one address (its cap: 2), from 40 (the cap: 3).
            for forwarded in (lambda i: "10.0.0.1", lambda i: f"10.0.1.{i}"):
                socks = [await open_raw(server.port, (
                    f"GET /counters/2/ HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                    f"X-Forwarded-For: {forwarded(i)}\r\n\r\n").encode()) for i in range(40)]
                statuses = [(await recv_until(sock, b"\r\n")).split(b" ")[1] for sock in socks]
                served = statuses.count(b"200")
                assert served == (2 if forwarded(0) == forwarded(1) else 3), statuses
                assert set(statuses) <= {b"200", b"429", b"503"}
                for sock in socks:
                    sock.close()
                async with aiohttp.ClientSession() as session:
                    for _ in range(100):  # the server hears of the departures
                        if await metric(session, server.url, "listeners") == 0:
                            break
                        await asyncio.sleep(0.05)
                    assert await metric(session, server.url, "listeners") == 0
    finally:
        await server.stop()


async def test_a_delete_racing_a_new_stream_ends_it_and_holds_no_descriptor(data_file):
    server = await Server(data_file, env={"LIVECOUNTER_ADMIN_TOKEN": "secret"}).start()
    admin = {"Authorization": "Bearer secret"}
    async with aiohttp.ClientSession() as session:
        await session.get(f"{server.url}/healthz")  # the session's connection is open from here on
        baseline = open_fds(server.process)
        for round in range(50):
            assert (await session.put(f"{server.url}/counters/r/", json={"value": round}, headers=admin)).status == 200
            stream = await open_raw(server.port, sse_request("/counters/r/", close=True))
            await asyncio.sleep(round % 10 / 1000)  # the DELETE lands somewhere in the stream's start
            deleted = await session.delete(f"{server.url}/counters/r/", headers=admin)
            assert deleted.status == 204
            received = await read_for(stream, 5)  # until the server ends it: 404, or the stream's end
            assert received.startswith((b"HTTP/1.1 404", b"HTTP/1.1 200")), received
            if received.startswith(b"HTTP/1.1 200"):
                assert received.endswith(b"0\r\n\r\n"), f"the stream of a deleted counter did not end: {received!r}"
            stream.close()
        await wait_until(lambda: open_fds(server.process) <= baseline, message="descriptors leaked")
        assert await metric(session, server.url, "listeners") == 0
    assert await server.stop() == 0
    assert "Traceback" not in server.log.read_text()


async def test_deleting_a_counter_whose_listener_stopped_reading_closes_its_connection(data_file):
    server = await Server(data_file, env={"LIVECOUNTER_ADMIN_TOKEN": "secret"}).start()
    async with aiohttp.ClientSession() as session:
        await session.post(f"{server.url}/counters/3/")  # the session's connection is open from here on
        await wait_until(lambda: metric(session, server.url, "saves_total"))  # the journal is open from here on
        baseline = open_fds(server.process)
        frozen = await open_raw(server.port, sse_request("/counters/3/"), rcvbuf=2048)
        await wait_until(lambda: open_fds(server.process) > baseline)
        for _ in range(5000):  # more than its socket buffers hold: the server has bytes it can't send
            await session.post(f"{server.url}/counters/3/")
        response = await session.delete(f"{server.url}/counters/3/", headers={"Authorization": "Bearer secret"})
        assert response.status == 204
        await wait_until(lambda: open_fds(server.process) <= baseline, message="the frozen listener's socket is held")
        assert await metric(session, server.url, "listeners") == 0
    frozen.close()
    assert await server.stop() == 0


async def test_streams_work_on_a_unix_socket_site(tmp_path, data_file):
    app = create_app(data_file)
    runner = web.AppRunner(app)
    await runner.setup()
    path = str(tmp_path / "livecounter.sock")
    await web.UnixSite(runner, path).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as session:
            stream = await session.get("http://x/counters/2/", headers=SSE)
            assert await read_frame(stream) == frame(0)
            assert await (await session.post("http://x/counters/2/")).text() == "1\n"
            assert await read_frame(stream) == frame(1)
            stream.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_a_listener_that_stops_reading_costs_its_socket_buffers_not_more(data_file, event_loop):
    # 50 listeners that never read, through thousands of broadcasts: the server's memory grows by
    # what each one's socket buffers hold, on either event loop.
    pytest.importorskip("uvloop") if event_loop == "uvloop" else None
    choice = "" if event_loop == "uvloop" else "livecounter.uvloop = None; "
    server = Server(data_file, "--save-interval", "60")
    server.command = [sys.executable, "-c", f"import sys, livecounter; {choice}sys.exit(livecounter.main(sys.argv[1:]))"]
    await server.start()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def post(counter, times):
            for _ in range(times):
                await session.post(f"{server.url}/counters/{counter}/")

        await asyncio.gather(*(post(5, 1000) for _ in range(8)))  # the server's own allocations settle
        frozen = [await open_raw(server.port, sse_request("/counters/3/"), rcvbuf=2048) for _ in range(50)]
        await post(5, 500)
        before = rss_bytes(server.process)
        broadcasts = await metric(session, server.url, "broadcasts_total")
        for _ in range(30):  # one poster: most of its POSTs are a broadcast of their own
            await post(3, 1000)
            if await metric(session, server.url, "broadcasts_total") - broadcasts > 6000:
                break
        else:
            raise AssertionError("fewer than 6,000 broadcasts")
        grown = rss_bytes(server.process) - before
        assert grown < 50 * 40 * 1024, f"{grown / 50 / 1024:.0f} KiB per frozen listener"
    for sock in frozen:
        sock.close()
    await server.stop()


@pytest.mark.parametrize("second_signal", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_during_the_stop_loses_nothing(data_file, second_signal):
    server = await Server(data_file, "--save-interval", "60").start()
    # A request in progress when the stop begins: the stop waits for it, and a second signal comes.
    slow = await open_raw(server.port, b"POST /counters/2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            assert (await session.post(f"{server.url}/counters/1/")).status == 200
    server.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    server.process.send_signal(second_signal)
    assert await server.stop(timeout=15) == 0
    assert json.loads(data_file.read_text())["1"] == 5
    assert "already stopping" in server.log.read_text()
    slow.close()


async def test_a_stream_that_finds_no_descriptor_left_ends_without_a_traceback(data_file):
    # Idle connections took every descriptor the process may open: the stream's duplicate can't be made.
    server = Server(data_file, "--max-listeners", "1000")
    server.command = [sys.executable, "-c", "import resource, sys, livecounter; "
                      "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); sys.exit(livecounter.main(sys.argv[1:]))"]
    await server.start()
    idle = []
    try:
        while open_fds(server.process) < 64 and len(idle) < 200:
            idle.append(await open_raw(server.port, b""))
            await asyncio.sleep(0.01)
        idle.pop().close()
        await asyncio.sleep(0.3)  # the server sees it go: one descriptor is free, for the stream's socket
        stream = await open_raw(server.port, sse_request(close=True))
        await read_for(stream, 3)  # its answer, if any, and its end
        stream.close()
    finally:
        for sock in idle:
            sock.close()
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: open_fds(server.process) < 30)
        assert await (await session.get(f"{server.url}/counters/1/")).text() == "0\n"  # it serves on
        assert await metric(session, server.url, "listeners") == 0
    assert await server.stop() == 0
    assert "Traceback" not in server.log.read_text()


async def test_a_client_that_leaves_early_is_not_a_failure(data_file):
    server = await Server(data_file).start()
    for _ in range(200):
        sock = await open_raw(server.port, sse_request())
        sock.close()
    async with aiohttp.ClientSession() as session:  # all of them were handled by now
        assert await metric(session, server.url, "listeners") == 0
        await asyncio.sleep(0.5)
        assert await metric(session, server.url, "listeners") == 0
    assert await server.stop() == 0
    log = server.log.read_text()
    assert "Traceback" not in log and "Error" not in log, log[:2000]


def test_the_shipped_data_file_holds_counters_1_to_9_at_0():
    # As git holds it: running the server with the default --data changes the working copy.
    try:
        shipped = subprocess.run(["git", "show", "HEAD:counters.json"], cwd=HERE, capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the shipped file is the one git holds")
    assert json.loads(shipped) == ZEROS
