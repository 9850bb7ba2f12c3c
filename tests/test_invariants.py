"""Invariants of livecounter under random interleavings, against a real `python livecounter.py`.

Hypothesis draws a list of operations; each example runs them against a server process of its own
(default or --durable mode, with or without a small --max-listeners), over real loopback sockets:
concurrent POSTs, floods of POSTs, admin PUTs (possibly lower) and DELETEs (then re-creation by
PUT), single- and multi-counter streams (HTTP/1.1 chunked or HTTP/1.0) that open, read and close,
frozen readers (SO_RCVBUF 2048, never read after their first frames), clients that vanish right
after their request, and SIGTERM + restart on the same data file. The checks, at every `quiesce`
operation, at every restart and at the end of each example:

* values: on every stream, a counter's values never decrease between admin writes to it (keep-alive
  comments aside), and never start below what was acknowledged before the stream was requested;
* streams end up right: once quiet, a reading stream ends on each counter's current value within a
  few seconds, and a stream of a deleted counter ends (the server closes it, with its last chunk);
* listeners: livecounter_listeners in /metrics is the number of streams the test holds open
  (frozen readers included), never more than --max-listeners;
* file descriptors: the server holds its baseline (measured after start) plus one per such stream,
  so the baseline again once the test has closed every client;
* data: every acknowledged write is in the server's values (with --durable, in the data file at
  once) and, after SIGTERM (which must exit 0), in the data file.

The test drives the writes so that the expected values are exact: admin writes never run at the
same time as POSTs (each waits for the other), while stream opens, closes and vanishing clients may
overlap anything; a stream whose opening overlapped an admin write on its counter is allowed what
either order would give. Only clients that vanish POST, and only to counter 9, whose value is
therefore checked as a range. SIGTERM may land among POSTs: those answered 200 must be in the file.

LIVECOUNTER_INVARIANT_EXAMPLES sets the examples per mode (default 25: ~20 s default, ~40 s --durable
here, where each POST of a flood waits for its fsync; a failing example takes a few seconds more).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from tests.helpers import ZEROS, Server, saved_values, wait_until, within

TOKEN = "invariants-token"
POOL = ("1", "2")  # the counters the operations work on: few, so that operations meet
VANISHING = "9"  # only vanishing clients POST to it: its value is known as a range
EVENTUALLY = 3.0  # seconds for anything that must happen "soon"
KEEPALIVE = 0.5  # --keepalive-interval: comments interleave with the frames
FROZEN_RCVBUF = 2048
FLOOD = 600  # POSTs one after the other: enough frames to fill a frozen reader's socket buffers
EXAMPLES = int(os.environ.get("LIVECOUNTER_INVARIANT_EXAMPLES", "25"))
EXAMPLE_TIMEOUT = 90  # seconds: an example that hangs fails instead of hanging the run


# --- operations -------------------------------------------------------------------------------------

counters = st.sampled_from(POOL)
versions = st.sampled_from(["1.1", "1.0"])


def operations_on(counter):
    """Each operation's name and arguments, on this counter (where it takes one), with a weight."""
    return {
        "post": (3, st.tuples(st.just(counter), st.integers(1, 8), st.booleans())),  # n at once; True: await them
        "flood": (2, st.tuples(st.just(counter), st.booleans())),  # FLOOD POSTs one after the other; True: await
        "open": (4, st.tuples(st.just(counter), versions, st.booleans())),  # True: await its first frames
        "open_multi": (2, st.tuples(st.lists(counters, max_size=len(POOL) - 1, unique=True).map(
            lambda others: tuple(sorted({counter, *others}))), versions, st.booleans())),
        "open_many": (2, st.tuples(st.just(counter), st.integers(2, 5))),  # that many streams at once
        "put": (2, st.tuples(st.just(counter), st.integers(0, 40))),
        "delete": (2, st.tuples(st.just(counter))),
        "frozen": (2, st.tuples(st.just(counter), st.booleans())),  # True: FLOOD POSTs then, so it falls behind
        "close": (2, st.tuples(st.integers(0, 15))),  # the n-th stream held (modulo), frozen ones too
        "vanish": (1, st.tuples(st.sampled_from(["stream", "multi", "post"]), st.just(counter), st.booleans())),
        "quiesce": (1, st.tuples()),
        "restart": (1, st.tuples()),
        "pause": (1, st.tuples(st.sampled_from([0.001, 0.005, 0.02]))),
    }


