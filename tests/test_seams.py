"""The seams between livecounter's receivers, under random interleavings: streams, presence, the cache
purger and the GRIP publisher driven together while the parts outside fail and come back.

Hypothesis draws a list of operations; each example runs them, one after the other, against the
in-process app (create_app) behind a real socket (aiohttp's TestServer), in an event loop of its own,
with --auto-create (a small --max-counters), an admin token, two fake Pushpins (publish endpoints)
and a fake cache (it takes PURGEs). The operations:

* POSTs (a few at once), admin PUTs and DELETEs on counters that exist (`1`, `2`), on ids
  --auto-create makes (`a`, `b`; with --max-counters 3 only one of them at a time), and on ids
  deleted then made again;
* direct streams opened and closed: a counter's (`/counters/ID/`), several counters'
  (`/counters/?ids=…`, with and without `&watchers=1`) and a watcher count's
  (`/counters/ID/watchers/`); and stream requests as Pushpin sends them (`Grip-Sig`), which the
  app answers with hold instructions and whose channels it keeps ids of on purpose (~100 s);
* each fake switched between answering, failing (500), hanging (past livecounter's timeouts,
  shortened to 0.3 s; what it was sent is never applied) and refusing connections (it stops
  listening), and back; and short sleeps, so that timeouts and retries land among the rest.

Then every fake answers again and, the streams kept open, the test waits (at most QUIET seconds) for
all of these to hold at once:

* each fake Pushpin's latest content on a counter's value channels (`counter-ID`, `counters:ID`) is
  its value; a counter deleted (and not made again) got `close` as the latest action on each of its
  four channels; a watcher count's latest published count, if any, is the real one
  (`GET /counters/ID/watchers/`); publish ids grow on each channel and a prev-id names an id that
  Pushpin was sent (or `.0`); and after every deletion a `close` comes on each channel before any
  value of what was made again (Pushpin's held streams of a deleted counter must end);
* the cache was purged of each changed counter's path after its last change (and of its watcher
  count's path after a deletion);
* the watcher counts are the open streams carrying each counter; /metrics says no state is left
  behind: `livecounter_listeners` is the open streams, `livecounter_watched_counters` the counters
  they carry, `livecounter_grip_unpublished_counters` and `livecounter_unpurged_paths` 0, and
  `livecounter_grip_channels` the channels held through Pushpin lately (none but those);
* every open stream ends on its counters' latest values and counts, every stream of a deleted
  counter was ended by the server, and on every stream values never went backwards between admin
  writes (each stream's first values are the current ones);
* /healthz answers 200 `ok`.

A failure notes the steps as they ran (with what each got) and the app's log. A count or a close that
goes missing depends on timing, so a failing example may pass when hypothesis runs it again (it then
says the test is flaky, with the first failure's notes). LIVECOUNTER_SEAMS_EXAMPLES sets the number of
examples (default 15: ~10 s here, an example taking ~0.5 s; a failing one takes QUIET seconds more);
LIVECOUNTER_SEAMS_SHRINK=1 shrinks a failing example (minutes). The examples it found, shrunk, are
test_examples_the_seams_test_found's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import livecounter
from tests.helpers import free_port, wait_until, within

TOKEN = "seams-token"
EXISTING = ("1", "2")  # in the data file
ANONYMOUS = ("a", "b")  # made by --auto-create (or a PUT)
POOL = EXISTING + ANONYMOUS
MAX_COUNTERS = 3  # so that --auto-create can make only one of ANONYMOUS while both of EXISTING exist
TIMEOUT = 0.3  # seconds: livecounter's publish and purge timeouts here
HANG = 30  # seconds a hanging fake holds a request (never applied), unless switched or stopped first
EVENTUALLY = 3.0  # seconds for what must happen soon while the fakes do whatever they do
QUIET = 4.0  # seconds for everything to settle once every fake answers again
EXAMPLE_TIMEOUT = 90  # seconds: an example that hangs fails instead of hanging the run
EXAMPLES = int(os.environ.get("LIVECOUNTER_SEAMS_EXAMPLES", "15"))
SHRINK = os.environ.get("LIVECOUNTER_SEAMS_SHRINK", "") not in ("", "0")  # shrink a failing example (minutes)
MODES = ("answer", "fail", "hang", "refuse")
SSE = {"Accept": "text/event-stream"}
GRIP_KEY = "seams-grip-key-of-at-least-32-bytes"  # Pushpin's sig_key


# --- the fakes ----------------------------------------------------------------------------------------

class FakeEndpoint:
    """An HTTP endpoint on a port of its own that answers, fails (500), hangs (past livecounter's
    timeout: what it was sent is never applied) or refuses connections (it stops listening, and drops
    the connections it has), as the test switches it."""

    def __init__(self, name: str):
        self.name = name
        self.mode = "answer"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self._release = asyncio.Event()  # set: hanging requests let go
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> FakeEndpoint:
        app = web.Application()
        self.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen()
        return self

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def switch(self, mode: str) -> None:
        if mode == self.mode:
            return
        if self.mode == "refuse":
            await self._listen()
        if self.mode == "hang":
            self._release.set()
            self._release = asyncio.Event()
        if mode == "refuse":
            await self._site.stop()
            self._drop_connections()
        self.mode = mode

    def _drop_connections(self) -> None:
        for handler in self._runner.server.connections:
            if handler.transport is not None:
                handler.transport.abort()

    async def answer(self, request: web.Request, apply) -> web.Response:
        """The answer to a request, as the mode says; apply() records what it carried (answer only)."""
        mode = self.mode
        if mode == "answer":
            apply()
            return web.Response(text="Published\n")
        if mode == "hang":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._release.wait(), HANG)
            return web.Response(status=503, text="hung: not applied\n")
        if mode == "refuse" and request.transport is not None:  # a connection opened before it stopped
            request.transport.abort()
        return web.Response(status=500, text="failing on purpose\n")

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            self._drop_connections()
            await self._runner.cleanup()


@dataclass
class Record:
    """One item a fake Pushpin applied, in the order it applied them."""

    kind: str  # "content", "close" or "hint"
    text: str | None  # the content
    number: int | None  # of its id ("<epoch>.<n>")


def id_number(publish_id: str | None, epochs: set[str]) -> int | None:
    if publish_id is None:
        return None
    epoch, _, number = publish_id.partition(".")
    epochs.add(epoch)
    return int(number)


class FakePushpin(FakeEndpoint):
    """A publish endpoint (POST /publish/): per channel, every item it applied."""

    def __init__(self, name: str):
        super().__init__(name)
        self.records: dict[str, list[Record]] = {}
        self.epochs: set[str] = set()
        self.problems: list[str] = []  # ids that don't follow

    def add_routes(self, app: web.Application) -> None:
        async def publish(request: web.Request) -> web.Response:
            items = (await request.json())["items"]
            return await self.answer(request, lambda: self.apply(items))
        app.router.add_post("/publish/", publish)

    def apply(self, items: list[dict]) -> None:
        for item in items:
            channel, content = item["channel"], item["formats"]["http-stream"]
            kind = "content" if "content" in content else content.get("action")
            if kind not in ("content", "close", "hint"):
                self.problems.append(f"an item of {channel} that is no content, close or hint: {item}")
                continue
            number, previous = id_number(item.get("id"), self.epochs), id_number(item.get("prev-id"), self.epochs)
            records = self.records.setdefault(channel, [])
            if kind == "content":
                if number is None or previous is None:
                    self.problems.append(f"{channel}: content without an id and a prev-id: {item}")
                seen = [record.number for record in records if record.number is not None]
                if number is not None and number in seen:
                    continue  # Pushpin drops an id it saw (a publish applied whose answer was lost)
                if number is not None and seen and number < seen[-1]:
                    self.problems.append(f"{channel}: id {number} after {seen[-1]}: {item}")
                if previous not in (None, 0, *seen):
                    self.problems.append(f"{channel}: prev-id {previous} is no id it was sent ({seen[-5:]})")
            elif "id" in item or "prev-id" in item:
                self.problems.append(f"{channel}: a {kind} with an id: {item}")
            records.append(Record(kind, content.get("content"), number))

    def latest(self, channel: str) -> str | None:
        """The content (or "close") last applied on the channel: hints change nothing. None: nothing."""
        for record in reversed(self.records.get(channel, [])):
            if record.kind != "hint":
                return record.text if record.kind == "content" else "close"
        return None

    def shown(self, channel: str, last: int = 8) -> str:
        records = self.records.get(channel, [])
        return " ".join(f"{(record.text or '').split('data: ')[-1].strip() or record.kind}#{record.number}"
                        for record in records[-last:])


class FakeCache(FakeEndpoint):
    """A cache in front that takes PURGE of any path: when each path was purged."""

    def __init__(self, name: str):
        super().__init__(name)
        self.purged: dict[str, list[float]] = {}

    def add_routes(self, app: web.Application) -> None:
        async def purge(request: web.Request) -> web.Response:
            return await self.answer(request, lambda: self.purged.setdefault(request.path, []).append(time.monotonic()))
        app.router.add_route("PURGE", "/{path:.*}", purge)


def value_content(counter: str, value: int, *, multi: bool) -> str:
    if multi:
        return f'event: counter\ndata: {{"id": "{counter}", "value": {value}}}\n\n'
    return f"event: message\ndata: {value}\n\n"


COUNT_CONTENT = re.compile(r'event: (?:message\ndata: (\d+)|watchers\ndata: \{"id": "[^"]+", "watchers": (\d+)\})\n\n')


# --- streams ------------------------------------------------------------------------------------------

FRAME = re.compile(r"event: (message|counter|watchers)\ndata: (.*)")
KINDS = ("single", "multi", "multi+watchers", "watchers")


@dataclass(eq=False)
class Stream:
    """A direct stream the test opened, and what it was sent."""

    number: int
    kind: str  # one of KINDS
    ids: tuple[str, ...]
    response: aiohttp.ClientResponse | None = None
    task: asyncio.Task | None = None
    events: list[tuple] = field(default_factory=list)  # ("value"|"count", id, n), ("marker", id, what, old, new)
    values: dict[str, int] = field(default_factory=dict)  # the latest value per counter
    counts: dict[str, int] = field(default_factory=dict)  # the latest watcher count per counter
    errors: list[str] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)  # its first frames came (or it ended)
    ended: bool = False  # the server ended it
    clean_end: bool = False  # ... with its last chunk, and no partial frame
    closed: bool = False  # the test closed it

    @property
    def path(self) -> str:
        if self.kind == "single":
            return f"/counters/{self.ids[0]}/"
        if self.kind == "watchers":
            return f"/counters/{self.ids[0]}/watchers/"
        return f"/counters/?ids={','.join(self.ids)}" + ("&watchers=1" if self.kind == "multi+watchers" else "")

    @property
    def carries_values(self) -> bool:
        return self.kind != "watchers"

    @property
    def carries_counts(self) -> bool:
        return self.kind in ("watchers", "multi+watchers")

    def __repr__(self) -> str:
        state = ("closed by the test" if self.closed else "ended" if self.ended else "open")
        shown = " ".join(f"|{e[2]} {e[3]}->{e[4]}|" if e[0] == "marker" else
                         f"{e[1]}:{'w' if e[0] == 'count' else ''}{e[2]}" for e in self.events[-16:])
        return f"stream #{self.number} {self.path} ({state}; last frames: {shown})"

    async def read(self) -> None:
        buffer = ""
        try:
            async for data in self.response.content.iter_any():
                buffer += data.decode()
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    self.parse(block)
            self.clean_end = not buffer
        except (aiohttp.ClientError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            if not self.closed:
                self.ended = True
            self.first.set()

    def parse(self, block: str) -> None:
        block = "\n".join(line for line in block.split("\n") if not line.startswith((":", "retry:")))
        if not block:
            return
        match = FRAME.fullmatch(block)
        if match is None:
            self.errors.append(f"a frame that is none of its events: {block!r}")
            return
        event, data = match[1], match[2]
        if event == "message" and self.kind in ("single", "watchers"):
            what, counter, number = ("count" if self.kind == "watchers" else "value"), self.ids[0], int(data)
        elif event == "counter" and self.kind.startswith("multi"):
            parsed = json.loads(data)
            what, counter, number = "value", parsed["id"], parsed["value"]
        elif event == "watchers" and self.kind == "multi+watchers":
            parsed = json.loads(data)
            what, counter, number = "count", parsed["id"], parsed["watchers"]
        else:
            self.errors.append(f"a {event!r} event on a {self.kind} stream: {block!r}")
            return
        if counter not in self.ids:
            self.errors.append(f"a frame of counter {counter}, which it did not ask for")
            return
        self.events.append((what, counter, number))
        (self.values if what == "value" else self.counts)[counter] = number
        if all(c in self.values for c in self.ids if self.carries_values) and (
                not self.carries_counts or all(c in self.counts for c in self.ids)):
            self.first.set()

    def close(self) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        if self.response is not None:
            self.response.close()

    def went_backwards(self) -> list[str]:
        """Values never decrease between admin writes (a marker: the test saw `old`, then sent the write)."""
        problems = []
        for counter in self.ids:
            previous, skip = None, None
            for event in self.events:
                if event[1] != counter or event[0] == "count":
                    continue
                if event[0] == "marker":
                    previous, skip = event[4], event[3]
                    continue
                if event[2] == skip:
                    continue  # the value before the admin write, once more
                skip = None
                if previous is not None and event[2] < previous:
                    problems.append(f"{self}: counter {counter} went from {previous} down to {event[2]}")
                previous = event[2]
        return problems


# --- operations -------------------------------------------------------------------------------------

counter_ids = st.sampled_from(POOL)
modes = st.sampled_from(MODES)
stream_targets = st.one_of(
    st.tuples(st.sampled_from(["single", "watchers"]), counter_ids.map(lambda counter: (counter,))),
    st.tuples(st.sampled_from(["multi", "multi+watchers"]),
              st.lists(counter_ids, min_size=1, max_size=3, unique=True).map(tuple)))
OPERATIONS = [  # (weight, the operation: its name, then its arguments)
    (4, st.tuples(st.just("post"), counter_ids, st.integers(1, 4))),  # that many at once
    (5, stream_targets.map(lambda target: ("open", *target))),
    (3, st.tuples(st.just("close"), st.integers(0, 7))),  # the n-th stream open (modulo)
    (3, st.tuples(st.just("pushpin"), st.sampled_from([0, 1]), modes)),
    (2, st.tuples(st.just("cache"), modes)),
    (2, st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.05, 0.2, 0.5]))),
    (2, st.tuples(st.just("put"), counter_ids, st.integers(0, 30))),
    (2, st.tuples(st.just("delete"), counter_ids)),
    (1, stream_targets.map(lambda target: ("held", *target))),  # a stream request through Pushpin (Grip-Sig)
]
operation = st.one_of(*(strategy for weight, strategy in OPERATIONS for _ in range(weight)))
operation_lists = st.lists(operation, min_size=6, max_size=25)


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True, report_multiple_bugs=False,
          # A failing example takes QUIET seconds, so shrinking one takes minutes: only when asked. The
          # steps of the first failing example are noted as they ran, which is readable unshrunk.
          phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else []),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=operation_lists)
def test_seams_hold_while_pushpins_and_caches_fail_and_come_back(ops):
    asyncio.run(run_example(ops))


# Examples it found, shrunk: each fails on a defect of livecounter.py, every time (see tests/README.md).
FOUND = {
    # A stream of a watcher count that opens while presence holds back a count (the counter's streams
    # came and went within a rest) starts from the count of that moment, then presence, finding the
    # count back at the one it sent, sends nothing: the stream shows 2 for good, the count is 1.
    "a new count stream keeps a count that presence never sent": [
        ("open", "single", ("1",)), ("open", "single", ("1",)), ("open", "watchers", ("1",)), ("close", 1)],
    "a multi-counter stream with watchers=1 keeps a count that presence never sent": [
        ("open", "single", ("1",)), ("open", "multi+watchers", ("1",)), ("close", 0)],
    # A deletion's close waiting for a Pushpin (failing, or behind a request in flight) is replaced by
    # the next value of its channel (a POST that makes the id again, a new watcher count): that Pushpin
    # never ends the streams it holds on the deleted counter, which go on with the new counter's values.
    "a deletion's close is lost to a value made again while a Pushpin fails": [
        ("pushpin", 0, "fail"), ("delete", "1"), ("sleep", 0.2), ("post", "1", 1)],
    "a deletion's close is lost to a new watcher count while a Pushpin fails": [
        ("open", "single", ("2",)), ("sleep", 0.2), ("pushpin", 0, "fail"), ("delete", "2"), ("sleep", 0.2),
        ("open", "single", ("2",))],
}


@pytest.mark.parametrize("ops", FOUND.values(), ids=FOUND.keys())
def test_examples_the_seams_test_found(ops):
    asyncio.run(run_example(ops))


async def run_example(ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory(prefix="livecounter-seams-") as directory, short_timeouts(), \
            captured_log() as log_lines:
        example = Example(Path(directory))
        try:
            async with within(EXAMPLE_TIMEOUT):
                await example.start()
                for number, op in enumerate(ops):
                    example.step(f"{number}: {op}")
                    await example.perform(op)
                example.step("the end: every fake answers")
                await example.finish()
        except BaseException:
            say = note if currently_in_test_context() else print  # print: a regression test's captured output
            say("steps:\n  " + "\n  ".join(example.steps))
            say("app log:\n  " + "\n  ".join(log_lines[-40:]))
            raise
        finally:
            await example.cleanup()


@contextlib.contextmanager
def short_timeouts():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(livecounter, "PUBLISH_TIMEOUT", TIMEOUT)
        patch.setattr(livecounter, "PURGE_TIMEOUT", TIMEOUT)
        patch.setattr(livecounter, "LAST_RETRY_DELAY", 0.5)  # retries catch up within half a second
        patch.setattr(livecounter, "SECOND_PURGE_DELAY", 0.2)
        yield


@contextlib.contextmanager
def captured_log():
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(f"{record.created % 1000:8.3f} {record.levelname} {record.getMessage()}")
    logger, handler = logging.getLogger("livecounter"), Collect(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- one example: the app, the fakes, and what the test knows -----------------------------------------

class Example:
    def __init__(self, directory: Path):
        self.data_file = directory / "counters.json"
        self.data_file.write_text(json.dumps(dict.fromkeys(EXISTING, 0)))
        self.values = dict.fromkeys(EXISTING, 0)  # every counter that exists, and its value
        self.pushpins = [FakePushpin("pushpin A"), FakePushpin("pushpin B")]
        self.cache = FakeCache("the cache")
        self.client: TestClient | None = None
        self.open_streams: list[Stream] = []  # open, as far as the test knows
        self.ending: list[Stream] = []  # their counter was deleted: the server ends them
        self.streams: list[Stream] = []  # every stream, for the values check
        self.numbers = iter(range(1, 1_000_000))
        self.changed_at: dict[str, float] = {}  # counter -> when its last acknowledged change was sent
        self.deleted_at: dict[str, float] = {}  # counter -> when its last deletion (204) was sent
        self.deletions: list[tuple[str, int]] = []  # (counter, the publisher's last publish number then)
        self.held: dict[livecounter.Key, float] = {}  # channel -> when a stream was last held on it
        self.counted_while_gone: set[str] = set()  # ids whose watcher count moved while they didn't exist
        self.steps: list[str] = []

    def step(self, text: str) -> None:
        self.steps.append(text)

    def said(self, text: str) -> None:
        self.steps[-1] += f" -> {text}"

    @property
    def fakes(self) -> list[FakeEndpoint]:
        return [*self.pushpins, self.cache]

    async def start(self) -> None:
        for fake in self.fakes:
            await fake.start()
        app = livecounter.create_app(
            self.data_file, grip_urls=tuple(pushpin.url for pushpin in self.pushpins), purge_urls=(self.cache.url,),
            grip_key=GRIP_KEY, admin_token=TOKEN, auto_create=True, max_counters=MAX_COUNTERS)
        self.app = app
        self.client = TestClient(TestServer(app, host="127.0.0.1"))
        await self.client.start_server()

    async def cleanup(self) -> None:
        for stream in self.streams:
            stream.close()
        await asyncio.gather(*(stream.task for stream in self.streams if stream.task), return_exceptions=True)
        for fake in self.fakes:
            with contextlib.suppress(OSError):  # its port taken meanwhile: the app's stop gives up on it
                await fake.switch("answer")  # so that the app's last publishes on its stop go at once
        if self.client is not None:
            await self.client.close()
        for fake in self.fakes:
            await fake.stop()

    async def perform(self, op: tuple) -> None:
        name, *arguments = op
        await getattr(self, f"do_{name}")(*arguments)

    # --- the operations ---

    async def do_post(self, counter: str, count: int) -> None:
        existed = counter in self.values
        sent = time.monotonic()
        responses = await asyncio.gather(*(self.client.post(f"/counters/{counter}/") for _ in range(count)))
        answers = [(response.status, await response.text()) for response in responses]
        self.said(str(answers))
        if not existed and len(self.values) >= MAX_COUNTERS:
            assert all(status == 403 for status, _ in answers), (
                f"POSTs to {counter} past --max-counters {MAX_COUNTERS}: {answers}")
            return
        base = self.values.get(counter, 0)
        assert all(status == 200 for status, _ in answers), f"POSTs to {counter} at {base}: {answers}"
        assert sorted(int(text) for _, text in answers) == list(range(base + 1, base + count + 1)), (
            f"POSTs to {counter} at {base}: {answers}")
        self.values[counter] = base + count
        self.changed_at[counter] = sent

    async def do_put(self, counter: str, value: int) -> None:
        await self.before_admin_write(counter, "put", value)
        sent = time.monotonic()
        response = await self.client.put(f"/counters/{counter}/", json={"value": value}, headers=self.admin)
        text = await response.text()
        self.said(f"{response.status} {text.strip()}")
        assert (response.status, text) == (200, f"{value}\n"), f"PUT {counter} {value}: {response.status} {text!r}"
        self.values[counter] = value
        self.changed_at[counter] = sent

    async def do_delete(self, counter: str) -> None:
        existed = counter in self.values
        await self.before_admin_write(counter, "delete", None)
        sent = time.monotonic()
        response = await self.client.delete(f"/counters/{counter}/", headers=self.admin)
        # The publisher's last publish number now: the deletion's close has it or a lower one (read with
        # no await since the answer: only this test's operations change counter's channels).
        number = self.app[livecounter.GRIP]._count
        self.said(str(response.status))
        assert response.status == (204 if existed else 404), f"DELETE {counter}: {response.status}"
        if not existed:
            return
        del self.values[counter]
        self.changed_at[counter] = self.deleted_at[counter] = sent
        self.deletions.append((counter, number))
        for stream in [stream for stream in self.open_streams if counter in stream.ids]:
            self.open_streams.remove(stream)
            self.ending.append(stream)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    async def before_admin_write(self, counter: str, what: str, value: int | None) -> None:
        """Every open stream of the counter shows its value first, then the marker its check starts over at."""
        carrying = [stream for stream in self.open_streams if counter in stream.ids and stream.carries_values]
        try:
            await wait_until(lambda: all(stream.values.get(counter) == self.current(counter) for stream in carrying),
                             EVENTUALLY)
        except AssertionError:
            raise AssertionError(f"before the {what} of {counter}, its streams don't show {self.current(counter)} "
                                 f"within {EVENTUALLY} s: {carrying}") from None
        for stream in carrying:
            stream.events.append(("marker", counter, what, self.current(counter), value))

    def current(self, counter: str) -> int:
        """The counter's value as a stream shows it (0 for an id --auto-create would make)."""
        return self.values.get(counter, 0)

    async def do_open(self, kind: str, ids: tuple[str, ...]) -> None:
        stream = Stream(next(self.numbers), kind, ids)
        self.streams.append(stream)
        async with within(EVENTUALLY):
            stream.response = await self.client.get(stream.path, headers=SSE)
        assert stream.response.status == 200, f"{stream}: {stream.response.status} {await stream.response.text()}"
        stream.task = asyncio.create_task(stream.read())
        try:
            await asyncio.wait_for(stream.first.wait(), EVENTUALLY)
        except asyncio.TimeoutError:
            raise AssertionError(f"{stream}: no first frames within {EVENTUALLY} s") from None
        assert not stream.ended, f"{stream}: ended at once"
        self.said(f"#{stream.number}")
        if stream.carries_values:
            first = {counter: stream.values[counter] for counter in ids}
            assert first == {counter: self.current(counter) for counter in ids}, f"{stream}: first values {first}"
            self.counted_while_gone.update(counter for counter in ids if counter not in self.values)
        self.open_streams.append(stream)

    async def do_close(self, index: int) -> None:
        if self.open_streams:
            stream = self.open_streams.pop(index % len(self.open_streams))
            self.said(f"#{stream.number}")
            stream.close()
            if stream.carries_values:
                self.counted_while_gone.update(counter for counter in stream.ids if counter not in self.values)

    async def do_held(self, kind: str, ids: tuple[str, ...]) -> None:
        """A stream request as Pushpin sends it: answered with the first frames and the hold."""
        stream = Stream(next(self.numbers), kind, ids)
        signature = jwt.encode({"iss": "pushpin", "exp": int(time.time()) + 3600}, GRIP_KEY, algorithm="HS256")
        response = await self.client.get(stream.path, headers={**SSE, "Grip-Sig": signature})
        body = await response.text()
        assert response.status == 200 and response.headers.get("Grip-Hold") == "stream", (
            f"held {stream.path}: {response.status} {dict(response.headers)} {body!r}")
        for block in body.split("\n\n")[:-1]:
            stream.parse(block)
        assert not stream.errors, f"held {stream.path}: {stream.errors}"
        if stream.carries_values:
            assert stream.values == {counter: self.current(counter) for counter in ids}, f"held {stream.path}: {body!r}"
        now = time.monotonic()
        for counter in ids:
            if stream.carries_values:
                self.held[livecounter.Key((counter, False))] = now
            if stream.carries_counts:
                self.held[livecounter.Key((counter, True))] = now

    async def do_pushpin(self, which: int, mode: str) -> None:
        await self.pushpins[which].switch(mode)

    async def do_cache(self, mode: str) -> None:
        await self.cache.switch(mode)

    async def do_sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    # --- the end: everything settles, and every invariant holds ---

    async def finish(self) -> None:
        for fake in self.fakes:
            await fake.switch("answer")
        problems: list[str] = []

        async def quiet():
            problems[:] = await self.problems()
            return not problems
        began = time.monotonic()
        try:
            await wait_until(quiet, QUIET)
            self.quiet_after = time.monotonic() - began
            self.said(f"quiet after {self.quiet_after:.2f} s")
        except AssertionError:
            raise AssertionError(f"{QUIET} s after every fake answers again:\n  " + "\n  ".join(problems)) from None
        problems = [problem for stream in self.streams for problem in stream.went_backwards()]
        assert not problems, "\n  ".join(problems)

    def count(self, counter: str) -> int:
        """The open streams carrying the counter's values."""
        return sum(counter in stream.ids and stream.carries_values for stream in self.open_streams)

    async def problems(self) -> list[str]:
        problems = []
        # the streams
        for stream in self.ending:
            if not stream.ended:
                problems.append(f"{stream}: not ended, though a counter of it was deleted")
            elif not stream.clean_end:
                problems.append(f"{stream}: ended without its last chunk (or amid a frame)")
        counts = {}
        for counter in POOL:
            response = await self.client.get(f"/counters/{counter}/watchers/")
            counts[counter] = int(await response.text())
            if counts[counter] != self.count(counter):
                problems.append(f"GET /counters/{counter}/watchers/ says {counts[counter]}, "
                                f"{self.count(counter)} open streams carry it")
        for stream in self.open_streams:
            if stream.ended:
                problems.append(f"{stream}: ended, though its counters exist")
            if stream.errors:
                problems.append(f"{stream}: {stream.errors}")
            for counter in stream.ids:
                if stream.carries_values and stream.values.get(counter) != self.current(counter):
                    problems.append(f"{stream}: counter {counter} is at {self.current(counter)}")
                if stream.carries_counts and stream.counts.get(counter) != counts[counter]:
                    problems.append(f"{stream}: counter {counter}'s watcher count is {counts[counter]}")
        # what the app keeps
        metrics = await self.metrics()
        expected = {"listeners": len(self.open_streams),
                    "watched_counters": sum(self.count(counter) > 0 for counter in POOL),
                    "grip_unpublished_counters": 0, "unpurged_paths": 0}
        for name, value in expected.items():
            if metrics[name] != value:
                problems.append(f"livecounter_{name} is {metrics[name]}, expected {value}")
        # Channels held through Pushpin are kept (~100 s, longer than an example). A deletion's close lets
        # them go once it went out, or not if the counter was made again meanwhile; and a stream held
        # before that close went out is ended by it, so its channel may go too.
        kept = {key for key in self.held if key.counter_id not in self.deleted_at}
        if not len(kept) <= metrics["grip_channels"] <= len(self.held):
            problems.append(f"livecounter_grip_channels is {metrics['grip_channels']}, expected "
                            f"{len(kept)}..{len(self.held)}: held {sorted(self.held)}, of counters never deleted "
                            f"{sorted(kept)}")
        response = await self.client.get("/healthz")
        if (response.status, await response.text()) != (200, "ok\n"):
            problems.append(f"/healthz: {response.status} {await response.text()!r}")
        # the Pushpins
        for pushpin in self.pushpins:
            problems += [f"{pushpin.name}: {problem}" for problem in pushpin.problems]
            if len(pushpin.epochs) > 1:
                problems.append(f"{pushpin.name}: ids of several epochs: {pushpin.epochs}")
            for counter in POOL:
                problems += self.pushpin_problems(pushpin, counter, counts[counter])
        # the cache
        for counter, at in self.changed_at.items():
            paths = [f"/counters/{counter}/"]
            if at == self.deleted_at.get(counter):  # a deletion purges the watcher count's path too
                paths.append(f"/counters/{counter}/watchers/")
            for path in paths:
                if max(self.cache.purged.get(path, [-1])) < at:
                    problems.append(f"{path} not purged after its last change")
        return problems

    def pushpin_problems(self, pushpin: FakePushpin, counter: str, count: int) -> list[str]:
        problems = []
        for multi in (False, True):
            channel = livecounter.Key((counter, False)).grip_channel(multi)
            latest = pushpin.latest(channel)
            if counter in self.values:
                if (counter in self.changed_at or latest is not None) and latest != value_content(
                        counter, self.values[counter], multi=multi):
                    problems.append(f"{pushpin.name}: {channel} ends on {latest!r}, the value is "
                                    f"{self.values[counter]} ({pushpin.shown(channel)})")
            elif counter in self.deleted_at and latest != "close":
                problems.append(f"{pushpin.name}: {channel} of a deleted counter ends on {latest!r}, "
                                f"not close ({pushpin.shown(channel)})")
            elif latest not in (None, "close"):
                problems.append(f"{pushpin.name}: {channel} of a counter that never existed got {latest!r}")
            count_channel = livecounter.Key((counter, True)).grip_channel(multi)
            latest = pushpin.latest(count_channel)
            # A count that moved while its id didn't exist may go unpublished (no stream can be held on
            # it without the publisher keeping the channel): the last one published may be older.
            if latest not in (None, "close") and counter not in self.counted_while_gone:
                match = COUNT_CONTENT.fullmatch(latest)
                published = match and int(match[1] or match[2])
                if published != count:
                    problems.append(f"{pushpin.name}: {count_channel} ends on {latest!r}, the count is {count} "
                                    f"({pushpin.shown(count_channel)})")
            for deleted, number in self.deletions:
                if deleted != counter:
                    continue
                for name in (channel, count_channel):
                    problems += self.close_problems(pushpin, name, number)
        return problems

    def close_problems(self, pushpin: FakePushpin, channel: str, number: int) -> list[str]:
        """After a deletion (the publisher's number then), a close comes on the channel before any
        later publish: the streams Pushpin holds on it end, and don't go on to what is made again."""
        records = [record for record in pushpin.records.get(channel, []) if record.kind != "hint"]
        later = next((index for index, record in enumerate(records)
                      if record.number is not None and record.number > number), None)
        if later is None or (later > 0 and records[later - 1].kind == "close"):
            return []
        return [(f"{pushpin.name}: {channel} got no close for the deletion (publish {number}) before publish "
                 f"{records[later].number}: {pushpin.shown(channel, 12)}")]

    async def metrics(self) -> dict[str, float]:
        text = await (await self.client.get("/metrics")).text()
        return {line.split()[0].removeprefix("livecounter_"): float(line.split()[1])
                for line in text.splitlines() if line.startswith("livecounter_")}
