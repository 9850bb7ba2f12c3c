"""livecounter: integer counters with live updates over Server-Sent Events, in one aiohttp module.

    POST /counters/{id}/                               increment, answers the new value: ``27\\n``
    GET  /counters/{id}/                               the value: ``27\\n`` (or JSON with Accept: application/json)
    GET  /counters/{id}/  Accept: text/event-stream    the value, then every change on the same response
    GET  /counters/                                    every counter as one JSON object
    GET  /healthz                                      ``ok``, or 503 with the reason while saves fail

Run it::

    pip install -r requirements.txt && python livecounter.py        # http://127.0.0.1:8080/counters/
    python livecounter.py --help                                     # every option (also LIVECOUNTER_* variables)

Embed it::

    app = web.Application()
    app.add_subapp("/live/", create_app(data_path="counters.json"))

Values live in memory and are written behind to a JSON file (atomically, at most once per save
interval, and once more on shutdown). Every change is encoded once and written to each listener's
socket; a listener that stops reading skips values and gets the latest when it drains, and a hot
counter coalesces its broadcasts so that fan-out never starves increments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import math
import os
import re
import resource
import socket
import sys
import time
from pathlib import Path

from aiohttp import web
from aiohttp.http import HttpVersion11

try:
    import uvloop
except ImportError:  # optional: the asyncio loop serves too, ~20% slower
    uvloop = None

log = logging.getLogger("livecounter")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything an operator can tune; create_app() and the command line both fill this in."""

    data_path: Path = Path("counters.json")
    save_interval: float = 1.0  # seconds between write-behind saves, at most one save per interval
    keepalive_interval: float = 15.0  # seconds of silence before a stream gets a ":" comment
    stall_timeout: float = 30.0  # seconds a listener may refuse data before it is disconnected
    durable: bool = False  # answer a change only once it is on disk
    auto_create: bool = False  # a POST to an unknown (valid) id creates the counter
    max_counters: int = 10_000  # the most counters auto-create makes
    post_rate: float | None = None  # increments per second per client address; None: unlimited
    trust_proxy: bool = False  # the client address is the last one in X-Forwarded-For
    cors_origin: str = "*"
    max_listeners: int | None = None  # None: what the open-file limit allows, see default_max_listeners()
    max_listeners_per_ip: int = 1000
    admin_token: str | None = None  # PUT and DELETE need it as a Bearer token; None: they are off


def default_max_listeners() -> int:
    """Listeners the process's open-file limit allows, keeping room for POSTs, the data file and logs."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = 1_000_000
    return max(1, soft_limit - max(64, soft_limit // 10))


# --------------------------------------------------------------------------------------------------
# The counter store and its persistence
# --------------------------------------------------------------------------------------------------

COUNTER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
ID_RULE = "an id is 1-64 letters, digits, '.', '_' or '-'"
MAX_VALUE = 2**53 - 1  # the largest integer a browser's JavaScript reads exactly


class DataFileError(Exception):
    """The data file can't be used; the message names the file and the problem in one line."""


def load_counters(path: Path) -> dict[str, int]:
    """Read and validate the data file; a missing file means no counters yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        log.warning("%s does not exist: starting with no counters; the first save creates it", path)
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise DataFileError(f"{path}: cannot read: {error}") from None
    try:
        counters = json.loads(text, object_pairs_hook=_refuse_duplicate_ids)
    except ValueError as error:
        raise DataFileError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(counters, dict):
        raise DataFileError(f"{path}: must be a JSON object mapping counter ids to integers")
    for counter_id, value in counters.items():
        if not COUNTER_ID.fullmatch(counter_id):
            raise DataFileError(f"{path}: invalid counter id {counter_id!r} ({ID_RULE})")
        if type(value) is not int:  # bool is an int subclass; true is not a count
            raise DataFileError(f"{path}: counter {counter_id!r} holds {json.dumps(value)}, not an integer")
        if abs(value) > MAX_VALUE:
            raise DataFileError(f"{path}: counter {counter_id!r} holds {value}, outside ±(2^53 - 1)")
    return counters


def _refuse_duplicate_ids(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        duplicate = next(key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i]))
        raise ValueError(f"counter {duplicate!r} appears twice")
    return result


def write_counters(path: Path, counters: dict[str, int]) -> None:
    """Runs in a thread: with indent, json encodes in Python and lets the event loop take turns."""
    write_atomically(path, (json.dumps(counters, indent=2) + "\n").encode())


def write_atomically(path: Path, data: bytes) -> None:
    """Replace path with data so that a crash at any instant leaves the old file or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