def operation(counter, names=None):
    choices = operations_on(counter)
    names = [name for name, (weight, _) in choices.items() if names is None or name in names for _ in range(weight)]
    return st.sampled_from(names).flatmap(lambda name: choices[name][1].map(lambda args: (name, *args)))


def race(counter):
    """A few operations on one counter that race: each starts while the one before is in flight."""
    opens = ["open", "open_multi", "open_many"]
    posting = st.one_of(st.tuples(st.just("post"), st.just(counter), st.integers(2, 8), st.just(False)),
                        st.just(("flood", counter, False)))
    return st.one_of(
        # a new stream amid POSTs, with listeners already there (the more, the longer a broadcast rests)
        st.tuples(st.tuples(st.just("open_many"), st.just(counter), st.integers(3, 8)), posting,
                  operation(counter, opens)),
        st.tuples(operation(counter, ["open", "open_multi"]), operation(counter, ["delete", "put"])),
        st.tuples(st.just(("delete", counter)), operation(counter, [*opens, "frozen"])),
        st.tuples(st.just(("frozen", counter, True)), st.just(("delete", counter))),  # it fell behind
    ).map(list)


# Races need operations on the same counter close together: a chunk is one operation, a race, or a
# few operations on one counter. The list is flattened: hypothesis prints a list of operations.
RACY = ["post", "flood", "open", "open_multi", "open_many", "put", "delete", "frozen", "close"]
chunks = st.one_of(
    counters.flatmap(operation).map(lambda op: [op]),
    counters.flatmap(race),
    counters.flatmap(lambda counter: st.lists(operation(counter, RACY), min_size=2, max_size=4)),
)
operation_lists = st.lists(chunks, min_size=2, max_size=8).map(
    lambda chunks: [op for chunk in chunks for op in chunk])


