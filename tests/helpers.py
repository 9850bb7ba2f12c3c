"""What the tests share: the data they start from, servers they run as processes, and ways to talk
to them and to wait. Tests import them by name (`from tests.helpers import Server, read_frame`); the
fixtures (data_file, make_client, client) are conftest.py's.
"""

import asyncio
import os
import re
import select
import signal
import socket
import sys
import time
import weakref
from pathlib import Path

import livecounter

if sys.version_info >= (3, 11):
    from asyncio import timeout as within
else:  # aiohttp installs async-timeout on Python 3.10, where asyncio has no timeout()
    from async_timeout import timeout as within  # noqa: F401 (for the tests)

HERE = Path(__file__).resolve().parent.parent  # the top of the clone, where livecounter.py is
SSE = {"Accept": "text/event-stream"}


def frame(value):
    return b"event: message\ndata: %d\n\n" % value


ZEROS = {str(i): 0 for i in range(1, 10)}  # what the tests start from: counters 1..9 at 0


def saved_values(data_file) -> dict:
    """The values a restart would start from: the data file, then its journal."""
    return livecounter.load_counters(Path(data_file), starting=False).counters


RETRY_FIELD = re.compile(rb"retry: (\d+)\n")  # the first line of a stream's first event
WINDOW_MS = (1000, 5000)  # the default --reconnect-window, 1-5 s, in the retry field's milliseconds
retry_read = weakref.WeakKeyDictionary()  # stream response -> its retry field's value, once read


def retry_of(block: bytes, window_ms=WINDOW_MS) -> int:
    """The milliseconds of a stream's retry field, checked to be in the window."""
    match = RETRY_FIELD.fullmatch(block)
    assert match, f"a stream starts with its retry field, not {block!r}"
    assert window_ms[0] <= int(match[1]) <= window_ms[1], (block, window_ms)
    return int(match[1])


async def read_retry(response, timeout=5, window_ms=WINDOW_MS):
    """The retry field every stream starts with (its first event's first line), checked to be in
    the window (read_frame and read_until_value read it first if the test didn't)."""
    retry_read[response] = retry_of(await asyncio.wait_for(response.content.readuntil(b"\n"), timeout),
                                    window_ms)
    return retry_read[response]


async def read_frame(response, timeout=5):
    """The next SSE frame of an aiohttp client response, keep-alive comments included; the retry
    field that comes first is checked and passed over."""
    if response not in retry_read:
        await read_retry(response, timeout)
    return await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout)


async def read_until_value(response, value, timeout=5):
    """Every value frame up to and including the one carrying value (after the retry field)."""
    if response not in retry_read:
        await read_retry(response, timeout)
    values = []

    async def read():  # under asyncio.wait_for: asyncio.timeout() is Python 3.11+
        while not values or values[-1] != value:
            received = await response.content.readuntil(b"\n\n")
            if received != b":\n\n":
                values.append(int(received.removeprefix(b"event: message\ndata: ")))
    await asyncio.wait_for(read(), timeout)
    return values


async def open_raw(client_or_port, request: bytes, rcvbuf=None):
    """A raw TCP connection that sent request; returns the socket, which the test reads (or doesn't)."""
    port = client_or_port if isinstance(client_or_port, int) else client_or_port.port
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    return sock


async def recv_until(sock, marker: bytes, received=b"", timeout=5):
    loop = asyncio.get_running_loop()

    async def receive(received):
        while marker not in received:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionError(f"closed before {marker!r}; got {received!r}")
            received += data
        return received
    return await asyncio.wait_for(receive(received), timeout)


async def recv_all(sock, timeout=5):
    """Everything the server sends until it closes the connection (ask it to: Connection: close)."""
    loop = asyncio.get_running_loop()

    async def receive():
        received = b""
        while data := await loop.sock_recv(sock, 65536):
            received += data
        return received
    received = await asyncio.wait_for(receive(), timeout)
    sock.close()
    return received


def first_chunk(body: bytes, payload: bytes, window_ms=WINDOW_MS) -> int:
    """Check that body is exactly a stream's first chunk: its retry field, in the window, then
    payload (its first frames, unchanged); the retry field's milliseconds."""
    field = re.match(rb"[0-9a-f]+\r\n(retry: \d+\n)", body)
    assert field, body
    assert body == b"%x\r\n%s%s\r\n" % (len(field[1] + payload), field[1], payload)
    return retry_of(field[1], window_ms)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python livecounter.py` in a process of its own; one a test leaves running is killed after it."""

    started: list = []  # the processes of the test that runs now

    def __init__(self, data_file, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), "--data", str(data_file), *args]
        self.env = {**os.environ, **(env or {})}
        self.command = [sys.executable, str(HERE / "livecounter.py")]

        self.log = Path(data_file).with_suffix(".log")  # stderr: a pipe nobody reads would fill up

    async def start(self):
        with open(self.log, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, *self.args, env=self.env,
                stdout=asyncio.subprocess.PIPE, stderr=log)
        Server.started.append(self.process)
        line = await asyncio.wait_for(self.process.stdout.readline(), 10)
        assert f"serving {self.url}/ " in line.decode(), line
        return self

    async def stop(self, sig=signal.SIGTERM, timeout=10):
        self.process.send_signal(sig)
        await asyncio.wait_for(self.process.communicate(), timeout)
        return self.process.returncode


def sse_request(path="/counters/2/", version="1.1", close=False):
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/{version}\r\nHost: x\r\nAccept: text/event-stream\r\n{connection}\r\n".encode()


def open_fds(process):
    return len(os.listdir(f"/proc/{process.pid}/fd"))


def rss_bytes(process):
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def wait_until(condition, timeout=5, message="the condition never held"):
    """Wait until condition() is true (a function, or an async one); its result, or AssertionError
    with message and the last result after timeout seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{message} (last: {result!r})")
        await asyncio.sleep(0.05)


async def metric(session, url, name):
    text = await (await session.get(f"{url}/metrics")).text()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"livecounter_{name} ")))


def handshakes_while_frozen(pids, port, count=600, timeout=3.0) -> int:
    """How many of `count` connections opened at once complete their handshake while the processes
    that accept them are stopped (SIGSTOP): those the listening socket's backlog queues. The others
    wait for a SYN retransmit, and more, until someone accepts."""
    sockets = []
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            sockets.append(sock)
        poll, by_fd = select.poll(), {sock.fileno(): sock for sock in sockets}
        for sock in sockets:
            poll.register(sock, select.POLLOUT)
        deadline, connected = time.monotonic() + timeout, 0
        while connected < count and time.monotonic() < deadline:
            for fd, _ in poll.poll(100):
                poll.unregister(fd)
                connected += not by_fd[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return connected
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        for sock in sockets:
            sock.close()