class CounterLimitReached(Exception):
    """Auto-create would pass --max-counters."""


class SaveFailed(Exception):
    """Durable mode: the save that would have made a change durable failed; the message says why."""


FIRST_RETRY_DELAY = 0.1  # seconds before the first retry of a failed save; doubles up to the last
LAST_RETRY_DELAY = 5.0


class CounterStore:
    """Counter values in memory, written to the data file behind the requests, or before their
    answer in durable mode (group commit: one write acknowledges every change made before it)."""

    def __init__(self, path: Path, counters: dict[str, int], *, save_interval: float, durable: bool,
                 auto_create: bool, max_counters: int) -> None:
        self.path = path
        self.durable = durable
        self._values = counters
        self._save_interval = save_interval
        self._auto_create = auto_create
        self._max_counters = max_counters
        self._file_exists = path.exists()
        self._unsaved = asyncio.Event()  # set by every change, cleared when a save takes a snapshot
        if not self._file_exists:
            self._unsaved.set()  # the first save creates it
        self._waiting: list[asyncio.Future[None]] = []  # durable changes the next save acknowledges
        self._one_save_at_a_time = asyncio.Lock()
        self._retry_delay = FIRST_RETRY_DELAY
        self.save_error: str | None = None  # why the last save failed; None while saves work

    def __contains__(self, counter_id: str) -> bool:
        return counter_id in self._values

    def readable(self, counter_id: str) -> bool:
        """Whether the counter exists, or would (as 0) under auto-create."""
        return self._auto_create or counter_id in self._values

    def value(self, counter_id: str) -> int:
        """The counter's value (0 for a counter auto-create would make); KeyError if unknown."""
        if self._auto_create:
            return self._values.get(counter_id, 0)
        return self._values[counter_id]

    def increment(self, counter_id: str) -> int:
        """Add one and return the new value. Unknown: KeyError, or created at 0 under auto-create
        (CounterLimitReached past max_counters). OverflowError past MAX_VALUE."""
        if counter_id not in self._values and self._auto_create:
            if len(self._values) >= self._max_counters:
                raise CounterLimitReached(self._max_counters)
            self._values[counter_id] = 0
        value = self._values[counter_id] + 1
        if value > MAX_VALUE:
            raise OverflowError(counter_id)
        self._values[counter_id] = value
        self._unsaved.set()
        return value

    def set(self, counter_id: str, value: int) -> None:
        """Set (and create) a counter; the caller checked that value is within ±MAX_VALUE."""
        self._values[counter_id] = value
        self._unsaved.set()

    def delete(self, counter_id: str) -> None:
        """Remove a counter; KeyError if unknown."""
        del self._values[counter_id]
        self._unsaved.set()

    def snapshot(self) -> dict[str, int]:
        return dict(self._values)

    async def persisted(self) -> None:
        """Durable mode: return once every change made before this call is on disk.

        Raises SaveFailed with the reason if the save that would have written them fails.
        """
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self._unsaved.set()
        await waiter

    async def run_saves(self) -> None:
        """Save whenever something changed: one interval later (write-behind), at once in durable
        mode (while one save runs, the changes behind it gather for the next), and with a growing
        delay while saves fail."""
        while True:
            await self._unsaved.wait()
            if self.save_error is not None:
                await asyncio.sleep(max(self._retry_delay, 0 if self.durable else self._save_interval))
            elif not self.durable:
                await asyncio.sleep(self._save_interval)
            await self.save()

    async def close(self) -> None:
        """The final save on shutdown, for whatever the last interval (or a failed save) left unsaved."""
        if self._unsaved.is_set():
            await self.save()

    async def save(self) -> None:
        """Write every value now. A failure is logged once per outage and leaves the values unsaved."""
        async with self._one_save_at_a_time:
            self._unsaved.clear()
            waiting, self._waiting = self._waiting, []
            write = asyncio.ensure_future(asyncio.to_thread(write_counters, self.path, self.snapshot()))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # The thread can't be stopped: let it finish, so no second save writes the temp file.
                await asyncio.wait([write])
                self._waiting[:0] = waiting  # the final save answers them
                self._unsaved.set()
                raise
            except OSError as error:
                self._save_failed(error, waiting)
            else:
                self._save_succeeded(waiting)

    def _save_failed(self, error: OSError, waiting: list[asyncio.Future[None]]) -> None:
        self._unsaved.set()
        if self.save_error is None:
            log.error("saving %s failed, will retry: %s", self.path, error)
            self._retry_delay = FIRST_RETRY_DELAY
        else:
            self._retry_delay = min(2 * self._retry_delay, LAST_RETRY_DELAY)
        self.save_error = f"saving {self.path} failed: {error.strerror or error}"
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(SaveFailed(self.save_error))

    def _save_succeeded(self, waiting: list[asyncio.Future[None]]) -> None:
        if self.save_error is not None:
            log.info("saving %s works again", self.path)
            self.save_error = None
        if not self._file_exists:
            log.info("created %s", self.path)
            self._file_exists = True
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)


