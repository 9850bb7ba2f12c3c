"""Hostile and broken input against `python livecounter.py`: never a 5xx, never a hang, never a crash."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ZEROS, free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the whole module, with every feature on, so every code path faces the input."""
    directory = tmp_path_factory.mktemp("hostile")
    (directory / "counters.json").write_text(json.dumps(ZEROS))
    port = free_port()
    with open(directory / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "livecounter.py"), "--port", str(port), "--data",
             str(directory / "counters.json"), "--auto-create", "--post-rate", "100000"],
            env={**os.environ, "LIVECOUNTER_ADMIN_TOKEN": ADMIN_TOKEN}, stdout=subprocess.PIPE, stderr=log)
    assert b"serving" in process.stdout.readline()
    yield port, process
    process.terminate()
    assert process.wait(10) == 0
    json.loads((directory / "counters.json").read_text())  # still a valid file


def exchange(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes; return what came back up to the end of the response head (or the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse before it has read everything
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except ConnectionResetError:
            pass
        return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def assert_serving(port: int, process) -> None:
    assert process.poll() is None, "the server died"
    response = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200


ids = st.one_of(
    st.sampled_from(["1", "2", "..", ".", "-", "a" * 64, "a" * 65, "x" * 5000, "", "%2e%2e", "%00"]),
    st.text(max_size=80).map(lambda text: quote(text, safe="")),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)
    .map(lambda text: quote(text, safe="%/.-_~!$&'()*+,;=:@")),
)
paths = st.one_of(
    ids.map(lambda counter_id: f"/counters/{counter_id}/"),
    ids.map(lambda counter_id: f"/counters/{counter_id}"),
    st.sampled_from(["/", "/counters/", "/counters", "/healthz", "//", "/counters//", "*",
                     "/counters/../counters/1/", "/counters/1/?x=%zz", "/counters/1/#f",
                     "http://evil.example/counters/1/"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300)
    .map(lambda text: "/" + text),
)
methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"]),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=20),
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=200)
accepts = st.one_of(st.sampled_from(["text/event-stream", "application/json", "text/plain", "*/*",
                                     "text/event-stream;q=0", "application/json, text/event-stream"]),
                    header_values)
authorizations = st.one_of(st.sampled_from([f"Bearer {ADMIN_TOKEN}", "Bearer", "Basic abc", ""]),
                           header_values)
bodies = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda value: json.dumps({"value": value}).encode(),
              st.one_of(st.integers(), st.floats(allow_nan=True), st.text(), st.booleans(), st.none())),
    st.just(b"x" * 100_000),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=methods, path=paths, accept=accepts, origin=header_values, authorization=authorizations,
       body=bodies, chunked=st.booleans())
def test_random_requests_never_get_a_5xx(server, method, path, accept, origin, authorization, body, chunked):
    port, process = server
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Accept: {accept}", f"Origin: {origin}",
            f"Authorization: {authorization}", "Connection: close"]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
    response = exchange(port, request)
    assert response, "no answer"
    assert status_of(response) < 500, response[:300]
    assert process.poll() is None


GARBAGE = {
    "tls client hello": bytes.fromhex("160301020001000100fc0303") + os.urandom(250),
    "http/9.9": b"GET /counters/1/ HTTP/9.9\r\nHost: x\r\n\r\n",
    "http/0.9": b"GET /counters/1/\r\n\r\n",
    "no version": b"GET\r\n\r\n",
    "binary": bytes(range(256)) * 4,
    "huge header line": b"GET /counters/1/ HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
    "huge request line": b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n",
    "ten thousand headers": b"GET /counters/1/ HTTP/1.1\r\n" + b"X: y\r\n" * 10_000 + b"\r\n",
    "bad chunk size": b"POST /counters/1/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "chunk longer than said": b"POST /counters/1/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n",
    "content-length and chunked": b"POST /counters/1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "negative content-length": b"POST /counters/1/ HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "two content-lengths": b"POST /counters/1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "lf only": b"GET /counters/1/ HTTP/1.1\nHost: x\n\n",
    "nul in path": b"GET /counters/1\x00/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "space in header name": b"GET /counters/1/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
    "upgrade to websocket": b"GET /counters/1/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "h2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_over_tcp_leaves_the_server_serving(server, garbage):
    port, process = server
    response = exchange(port, garbage)
    if response.startswith(b"HTTP/"):
        assert status_of(response) < 500, response[:300]
    assert_serving(port, process)


def test_a_body_that_never_arrives_gets_408_after_ten_seconds(server):
    port, process = server
    response = exchange(port, b"POST /counters/1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nabc",
                        timeout=15)
    assert status_of(response) == 408
    assert_serving(port, process)


def test_a_thousand_idle_sockets_do_not_slow_a_real_request(server):
    port, process = server
    idle = []
    try:
        for number in range(1000):
            sock = socket.create_connection(("127.0.0.1", port))
            if number % 2:
                sock.sendall(b"GET /counters/1/ HTTP/1.1\r\nHost: x\r\n")  # a request never finished
            idle.append(sock)
        started = time.monotonic()
        response = exchange(port, b"GET /counters/2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(response) == 200
        assert time.monotonic() - started < 2, "a real request waited behind idle sockets"
    finally:
        for sock in idle:
            sock.close()
    assert_serving(port, process)