@pytest.mark.parametrize("durable", [False, True], ids=["default", "durable"])
@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          # A failing example takes seconds (it waits for what doesn't happen): shrink one bug, and
          # skip the explain phase, which reruns examples.
          report_multiple_bugs=False, phases=[Phase.explicit, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(max_listeners=st.sampled_from([None, 6]), ops=operation_lists)
def test_invariants_hold_under_random_interleavings(durable, max_listeners, ops):
    asyncio.run(run_example(durable, max_listeners, ops))


async def run_example(durable, max_listeners, ops):
    with tempfile.TemporaryDirectory(prefix="livecounter-invariants-") as directory:
        example = Example(Path(directory), durable=durable, max_listeners=max_listeners)
        try:
            async with within(EXAMPLE_TIMEOUT):
                await example.start()
                for number, operation in enumerate(ops):
                    example.step = f"operation {number} {operation}"
                    await example.perform(operation)
                example.step = "the end"
                await example.finish()
        except BaseException:
            note(f"failed at {example.step}")
            note("server log (without the access log):\n" + example.log_tail())
            raise
        finally:
            await example.cleanup()


# --- clients over raw sockets -----------------------------------------------------------------------

def request(method, path, *, version="1.1", accept=None, admin=False, body=b"", close=True) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    if accept:
        lines.append(f"Accept: {accept}")
    if admin:
        lines.append(f"Authorization: Bearer {TOKEN}")
    if method in ("POST", "PUT", "DELETE"):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def exchange(port, data: bytes, timeout=2 * EVENTUALLY) -> tuple[int, bytes]:
    """One request on a connection of its own (Connection: close): its status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with within(timeout):
            answer = await reader.read()  # until the server closes
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise ConnectionError(f"no answer: {answer[:100]!r}")
    return int(head.split(b" ", 2)[1]), body


CHANGE_FAILURES = (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError)


async def post_once(port, counter) -> list[tuple[int | None, object]]:
    """A POST on its own connection: [(200, new value)], [(status, body)] or [(None, why it failed)]."""
    try:
        status, body = await exchange(port, request("POST", f"/counters/{counter}/"))
    except CHANGE_FAILURES as error:
        return [(None, repr(error))]
    return [(status, int(body) if status == 200 else body)]


async def post_sequentially(port, counter, count, running: asyncio.Event) -> list[tuple[int | None, object]]:
    """count POSTs one after the other on one keep-alive connection; `running` is set after a tenth."""
    answers: list[tuple[int | None, object]] = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with within(10 * EVENTUALLY):
                for number in range(count):
                    if number == count // 10:
                        running.set()
                    writer.write(request("POST", f"/counters/{counter}/", close=False))
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
                    body = await reader.readexactly(length)
                    status = int(head.split(b" ", 2)[1])
                    answers.append((status, int(body) if status == 200 else body))
        finally:
            writer.close()
    except CHANGE_FAILURES as error:
        answers.append((None, repr(error)))
    finally:
        running.set()
    return answers


FRAME = re.compile(rb"event: message\ndata: (-?\d+)")
COUNTER_FRAME = re.compile(rb'event: counter\ndata: \{"id": "([A-Za-z0-9._-]+)", "value": (-?\d+)\}')


@dataclass(eq=False)
class Stream:
    """A stream the test opened: what it was sent, parsed, and what the test knows about it."""

    number: int
    ids: tuple[str, ...]
    multi: bool
    version: str
    frozen: bool
    floors: dict[str, int | None]  # per counter: the value acknowledged before it was requested
    ambiguous: dict[str, list[str]]  # per counter: admin writes in flight while it was opening
    exists: dict[str, set[bool]]  # per counter: whether it existed, in any order those writes allow
    deleted_after: set[str] = field(default_factory=set)  # counters deleted once it was established
    status: int | None = None
    events: list[tuple] = field(default_factory=list)  # ("value", id, n) and ("marker", id, kind, old, new)
    last: dict[str, int] = field(default_factory=dict)
    established: bool = False  # every counter's first frame arrived
    ended: bool = False  # the server ended it (or the connection failed)
    clean_end: bool = False  # ... with the last chunk (HTTP/1.1), and no partial frame
    closed_by_test: bool = False
    errors: list[str] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)  # status known and established, or over
    buffer: bytes = b""
    task: asyncio.Task | None = None
    writer: asyncio.StreamWriter | None = None
    sock: socket.socket | None = None

    def __repr__(self):
        kind = "frozen reader" if self.frozen else "multi-counter stream" if self.multi else "stream"
        state = ("closed by the test" if self.closed_by_test else "ended" if self.ended
                 else "established" if self.established else "opening")
        return (f"{kind} #{self.number} of {','.join(self.ids)} (HTTP/{self.version}, status {self.status}, "
                f"{state}; values {self.values_seen()})")

    def values_seen(self, start=-20, stop=None):
        """Its frames (a multi-counter stream's as id:value), and `|put 2->5|` where the test sent an admin write."""
        shown = [f"|{e[2]} {e[1]}->{e[4]}|" if e[0] == "marker" else f"{e[1]}:{e[2]}" if self.multi else str(e[2])
                 for e in self.events]
        if start < 0 and -start < len(shown):
            return "... " + " ".join(shown[start:])
        return " ".join(shown[max(0, start):stop])

    @property
    def path(self):
        return f"/counters/?ids={','.join(self.ids)}" if self.multi else f"/counters/{self.ids[0]}/"

    def must_end(self) -> bool:
        """It got a 200, so it was taken before any DELETE still in flight while it opened: the last
        such DELETE, or one sent once it was established, must end it."""
        return bool(self.deleted_after) or any(kinds and kinds[-1] == "delete" for kinds in self.ambiguous.values())

    def may_end(self) -> bool:
        return self.must_end() or any("delete" in kinds for kinds in self.ambiguous.values())

    async def read(self, port):
        """Open it and parse every frame until the server ends it (cancelled when the test closes it)."""
        try:
            reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
            self.writer.write(request("GET", self.path, version=self.version, accept="text/event-stream",
                                      close=False))
            head = await reader.readuntil(b"\r\n\r\n")
            self.status = int(head.split(b" ", 2)[1])
            if self.status != 200:
                return
            chunked = b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
            if chunked:
                while size := int(await reader.readuntil(b"\r\n"), 16):
                    chunk = await reader.readexactly(size + 2)
                    self.feed(chunk[:-2])
                if await reader.readexactly(2) != b"\r\n" or await reader.read():
                    self.errors.append("bytes after the last chunk")
            else:
                while data := await reader.read(65536):
                    self.feed(data)
            self.clean_end = not self.buffer
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass  # ended without its last chunk (clean_end stays False)
        finally:
            if not self.closed_by_test:
                self.ended = True
            if self.writer is not None:
                self.writer.close()  # a refusal's connection too: it would be kept alive
            self.opened.set()

    async def open_frozen(self, port):
        """Open it with a tiny receive buffer, read the first frames, then never read again."""
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FROZEN_RCVBUF)
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        received = b""
        async with within(EVENTUALLY):
            await loop.sock_connect(self.sock, ("127.0.0.1", port))
            await loop.sock_sendall(self.sock, request("GET", self.path, accept="text/event-stream", close=False))
            while b"\r\n\r\n" not in received or (received.startswith(b"HTTP/1.1 200 ")
                                                  and len(FRAME.findall(received)) < len(self.ids)):
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    raise ConnectionError(f"{self} closed before its first frame: {received!r}")
                received += data
        self.status = int(received.split(b" ", 2)[1])
        self.established = self.status == 200

    def feed(self, data: bytes):
        self.buffer += data
        while (end := self.buffer.find(b"\n\n")) >= 0:
            frame, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            # Comments (the keep-alive ":") and the retry and id fields carry no value; a frame
            # without data dispatches no event.
            frame = b"\n".join(line for line in frame.split(b"\n")
                               if not line.startswith((b":", b"retry:", b"id:")))
            if not frame:
                continue
            match = (COUNTER_FRAME if self.multi else FRAME).fullmatch(frame)
            if match is None:
                self.errors.append(f"unexpected frame {frame!r}")
                continue
            counter, value = (match[1].decode(), int(match[2])) if self.multi else (self.ids[0], int(match[1]))
            if counter not in self.ids:
                self.errors.append(f"a frame of counter {counter}, which it did not ask for")
                continue
            self.events.append(("value", counter, value))
            self.last[counter] = value
            if not self.established and all(c in self.last for c in self.ids):
                self.established = True
                self.opened.set()

    def close(self):
        self.closed_by_test = True
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()
        if self.sock is not None:
            self.sock.close()

    def check_values(self):
        """Between admin writes its values never decrease, and never start below what was acknowledged
        before it was requested (an admin write in flight while it opened may explain one decrease)."""
        assert not self.errors, f"{self}: {self.errors}"
        for counter in self.ids:
            allowance = len(self.ambiguous[counter])
            previous, skip, deleted = self.floors[counter], None, False
            for index, event in enumerate(self.events):
                if event[1] != counter:
                    continue
                if event[0] == "marker":  # the test saw `old` here, then sent the admin write
                    _, _, kind, old, new = event
                    previous, skip, deleted = new, old, kind == "delete"
                    continue
                value = event[2]
                if value == skip:
                    continue  # the value before the admin write, once more (a listener that drained)
                skip = None
                assert not deleted, f"{self}: counter {counter} sent {value} after it was deleted"
                if previous is not None and value < previous:
                    around = self.values_seen(max(0, index - 8), index + 4)
                    floor = self.floors[counter]
                    below_floor = f" (acknowledged before it was requested: {floor})" if previous == floor else ""
                    assert allowance, (f"{self}: counter {counter} went from {previous} down to {value} with no "
                                       f"admin write in between: ... {around} ...{below_floor}")
                    allowance -= 1
                previous = value


@dataclass
class AdminWrite:
    kind: str  # "put" or "delete"
    counter: str
    value: int | None
    existed: bool
    task: asyncio.Task


# --- one example: a server and what the test knows about it ------------------------------------------

class Example:
    def __init__(self, directory: Path, *, durable: bool, max_listeners: int | None):
        self.durable = durable
        self.max_listeners = max_listeners
        self.data_file = directory / "counters.json"
        self.data_file.write_text(json.dumps(ZEROS))
        args = ["--keepalive-interval", str(KEEPALIVE), "--stall-timeout", "600", "--save-interval", "0.2"]
        if durable:
            args.append("--durable")
        if max_listeners:
            args += ["--max-listeners", str(max_listeners)]
        self.server = Server(self.data_file, *args, env={"LIVECOUNTER_ADMIN_TOKEN": TOKEN})
        self.values = dict(ZEROS)  # every existing counter's acknowledged value
        self.vanished_posts = 0  # POSTs to counter 9 whose client vanished, since its value was last known
        self.posts: list[tuple[str, asyncio.Task]] = []  # not yet checked
        self.admin: list[AdminWrite] = []  # not yet checked
        self.streams: list[Stream] = []  # every stream of this server process, for the value checks
        self.held: list[Stream] = []  # streams the test holds open (or has not seen end yet)
        self.baseline = 0
        self.numbers = iter(range(1, 1_000_000))
        self.step = "start"

    @property
    def port(self):
        return self.server.port

    def fds(self) -> int:
        """Descriptors open, but the journal's: opened at the first save, and held from then on."""
        directory = f"/proc/{self.server.process.pid}/fd"
        return sum(not os.readlink(f"{directory}/{fd}").endswith(".journal") for fd in os.listdir(directory))

    def log_tail(self, lines=25) -> str:
        try:
            text = self.server.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join([line for line in text.splitlines() if "aiohttp.access" not in line][-lines:])

    async def start(self):
        await self.server.start()
        assert (await exchange(self.port, request("GET", "/healthz")))[0] == 200
        previous = None
        for _ in range(40):  # the baseline: the descriptors of a server at rest
            await asyncio.sleep(0.05)
            if (count := self.fds()) == previous:
                break
            previous = count
        self.baseline = count

    async def cleanup(self):
        for stream in self.held:
            stream.close()
        tasks = [task for _, task in self.posts] + [write.task for write in self.admin]
        tasks += [stream.task for stream in self.streams if stream.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        process = getattr(self.server, "process", None)
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def perform(self, operation):
        kind, *args = operation
        await getattr(self, kind)(*args)

    # --- the operations ---

    async def post(self, counter, count, wait):
        await self.finish_admin_writes()
        tasks = [asyncio.create_task(post_once(self.port, counter)) for _ in range(count)]
        self.posts += [(counter, task) for task in tasks]
        if wait:
            await asyncio.wait(tasks)

    async def flood(self, counter, wait):
        await self.finish_admin_writes()
        running = asyncio.Event()
        task = asyncio.create_task(post_sequentially(self.port, counter, FLOOD, running))
        self.posts.append((counter, task))
        await (asyncio.wait([task]) if wait else running.wait())  # the next operation meets it in full swing

    async def put(self, counter, value):
        await self.admin_write("put", counter, value)

    async def delete(self, counter):
        await self.admin_write("delete", counter, None)

    async def admin_write(self, kind, counter, value):
        """Sent once every POST and admin write before it is answered, and every established
        stream of the counter shows its value; it may still be in flight when the next operation
        starts (a POST or an admin write waits for it, a stream doesn't)."""
        await self.settle_posts()
        await self.finish_admin_writes()
        existed = counter in self.values
        old = self.values.get(counter)
        for stream in self.held:
            if counter not in stream.ids or stream.frozen or stream.status not in (None, 200):
                continue
            if stream.established and not stream.ended:
                await self.until_settled([stream], f"before the {kind} of counter {counter}")
                if not stream.ended:
                    stream.events.append(("marker", counter, kind, old, value))
                    if kind == "delete" and existed:
                        stream.deleted_after.add(counter)
            elif not stream.ended:
                stream.ambiguous[counter].append(kind)
                stream.exists[counter].add(kind == "put")
        for stream in self.held:
            if stream.frozen and counter in stream.ids and kind == "delete" and existed:
                stream.deleted_after.add(counter)
        if kind == "put":
            self.values[counter] = value
            data = request("PUT", f"/counters/{counter}/", admin=True, body=json.dumps({"value": value}).encode())
        else:
            self.values.pop(counter, None)
            data = request("DELETE", f"/counters/{counter}/", admin=True)
        self.admin.append(AdminWrite(kind, counter, value, existed, asyncio.create_task(exchange(self.port, data))))

    def new_stream(self, ids, *, multi, version="1.1", frozen=False) -> Stream:
        in_flight = {c: [w for w in self.admin if w.counter == c and not w.task.done()] for c in ids}
        stream = Stream(
            next(self.numbers), tuple(ids), multi, version, frozen,
            floors={c: None if in_flight[c] else self.values.get(c) for c in ids},
            ambiguous={c: [write.kind for write in in_flight[c]] for c in ids},
            # before, between and after the writes in flight (self.values is after them)
            exists={c: {c in self.values, *(w.existed for w in in_flight[c])} for c in ids})
        self.streams.append(stream)
        self.held.append(stream)
        return stream

    async def open(self, counter, version, wait):
        await self.open_streams([counter], multi=False, version=version, wait=wait)

    async def open_multi(self, ids, version, wait):
        await self.open_streams(ids, multi=True, version=version, wait=wait)

    async def open_many(self, counter, count):
        streams = [self.open_streams([counter], multi=False, version="1.1", wait=False) for _ in range(count)]
        await self.until_opened(await asyncio.gather(*streams))

    async def open_streams(self, ids, *, multi, version, wait):
        stream = self.new_stream(ids, multi=multi, version=version)
        stream.task = asyncio.create_task(stream.read(self.port))
        if wait:
            await self.until_opened([stream])
        return stream

    async def until_opened(self, streams):
        try:
            async with within(EVENTUALLY):
                await asyncio.gather(*(stream.opened.wait() for stream in streams))
        except asyncio.TimeoutError:
            pending = [str(stream) for stream in streams if not stream.opened.is_set()]
            raise AssertionError(f"no status and first frames within {EVENTUALLY} s: {pending}") from None

    async def frozen(self, counter, fill):
        await self.finish_admin_writes()
        stream = self.new_stream([counter], multi=False, frozen=True)
        await stream.open_frozen(self.port)
        if stream.status != 200:
            self.check_refusal(stream)
            stream.close()
            self.held.remove(stream)
        if fill:
            await self.flood(counter, True)

    async def close(self, index):
        if self.held:
            stream = self.held.pop(index % len(self.held))
            stream.close()

    async def vanish(self, what, counter, reset):
        """A client that sends its request and is gone at once (with a reset if `reset`)."""
        if what == "post":
            data = request("POST", f"/counters/{VANISHING}/")
            self.vanished_posts += 1
        else:
            path = f"/counters/?ids={counter},{VANISHING}" if what == "multi" else f"/counters/{counter}/"
            data = request("GET", path, accept="text/event-stream", close=False)
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            await loop.sock_sendall(sock, data)
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def pause(self, seconds):
        await asyncio.sleep(seconds)

    async def restart(self):
        """SIGTERM, possibly among POSTs and stream openings: exit 0, every acknowledged write in the
        file, every stream ended with its last chunk; then the same command on the same file."""
        await self.finish_admin_writes()
        assert await self.server.stop(timeout=10) == 0, "SIGTERM: the exit code"
        readers = [stream.task for stream in self.held if stream.task is not None]
        if readers:
            await asyncio.wait(readers, timeout=EVENTUALLY)
        ranges = await self.settle_posts(shutting_down=True)
        saved = json.loads(self.data_file.read_text())
        self.check_counters(saved, "the data file after SIGTERM", ranges)
        for stream in self.held:
            if not stream.frozen and stream.established:
                assert stream.ended and stream.clean_end, f"{stream}: not ended with its last chunk on SIGTERM"
            stream.close()
        self.held = []
        self.check_stream_values()
        self.streams = []
        self.values, self.vanished_posts = saved, 0
        await self.start()

    async def quiesce(self):
        """Let everything in flight finish, then check every invariant."""
        await self.settle_posts()
        await self.finish_admin_writes()
        await self.until_opened([stream for stream in self.held if not stream.frozen])
        for stream in list(self.held):
            if stream.status != 200:
                self.check_refusal(stream)
                self.held.remove(stream)
        await self.until_settled([stream for stream in self.held if not stream.frozen], "once quiet")
        for stream in list(self.held):
            if stream.ended:
                assert stream.may_end(), f"{stream}: ended, but its counters exist"
                assert stream.clean_end, f"{stream}: ended without its last chunk"
                self.held.remove(stream)
        self.check_stream_values()
        listening = [stream for stream in self.held if not stream.deleted_after]
        if self.max_listeners:
            assert len(listening) <= self.max_listeners, (
                f"{len(listening)} streams open with --max-listeners {self.max_listeners}: "
                + "; ".join(map(str, listening)))
        await self.check_listeners_and_fds(len(listening))
        status, body = await exchange(self.port, request("GET", "/counters/", accept="application/json"))
        assert status == 200
        self.check_counters(json.loads(body), "GET /counters/ once quiet")
        if self.durable:
            self.check_counters(saved_values(self.data_file), "the data file and journal (--durable) once quiet")

    async def finish(self):
        await self.quiesce()
        for stream in self.held:
            stream.close()
        self.held = []
        await self.check_listeners_and_fds(0)
        assert await self.server.stop(timeout=10) == 0, "SIGTERM: the exit code"
        self.check_counters(json.loads(self.data_file.read_text()), "the data file after SIGTERM")

    # --- bookkeeping and checks ---

    async def settle_posts(self, *, shutting_down=False) -> dict[str, tuple[int, int]]:
        """Check the answers of the POSTs sent so far and count them in. Between admin writes the
        answers to a counter's POSTs are the values after it, each once; a POST that failed because
        the server was stopping leaves the value a range (returned), the file then tells."""
        if not self.posts:
            return {}
        await asyncio.wait([task for _, task in self.posts])
        answers: dict[str, list] = {}
        for counter, task in self.posts:
            answers.setdefault(counter, []).extend(task.result())
        self.posts = []
        ranges = {}
        for counter, answered in answers.items():
            unanswered = [(status, why) for status, why in answered if status is None or status == 503]
            assert shutting_down or not unanswered, f"POSTs to counter {counter} failed: {unanswered[:3]}"
            if counter not in self.values:
                wrong = [answer for answer in answered if answer[0] != 404 and answer not in unanswered]
                assert not wrong, f"POSTs to deleted counter {counter} answered {wrong[:3]}"
                continue
            base = self.values[counter]
            acknowledged = sorted(value for status, value in answered if status == 200)
            wrong = [answer for answer in answered if answer[0] != 200 and answer not in unanswered]
            assert not wrong, f"POSTs to counter {counter} (at {base}) answered {wrong[:3]}"
            if not unanswered:
                assert acknowledged == list(range(base + 1, base + len(acknowledged) + 1)), (
                    f"the {len(acknowledged)} POSTs to counter {counter} at {base} answered {acknowledged}")
                self.values[counter] = base + len(acknowledged)
            else:
                assert len(set(acknowledged)) == len(acknowledged), f"counter {counter}: {acknowledged}"
                assert all(base < value <= base + len(answered) for value in acknowledged), (
                    f"POSTs to counter {counter} at {base} answered {acknowledged}")
                ranges[counter] = (max([base + len(acknowledged), *acknowledged]), base + len(answered))
        return ranges

    async def finish_admin_writes(self):
        if not self.admin:
            return
        await asyncio.wait([write.task for write in self.admin])
        for write in self.admin:
            status, body = write.task.result()
            if write.kind == "put":
                assert (status, body) == (200, b"%d\n" % write.value), f"PUT {write}: {status} {body!r}"
            else:
                assert status == (204 if write.existed else 404), f"DELETE {write}: {status} {body!r}"
        self.admin = []

    def settled(self, stream: Stream) -> bool:
        if stream.ended:
            return True
        if stream.must_end():
            return False
        return all(c in self.values and stream.last.get(c) == self.values[c] for c in stream.ids)

    async def until_settled(self, streams, when):
        """Each stream ends on every counter's current value, or has ended if its counter is gone."""
        if await eventually(lambda: all(self.settled(stream) for stream in streams)):
            return
        lines = []
        for stream in streams:
            if not self.settled(stream):
                want = "to end" if stream.must_end() else (
                    "values " + ", ".join(f"{c}={self.values.get(c, 'deleted')}" for c in stream.ids))
                lines.append(f"{stream}: {want}")
        raise AssertionError(f"{when}, after {EVENTUALLY} s: " + "; ".join(lines))

    def check_refusal(self, stream: Stream):
        allowed = set()
        if all(True in stream.exists[c] for c in stream.ids):
            allowed |= {200, 503} if self.max_listeners else {200}
        if any(False in stream.exists[c] for c in stream.ids):
            allowed.add(404)
        assert stream.status in allowed, f"{stream}: expected a status in {sorted(allowed)}"

    def check_stream_values(self):
        for stream in self.streams:
            if not stream.frozen:
                stream.check_values()

    def check_counters(self, actual: dict, where: str, ranges=None):
        actual = dict(actual)
        expected = dict(self.values)
        low = expected.pop(VANISHING)
        value = actual.pop(VANISHING, None)
        assert value is not None and low <= value <= low + self.vanished_posts, (
            f"{where}: counter {VANISHING} is {value}, expected {low}..{low + self.vanished_posts}")
        for counter, (low, high) in (ranges or {}).items():
            assert low <= actual.get(counter, low - 1) <= high, (
                f"{where}: counter {counter} is {actual.get(counter)}, expected {low}..{high} "
                f"(the highest acknowledged, up to every POST sent)")
            actual.pop(counter)
            expected.pop(counter)
        assert actual == expected, f"{where}: {actual}, expected {expected}"

    async def listeners(self) -> int:
        status, body = await exchange(self.port, request("GET", "/metrics"))
        assert status == 200
        return int(float(re.search(rb"(?m)^livecounter_listeners (\S+)$", body)[1]))

    async def check_listeners_and_fds(self, open_streams):
        """livecounter_listeners is the number of streams open; the server holds one descriptor each."""
        async def listeners_right():
            return await self.listeners() == open_streams
        if not await eventually(listeners_right):
            raise AssertionError(f"livecounter_listeners is {await self.listeners()}, the test holds "
                                 f"{open_streams} streams open: " + "; ".join(map(str, self.held)))
        expected = self.baseline + open_streams
        if not await eventually(lambda: self.fds() == expected):
            fds = sorted(os.readlink(f"/proc/{self.server.process.pid}/fd/{fd}")
                         for fd in os.listdir(f"/proc/{self.server.process.pid}/fd"))
            raise AssertionError(f"the server has {self.fds()} descriptors open, expected {expected} "
                                 f"({self.baseline} at rest + {open_streams} streams): {fds}; streams held: "
                                 + "; ".join(map(str, self.held)))


async def eventually(predicate, timeout=EVENTUALLY) -> bool:
    """Whether predicate() comes true within timeout; the caller says what went wrong."""
    try:
        await wait_until(predicate, timeout)
    except AssertionError:
        return False
    return True