# --------------------------------------------------------------------------------------------------
# The listener hub: fan-out of changes to SSE streams
# --------------------------------------------------------------------------------------------------
#
# A listener is its socket's transport, nothing more: a change is encoded once and written straight
# to every transport (see the notes on measured costs: the kernel's send is the floor, so the loop
# stays as thin as possible). No task, timer or buffer per listener: one sweep task sends
# keep-alives, finds vanished clients (aiohttp doesn't tell a handler its client left), catches up
# listeners that fell behind and disconnects the ones that stay stuck.

KEEPALIVE = b":\n\n"
BEHIND_BYTES = 16 * 1024  # unsent bytes in user space beyond which a listener skips values
LISTENER_SNDBUF = 16 * 1024  # kernel send buffer per listener: a frozen client pins this, not ~2 MB


def sse_frame(value: int) -> bytes:
    return b"event: message\ndata: %d\n\n" % value


def chunk(payload: bytes) -> bytes:
    """payload as one chunk of HTTP/1.1 chunked transfer encoding."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


KEEPALIVE_CHUNK = chunk(KEEPALIVE)


class Listener:
    __slots__ = ("transport", "chunked", "channel", "client", "ended", "behind_since")

    def __init__(self, transport: asyncio.Transport, chunked: bool, channel: Channel, client: str) -> None:
        self.transport = transport
        self.chunked = chunked
        self.channel = channel
        self.client = client  # its address, for the per-client cap
        self.ended = asyncio.get_running_loop().create_future()  # the handler waits on this
        self.behind_since = 0.0  # monotonic time it started refusing data; 0 while it keeps up

    def write(self, payload: bytes, chunked_payload: bytes) -> None:
        self.transport.write(chunked_payload if self.chunked else payload)

    def end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


class Channel:
    """One counter's listeners and what they have been sent."""

    __slots__ = ("counter_id", "listeners", "value", "sent", "pending", "last_write")

    def __init__(self, counter_id: str, value: int) -> None:
        self.counter_id = counter_id
        self.listeners: set[Listener] = set()
        self.value = value  # the latest value published
        self.sent = value  # the value the listeners have (or get when they drain)
        self.pending: asyncio.Handle | None = None  # the scheduled broadcast, at most one
        self.last_write = time.monotonic()


class ListenerHub:
    def __init__(self, *, keepalive_interval: float, stall_timeout: float, max_listeners: int,
                 max_listeners_per_client: int) -> None:
        self._channels: dict[str, Channel] = {}
        self._behind: set[Listener] = set()
        self._per_client: dict[str, int] = {}  # listeners by client address
        self._keepalive_interval = keepalive_interval
        self._stall_timeout = stall_timeout
        self._max_listeners = max_listeners
        self._max_listeners_per_client = max_listeners_per_client
        self._closing = False
        self.listener_count = 0

    def refusal(self) -> str | None:
        """Why the server can't take another listener now, or None."""
        if self._closing:
            return "the server is shutting down"
        if self.listener_count >= self._max_listeners:
            return f"too many listeners (limit {self._max_listeners})"
        return None

    def client_refusal(self, client: str) -> str | None:
        """Why this client can't open another stream, or None."""
        if self._per_client.get(client, 0) >= self._max_listeners_per_client:
            return f"too many streams from {client} (limit {self._max_listeners_per_client})"
        return None

    def subscribe(self, counter_id: str, transport: asyncio.Transport, chunked: bool,
                  value: int, client: str) -> tuple[Listener, int]:
        """Register a listener; returns it and the value its first frame must carry.

        The caller writes that frame before it yields to the loop, so no change can fall between.
        """
        channel = self._channels.get(counter_id)
        if channel is None:
            channel = self._channels[counter_id] = Channel(counter_id, value)
        listener = Listener(transport, chunked, channel, client)
        if self._closing:  # shutdown began while its headers were being sent
            listener.end()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LISTENER_SNDBUF)
        channel.listeners.add(listener)
        self.listener_count += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        # A broadcast may be pending: the new listener starts where the others are, and gets it too.
        return listener, channel.sent

    def unsubscribe(self, listener: Listener) -> None:
        listener.end()
        channel = listener.channel
        channel.listeners.discard(listener)
        self._behind.discard(listener)
        self.listener_count -= 1
        if self._per_client[listener.client] == 1:
            del self._per_client[listener.client]
        else:
            self._per_client[listener.client] -= 1
        if not channel.listeners and self._channels.get(channel.counter_id) is channel:
            if channel.pending is not None:
                channel.pending.cancel()
            del self._channels[channel.counter_id]

    def publish(self, counter_id: str, value: int) -> None:
        """A counter changed: broadcast soon, coalescing with changes that come before it goes."""
        channel = self._channels.get(counter_id)
        if channel is None:
            return
        channel.value = value
        if channel.pending is None:
            # Marked here, not when the broadcast starts: a burst of POSTs schedules it once.
            channel.pending = asyncio.get_running_loop().call_soon(self._broadcast, channel)

    def _broadcast(self, channel: Channel) -> None:
        channel.pending = None
        if channel.value == channel.sent:
            return
        started = time.perf_counter()
        payload = sse_frame(channel.value)
        self._write_all(channel, payload, chunk(payload))
        channel.sent = channel.value
        # Rest three times as long as the broadcast took (<= 25% of the loop for one hot counter),
        # so increments keep flowing; the next broadcast carries whatever is latest by then.
        # Measured: 0.7-0.87x of the POST rate kept with 5,000 listeners, vs ~0.001x broadcasting all.
        elapsed = time.perf_counter() - started
        channel.pending = asyncio.get_running_loop().call_later(3 * elapsed, self._broadcast, channel)

    def _write_all(self, channel: Channel, payload: bytes, chunked_payload: bytes) -> None:
        """Write to every listener that keeps up; mark the ones that don't, end the vanished ones."""
        now = time.monotonic()
        channel.last_write = now
        for listener in channel.listeners:
            transport = listener.transport
            if transport.is_closing():
                listener.end()
            elif transport.get_write_buffer_size() > BEHIND_BYTES:
                if not listener.behind_since:
                    listener.behind_since = now
                    self._behind.add(listener)
            else:
                listener.write(payload, chunked_payload)
                if listener.behind_since:  # it drained, and this is the latest value
                    listener.behind_since = 0.0
                    self._behind.discard(listener)

    async def run_sweeps(self) -> None:
        interval = min(0.5, self._keepalive_interval / 2)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def sweep(self) -> None:
        """Catch up or drop listeners that fell behind; end vanished ones; keep idle streams alive."""
        now = time.monotonic()
        for listener in list(self._behind):
            self._catch_up(listener, now)
        for channel in self._channels.values():
            if now - channel.last_write >= self._keepalive_interval:
                self._write_all(channel, KEEPALIVE, KEEPALIVE_CHUNK)
            else:
                for listener in channel.listeners:
                    if listener.transport.is_closing():
                        listener.end()

    def _catch_up(self, listener: Listener, now: float) -> None:
        transport = listener.transport
        if transport.is_closing():
            listener.end()
        elif transport.get_write_buffer_size() <= BEHIND_BYTES:
            payload = sse_frame(listener.channel.sent)
            listener.write(payload, chunk(payload))
            listener.behind_since = 0.0
            self._behind.discard(listener)
        elif now - listener.behind_since > self._stall_timeout:
            log.info("disconnecting a listener that took no data for %.0f s", self._stall_timeout)
            transport.abort()  # close() would wait to flush what the client never reads
            listener.end()

    def drop(self, counter_id: str) -> None:
        """End the streams of a counter that no longer exists."""
        channel = self._channels.get(counter_id)
        if channel is not None:
            for listener in channel.listeners:
                listener.end()

    def close(self) -> None:
        """End every stream (on shutdown); no new listener is taken after this."""
        self._closing = True
        for channel in self._channels.values():
            for listener in channel.listeners:
                listener.end()


# --------------------------------------------------------------------------------------------------
# HTTP handlers
# --------------------------------------------------------------------------------------------------

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", CounterStore)
HUB = web.AppKey("hub", ListenerHub)

MAX_BODY_BYTES = 1024  # an increment needs no body; this admits the small forms some clients send
BODY_TIMEOUT = 10  # seconds for a body of at most MAX_BODY_BYTES to arrive
PLAIN_TEXT = "text/plain"
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"


class RateLimiter:
    """A token bucket per client address: `rate` requests a second, in bursts of up to `burst`."""

    MAX_CLIENTS = 100_000  # past this many buckets, the ones that have refilled are forgotten

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when counted)
        self._last_prune = 0.0

    def retry_after(self, client: str) -> float:
        """Take a token for client: 0 if it had one, else the seconds until it will."""
        now = time.monotonic()
        tokens, counted = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - counted) * self._rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self._rate
        self._buckets[client] = (tokens - 1, now)
        if len(self._buckets) > self.MAX_CLIENTS and now - self._last_prune > 1:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        self._last_prune = now
        self._buckets = {client: (tokens, counted) for client, (tokens, counted) in self._buckets.items()
                         if tokens + (now - counted) * self._rate < self._burst}


POST_RATE = web.AppKey("post_rate", RateLimiter)  # absent without --post-rate


def client_address(request: web.Request) -> str:
    """The client's address: behind a trusted proxy, the one it appended to X-Forwarded-For."""
    if request.app[SETTINGS].trust_proxy:
        forwarded = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
        if forwarded:
            return forwarded
    return request.remote or "unknown"


def counter_id_of(request: web.Request, *, must_exist: bool = True) -> str:
    """The counter id in the path, if it is valid and (unless told otherwise) the counter is readable."""
    counter_id = request.match_info["counter_id"]
    if not COUNTER_ID.fullmatch(counter_id):
        raise web.HTTPBadRequest(text=f"invalid counter id: {ID_RULE}\n")
    if must_exist and not request.app[STORE].readable(counter_id):
        raise web.HTTPNotFound(text=f"unknown counter {counter_id!r}\n")
    return counter_id


def preferred_format(request: web.Request) -> str:
    """The first of event-stream, JSON or plain text that the Accept header names; plain text if none."""
    for media_range in request.headers.get("Accept", "").split(","):
        media_type = media_range.split(";", 1)[0].strip().lower()
        if media_type in ("text/event-stream", "application/json", PLAIN_TEXT):
            return media_type
    return PLAIN_TEXT


def value_response(counter_id: str, value: int, media_type: str = PLAIN_TEXT) -> web.Response:
    headers = {"Cache-Control": "no-cache"}
    if media_type == "application/json":
        return web.json_response({"id": counter_id, "value": value}, headers=headers)
    return web.Response(text=f"{value}\n", content_type=PLAIN_TEXT, headers=headers)


def retry_later(status: type[web.HTTPException], reason: str, seconds: float) -> web.HTTPException:
    return status(text=reason + "\n", headers={"Retry-After": str(max(1, math.ceil(seconds)))})


async def read_body(request: web.Request) -> bytes:
    """The request body: 413 past MAX_BODY_BYTES (declared or, if chunked, received), 408 if it
    doesn't arrive within BODY_TIMEOUT (a client must not hold a handler by sending slowly)."""
    too_large = web.HTTPRequestEntityTooLarge(
        max_size=MAX_BODY_BYTES, actual_size=request.content_length or MAX_BODY_BYTES + 1,
        text=f"request body too large: an increment needs no body (at most {MAX_BODY_BYTES} bytes)\n")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise too_large
    body = b""
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            while received := await request.content.read(MAX_BODY_BYTES + 1):
                body += received
                if len(body) > MAX_BODY_BYTES:
                    raise too_large
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the request body did not arrive within {BODY_TIMEOUT} s\n",
                                     headers={"Connection": "close"}) from None
    return body


async def get_counter(request: web.Request) -> web.StreamResponse:
    counter_id = counter_id_of(request)
    media_type = preferred_format(request)
    if media_type != "text/event-stream":
        return value_response(counter_id, request.app[STORE].value(counter_id), media_type)
    if request.method == "HEAD":
        return web.Response(headers=SSE_HEADERS)
    return await stream_counter(request, counter_id)


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream_counter(request: web.Request, counter_id: str) -> web.StreamResponse:
    """The current value, then every change, until the client leaves or the server stops."""
    hub = request.app[HUB]
    client = client_address(request)
    if reason := hub.refusal():
        raise retry_later(web.HTTPServiceUnavailable, reason, 10)
    if reason := hub.client_refusal(client):
        raise retry_later(web.HTTPTooManyRequests, reason, 10)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)  # aiohttp chunks it for HTTP/1.1, as chunked= says below
    transport = request.transport
    if transport is None or transport.is_closing():
        return response
    listener, first_value = hub.subscribe(
        counter_id, transport, chunked=request.version >= HttpVersion11,
        value=request.app[STORE].value(counter_id), client=client)
    try:
        # Headers and first frame go out in this one write, before anything else runs on the loop.
        await response.write(sse_frame(first_value))
        await listener.ended
    except ConnectionError:
        pass  # the client left during the first write
    finally:
        hub.unsubscribe(listener)
    try:
        await response.write_eof()
    except ConnectionError:
        pass  # it vanished without a goodbye; nothing to end
    return response


async def increment_counter(request: web.Request) -> web.Response:
    counter_id = counter_id_of(request, must_exist=False)
    await read_body(request)
    limiter = request.app.get(POST_RATE)
    if limiter is not None and (wait := limiter.retry_after(client_address(request))):
        raise retry_later(web.HTTPTooManyRequests, "too many increments from this address", wait)
    store = request.app[STORE]
    refuse_while_saves_fail(store)
    try:
        value = store.increment(counter_id)
    except KeyError:
        raise web.HTTPNotFound(text=f"unknown counter {counter_id!r}\n") from None
    except CounterLimitReached as limit:
        raise web.HTTPForbidden(text=f"counter {counter_id!r} not created: the limit of {limit} "
                                     f"counters is reached\n") from None
    except OverflowError:
        raise web.HTTPConflict(text=f"counter {counter_id!r} is at its maximum, {MAX_VALUE}\n") from None
    await commit(request, counter_id)
    return value_response(counter_id, value)


def refuse_while_saves_fail(store: CounterStore) -> None:
    """Durable mode takes no change it can't write: while saves fail, 503 instead of a lost ack."""
    if store.durable and store.save_error is not None:
        raise retry_later(web.HTTPServiceUnavailable, store.save_error, LAST_RETRY_DELAY)


async def commit(request: web.Request, counter_id: str) -> None:
    """A change was made: in durable mode wait until it is on disk, then tell the listeners."""
    store = request.app[STORE]
    if store.durable:
        try:
            await store.persisted()
        except SaveFailed as failure:
            raise retry_later(web.HTTPServiceUnavailable, str(failure), LAST_RETRY_DELAY) from None
    if counter_id in store:
        request.app[HUB].publish(counter_id, store.value(counter_id))
    else:
        request.app[HUB].drop(counter_id)


def require_admin(request: web.Request) -> None:
    """PUT and DELETE need Authorization: Bearer <the admin token>; with no token set, nobody may."""
    token = request.app[SETTINGS].admin_token
    if not token:
        raise web.HTTPForbidden(text="admin writes are off: set LIVECOUNTER_ADMIN_TOKEN to allow them\n")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise web.HTTPUnauthorized(text="a valid Authorization: Bearer token is needed\n",
                                   headers={"WWW-Authenticate": 'Bearer realm="livecounter"'})


async def set_counter(request: web.Request) -> web.Response:
    """PUT {"value": N}: set (and create) a counter."""
    counter_id = counter_id_of(request, must_exist=False)
    require_admin(request)
    body = await read_body(request)
    try:
        value = json.loads(body)["value"]
    except (ValueError, TypeError, KeyError):
        raise web.HTTPBadRequest(text='the body must be JSON like {"value": 27}\n') from None
    if type(value) is not int or abs(value) > MAX_VALUE:
        raise web.HTTPBadRequest(text=f"value must be an integer within ±{MAX_VALUE}\n")
    store = request.app[STORE]
    refuse_while_saves_fail(store)
    store.set(counter_id, value)
    await commit(request, counter_id)
    return value_response(counter_id, value)


async def delete_counter(request: web.Request) -> web.Response:
    """DELETE: remove a counter and end its streams."""
    counter_id = counter_id_of(request, must_exist=False)
    require_admin(request)
    store = request.app[STORE]
    refuse_while_saves_fail(store)
    try:
        store.delete(counter_id)
    except KeyError:
        raise web.HTTPNotFound(text=f"unknown counter {counter_id!r}\n") from None
    await commit(request, counter_id)
    return web.Response(status=204)


async def list_counters(request: web.Request) -> web.Response:
    return web.json_response(request.app[STORE].snapshot(), headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    save_error = request.app[STORE].save_error
    if save_error is not None:
        return web.Response(status=503, text=save_error + "\n")
    return web.Response(text="ok\n")


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight: any request the API takes may come from the allowed origin."""
    headers = {"Access-Control-Allow-Methods": ALLOWED_METHODS, "Access-Control-Max-Age": "86400"}
    requested_headers = request.headers.get("Access-Control-Request-Headers")
    if requested_headers:
        headers["Access-Control-Allow-Headers"] = requested_headers
    return web.Response(status=204, headers=headers)


async def add_cors_origin(request: web.Request, response: web.StreamResponse) -> None:
    """Every response of this app, errors and streams included, carries the allowed origin."""
    response.headers.setdefault("Access-Control-Allow-Origin", request.app[SETTINGS].cors_origin)


# --------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------

def create_app(data_path: str | os.PathLike[str] = Settings.data_path, **options: object) -> web.Application:
    """The livecounter application, standalone or as a sub-app; options are Settings' fields.

    Raises DataFileError if the data file can't be used.
    """
    settings = Settings(data_path=Path(data_path), **options)  # type: ignore[arg-type]
    app = web.Application()
    app[SETTINGS] = settings
    app[STORE] = CounterStore(
        settings.data_path, load_counters(settings.data_path), save_interval=settings.save_interval,
        durable=settings.durable, auto_create=settings.auto_create, max_counters=settings.max_counters)
    app[HUB] = ListenerHub(
        keepalive_interval=settings.keepalive_interval, stall_timeout=settings.stall_timeout,
        max_listeners=settings.max_listeners or default_max_listeners(),
        max_listeners_per_client=settings.max_listeners_per_ip)
    if settings.post_rate:
        app[POST_RATE] = RateLimiter(settings.post_rate, burst=max(1.0, 2 * settings.post_rate))
    for path in ("/counters/{counter_id}/", "/counters/{counter_id}"):
        resource = app.router.add_resource(path)
        resource.add_route("GET", get_counter)
        resource.add_route("HEAD", get_counter)
        resource.add_route("POST", increment_counter)
        resource.add_route("PUT", set_counter)
        resource.add_route("DELETE", delete_counter)
        resource.add_route("OPTIONS", preflight)
    for path in ("/counters/", "/counters"):
        app.router.add_get(path, list_counters)
        app.router.add_route("OPTIONS", path, preflight)
    app.router.add_get("/healthz", health)
    app.on_response_prepare.append(add_cors_origin)
    app.cleanup_ctx.append(run_background_work)
    app.on_shutdown.append(end_streams)
    return app


async def run_background_work(app: web.Application):
    """Saves and sweeps while the app runs; the final save after every stream and request has ended."""
    tasks = [asyncio.create_task(app[STORE].run_saves()), asyncio.create_task(app[HUB].run_sweeps())]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await app[STORE].close()


async def end_streams(app: web.Application) -> None:
    # aiohttp waits for running handlers before cleanup; streams must end first, or it waits
    # shutdown_timeout for clients that may have vanished long ago.
    app[HUB].close()


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def positive_float(text: str) -> float:
    number = float(text)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return number


def positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="livecounter",
        description="Counters with live updates over Server-Sent Events. Every option can also be "
                    "set with the LIVECOUNTER_* variable named beside it; LIVECOUNTER_ADMIN_TOKEN "
                    "(no option: it would show in ps) allows PUT and DELETE.",
    )

    def option(flag: str, help: str, default: object, shown_default: object = None, **kwargs: object) -> None:
        variable = "LIVECOUNTER_" + flag.lstrip("-").replace("-", "_").upper()
        if kwargs.get("action") == "store_true":
            default = os.environ.get(variable, "").lower() in ("1", "true", "yes", "on")
        else:
            default = os.environ.get(variable, default)
        parser.add_argument(flag, default=default, **kwargs,
                            help=f"{help} (default: {shown_default or default}; env {variable})")

    defaults = Settings()
    option("--host", "address to listen on", "127.0.0.1")
    option("--port", "port to listen on", 8080, type=int)
    option("--data", "the JSON file holding the counters", str(defaults.data_path))
    option("--save-interval", "seconds between write-behind saves", defaults.save_interval,
           type=positive_float)
    option("--durable", "answer a change only once it is on disk (group commit)", None,
           shown_default="off", action="store_true")
    option("--auto-create", "a POST to an unknown id creates the counter", None,
           shown_default="off", action="store_true")
    option("--max-counters", "the most counters --auto-create makes", defaults.max_counters,
           type=positive_int)
    option("--post-rate", "increments per second per client address, in bursts of twice that; past "
           "it, 429", defaults.post_rate, shown_default="unlimited", type=positive_float)
    option("--trust-proxy", "take the client address from X-Forwarded-For (behind nginx or Pushpin)",
           None, shown_default="off", action="store_true")
    option("--keepalive-interval", "seconds of silence before a stream gets a ':' comment",
           defaults.keepalive_interval, type=positive_float)
    option("--stall-timeout", "seconds a listener may refuse data before it is disconnected",
           defaults.stall_timeout, type=positive_float)
    option("--cors-origin", "the Access-Control-Allow-Origin of every response", defaults.cors_origin)
    option("--max-listeners", "concurrent event streams; past it, 503", defaults.max_listeners,
           shown_default="what the open-file limit allows", type=positive_int)
    option("--max-listeners-per-ip", "concurrent event streams per client address; past it, 429",
           defaults.max_listeners_per_ip, type=positive_int)
    return parser.parse_args(argv)


def raise_open_file_limit() -> None:
    """Every listener is an open socket: take the hard limit, not the 1,024 many systems start with."""
    soft_limit, hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit != hard_limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard_limit, hard_limit))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_file_limit()
    try:
        app = create_app(
            args.data, save_interval=args.save_interval, durable=args.durable,
            auto_create=args.auto_create, max_counters=args.max_counters, post_rate=args.post_rate,
            trust_proxy=args.trust_proxy, keepalive_interval=args.keepalive_interval,
            stall_timeout=args.stall_timeout, cors_origin=args.cors_origin,
            max_listeners=args.max_listeners, max_listeners_per_ip=args.max_listeners_per_ip,
            admin_token=os.environ.get("LIVECOUNTER_ADMIN_TOKEN") or None)
    except DataFileError as error:
        print(f"livecounter: {error}", file=sys.stderr)
        return 2
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/counters/"
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    try:
        web.run_app(app, host=args.host, port=args.port, loop=loop, shutdown_timeout=5,
                    print=lambda _: print(f"livecounter serving {url} (Ctrl+C to stop)", flush=True))
    except OSError as error:  # the port is taken, or the address is not this machine's
        print(f"livecounter: cannot listen on {args.host}:{args.port}: {error.strerror or error}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
