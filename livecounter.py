"""livecounter: integer counters with live updates over Server-Sent Events, in one aiohttp module.

    POST /counters/{id}/                               increment, answers the new value: ``27\\n``
    GET  /counters/{id}/                               the value: ``27\\n`` (or JSON with Accept: application/json)
    GET  /counters/{id}/  Accept: text/event-stream    the value, then every change on the same response
    GET  /counters/?ids=1,2  Accept: text/event-stream one stream of ``counter`` events for several counters
    GET  /counters/{id}/watchers/                      how many streams watch it: read, or watched like a value
    GET  /counters/{id}/badge.svg                      the value as an SVG badge (also .../watchers/badge.svg)
    GET  /counters/                                    every counter as one JSON object (?limit=&after=: a page)
    PUT, DELETE /counters/{id}/                        admin writes (Authorization: Bearer $LIVECOUNTER_ADMIN_TOKEN)
    GET  /  /embed.js  /metrics  /healthz              demo page, embeddable script, Prometheus, health

Run it::

    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python livecounter.py
    .venv/bin/python livecounter.py --help       # every option (also LIVECOUNTER_* variables)
    .venv/bin/pip install . && .venv/bin/livecounter --data /var/lib/livecounter/counters.json   # as a command
    .venv/bin/python livecounter.py --redis redis://127.0.0.1:6379/ --workers 2   # shared by processes

Embed it::

    app = web.Application()
    app.add_subapp("/live/", create_app(data_path="counters.json"))

A change (an increment, a set, a deletion, a watcher count) leaves the store through one feed, to
every receiver registered on it: the streams, a cache in front to purge, Pushpin to publish to,
the watcher counts, and the journal. Values live in memory; each save appends what changed to a
journal beside the JSON data file, behind the requests (once per save interval) or before their
answer with --durable (group commit), and the journal is folded into the data file when it grows
and on a stop. Every change is encoded once and written to each listener's socket; a listener that
stops reading skips values and gets the latest when it drains, and a counter that changes faster
than it can fan out rests between fan-outs, so that they never starve increments. With --grip-url,
Pushpin holds the streams and livecounter publishes the changes to it (with GRIP's ids, so none is
missed); with --purge-url, a cache in front (Varnish) answers reads and new viewers, and every
change purges it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import hmac
import html
import inspect
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import resource
import signal
import socket
import stat
import string
import sys
import time
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import aiohttp
import jwt
from aiohttp import web
from aiohttp.http import HttpVersion11

try:
    import uvloop
except ImportError:  # optional: asyncio's own loop serves too, a little slower
    uvloop = None

__version__ = "1.2.0"
__all__ = ["create_app", "Settings", "ReconnectWindow", "DataFileError", "main", "__version__"]

log = logging.getLogger("livecounter")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
#
# Every setting is checked in one place, Settings.__post_init__, whichever way it came: the command
# line, a LIVECOUNTER_* variable, or create_app()'s keywords. Each field's `parse` takes the text
# an operator writes (and a value of the field's own type from create_app), and raises ValueError
# with a reason that fits after the setting's name.

LARGEST_SETTING = 10**6  # seconds, or things a second: past it, no setting means anything (a week is 604,800)


def positive_float(given: object) -> float:
    number = _number(given, float)
    if not 0.001 <= number <= LARGEST_SETTING:  # 1e-320 or 1e308 would make infinities of waits
        raise ValueError(f"must be a number from 0.001 to {LARGEST_SETTING:,}, not {given!r}")
    return number


def positive_int(given: object) -> int:
    number = _number(given, int)
    if not 1 <= number <= 1000 * LARGEST_SETTING:
        raise ValueError(f"must be a whole number from 1 to {1000 * LARGEST_SETTING:,}, not {given!r}")
    return number


def port_number(given: object) -> int:
    number = _number(given, int)
    if not 0 <= number <= 65535:
        raise ValueError(f"must be a port from 0 to 65535 (0: any free port), not {given!r}")
    return number


def _number(given: object, kind: type) -> Any:
    """given as an int or float: from text, or a number of the right kind (not True, not 1.5 for an int)."""
    if isinstance(given, str):
        try:
            return kind(given.strip())
        except ValueError:
            raise ValueError(f"must be a {'whole ' if kind is int else ''}number, not {given!r}") from None
    if type(given) is kind or (kind is float and type(given) is int):
        return kind(given)
    raise ValueError(f"must be a {'whole ' if kind is int else ''}number, not {given!r}")


SWITCH_ON, SWITCH_OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def switch(given: object) -> bool:
    """An on/off setting: True or False, or as a variable 1, true, yes, on (or 0, false, no, off)."""
    if type(given) is bool:
        return given
    if isinstance(given, str) and given.strip().lower() in SWITCH_ON + SWITCH_OFF:
        return given.strip().lower() in SWITCH_ON
    raise ValueError(f"must be one of {', '.join(SWITCH_ON)} (on) or {', '.join(SWITCH_OFF[:-1])} (off), "
                     f"not {given!r}")


def http_endpoint(given: object) -> str:
    """The URL of a Pushpin's publish endpoint or of a cache: http:// or https://, a host, a valid port."""
    if not isinstance(given, str):
        raise ValueError(f"must be a URL, not {given!r}")
    try:
        parts = urllib.parse.urlsplit(given)
        parts.port  # noqa: B018 - raises ValueError for a port that isn't one
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:5561/, not {given!r}")
    return given


def stats_endpoint(given: object) -> str:
    """A ZeroMQ endpoint of a Pushpin's stats socket: ipc://PATH or tcp://HOST:PORT."""
    if not (isinstance(given, str) and re.fullmatch(r"ipc://.+|tcp://[^:/]+:[0-9]+", given)):
        raise ValueError(f"must be ipc://PATH or tcp://HOST:PORT (Pushpin's stats_spec), not {given!r}")
    return given


def allowed_origin(given: object) -> str:
    """What Access-Control-Allow-Origin takes: one origin, scheme://host[:port] (a trailing slash,
    which browsers never send in Origin, is dropped), or * for any."""
    if given == "*":
        return "*"
    origin = given.rstrip("/") if isinstance(given, str) else None
    if not (origin and re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?",
                                    origin)):
        raise ValueError(f"must be one origin like https://site.example (scheme, host, port if not the "
                         f"default; no path, one only) or * for any, not {given!r}")
    return origin


def redis_url(given: object) -> str:
    """A Redis to keep the counters in: redis://, rediss://, unix://, or
    redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] (the primary Sentinel names SERVICE)."""
    if isinstance(given, str):
        scheme = given.partition("://")[0]
        if scheme in ("redis", "rediss", "unix") and len(given) > len(scheme) + 3 and valid_redis_address(given):
            return given
        if scheme == "redis+sentinel" and sentinel_parts(given) is not None:
            return given
    raise ValueError("must be redis://HOST:PORT[/DB], rediss://..., unix://PATH or "
                     f"redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB], not {shown_url(str(given))!r}")


def valid_redis_address(url: str) -> bool:
    """Whether a redis:// or rediss:// URL's port and database are numbers: redis-py takes a database
    that isn't one (redis://host/l) as database 0, and a port that isn't one fails only at connecting."""
    if url.startswith("unix://"):
        return True
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError if it isn't a number
    except ValueError:
        return False
    database = parts.path.strip("/")
    return bool(parts.hostname) and (not database or database.isdigit())


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    service: str
    database: int
    password: str | None  # Redis's (requirepass); the Sentinels take none


def sentinel_parts(url: str) -> SentinelURL | None:
    """The parts of redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]; None if it
    isn't one."""
    match = re.fullmatch(r"redis\+sentinel://(?::([^@/]*)@)?([^/@]+)/([^/]+)(?:/(\d+))?/?", url)
    if not match:
        return None
    sentinels = []
    for address in match[2].split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            return None
        sentinels.append((host.strip("[]"), int(port)))
    return SentinelURL(sentinels, match[3], int(match[4] or 0), urllib.parse.unquote(match[1]) if match[1] else None)


RECONNECT_WAIT_MAX = 86_400  # seconds: a day


@dataclasses.dataclass(frozen=True)
class ReconnectWindow:
    """How long a client waits before it reconnects a stream that ended: between `shortest` and
    `longest` seconds, drawn for each stream. Written MIN-MAX on the command line: "1-5"."""

    shortest: float
    longest: float

    def __post_init__(self) -> None:
        if not (type(self.shortest) in (int, float) and 0 < self.shortest <= RECONNECT_WAIT_MAX):
            raise ValueError(f"the shortest wait must be a number of seconds above 0: {self}")
        if not (type(self.longest) in (int, float) and self.shortest <= self.longest <= RECONNECT_WAIT_MAX):
            raise ValueError(f"the longest wait must be at least the shortest, at most {RECONNECT_WAIT_MAX:,} s: {self}")

    def __str__(self) -> str:
        return f"{self.shortest:g}-{self.longest:g}"

    def draw_ms(self) -> int:
        """One stream's wait, in whole milliseconds (the retry field's unit), uniform in the window."""
        return random.randint(max(1, round(self.shortest * 1000)), max(1, round(self.longest * 1000)))

    @classmethod
    def parse(cls, given: object) -> ReconnectWindow:
        if isinstance(given, ReconnectWindow):
            return given
        shortest, _, longest = given.partition("-") if isinstance(given, str) else ("", "", "")
        try:
            seconds = float(shortest), float(longest)
        except ValueError:
            raise ValueError(f"must be MIN-MAX in seconds, e.g. 1-5, not {given!r}") from None
        return cls(*seconds)


def data_path(given: object) -> Path:
    if not isinstance(given, (str, os.PathLike)) or not str(given):
        raise ValueError(f"must be a file's path, not {given!r}")
    return Path(given)


def optional_key(given: object) -> str:
    if not isinstance(given, str) or not given:
        raise ValueError("is empty: give Pushpin's sig_key, or leave it unset")
    return given


def any_text(given: object) -> str:
    if not isinstance(given, str):
        raise ValueError(f"must be text, not {given!r}")
    return given


def option(default: object, help: str, *, parse: Callable[[object], object], flag: str | None = None,
           metavar: str | None = None, shown: str | None = None) -> Any:
    """A setting that is also a command-line option, --flag (the field's name unless given), and a
    variable, LIVECOUNTER_<FLAG>. parse checks a value (or reads it from text), metavar is what --help
    says to write (N, SECONDS, URL), shown how it shows the default."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "parse": parse,
                                                        "metavar": metavar, "shown": shown})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything an operator can tune: create_app() takes these as keywords, the command line as
    options (see parse_args), each under the same name. Checked (and text read) on creation."""

    data_path: Path = option(Path("counters.json"), "the JSON file holding the counters, relative to the "
                             "working directory (its journal is beside it: FILE.journal)", flag="--data",
                             parse=data_path, metavar="FILE")
    save_interval: float = option(1.0, "seconds between saves (each appends what changed to the journal)",
                                  parse=positive_float, metavar="SECONDS")
    durable: bool = option(False, "answer a change only once it is on disk (group commit)", parse=switch)
    auto_create: bool = option(False, "a POST to an unknown id creates the counter", parse=switch)
    max_counters: int = option(10_000, "the most counters there may be for --auto-create to make another",
                               parse=positive_int, metavar="N")
    post_rate: float | None = option(None, "increments per second per client address and counter, in "
                                     "bursts of twice that; past it, 429", parse=positive_float,
                                     metavar="PER_SECOND", shown="unlimited")
    trust_proxy: bool = option(False, "take the client address from the last X-Forwarded-For entry: only "
                               "behind nginx or Pushpin, never when clients reach livecounter directly "
                               "(they could claim any address)", parse=switch)
    keepalive_interval: float = option(15.0, "seconds of silence before a stream gets a ':' comment",
                                       parse=positive_float, metavar="SECONDS")
    stall_timeout: float = option(30.0, "seconds a listener may refuse data before it is disconnected",
                                  parse=positive_float, metavar="SECONDS")
    cors_origin: str = option("*", "the Access-Control-Allow-Origin of every answer: one origin such as "
                              "https://site.example, or * for any", parse=allowed_origin, metavar="ORIGIN")
    max_listeners: int | None = option(None, "concurrent event streams; past it, 503", parse=positive_int,
                                       metavar="N", shown="the open-file limit less a tenth of it, or "
                                       "less 64 if that is more")
    max_listeners_per_ip: int = option(1000, "concurrent event streams per client address; past it, 429",
                                       parse=positive_int, metavar="N")
    grip_urls: tuple[str, ...] = option((), "a Pushpin's publish endpoint, e.g. http://127.0.0.1:5561/ "
                                        "(repeat the option for each Pushpin; the variable takes them "
                                        "separated by spaces)", flag="--grip-url", parse=http_endpoint,
                                        metavar="URL", shown="none")
    grip_link_timeout: int = option(30, "seconds after which Pushpin asks livecounter what an idle stream "
                                    "missed: the longest a stream held by Pushpin can stay behind if a "
                                    "publish is lost", parse=positive_int, metavar="SECONDS")
    grip_stats: tuple[str, ...] = option((), "a Pushpin's stats socket (its stats_spec, Debian's "
                                         "ipc:///var/run/pushpin/pushpin-stats), so that watcher counts "
                                         "include the streams it holds; needs pyzmq (repeat for each; the "
                                         "variable takes them separated by spaces)", parse=stats_endpoint,
                                         metavar="ENDPOINT", shown="none")
    grip_key: str | None = option(None, "the key Pushpin signs Grip-Sig with (its sig_key); unset, any "
                                  "Grip-Sig is taken", parse=optional_key, metavar="KEY", shown="unset")
    grip_message_rate: int = option(2500, "publish items a second sent to each Pushpin, at most: set it to "
                                    "Pushpin's message_rate (past that Pushpin drops what it can't deliver, "
                                    "yet answers 200); each change is 2 items, and counters waiting their "
                                    "turn keep only their latest value", parse=positive_int, metavar="N")
    purge_urls: tuple[str, ...] = option((), "a cache in front (e.g. Varnish, http://127.0.0.1:6081/): reads "
                                         "become cacheable, and every change sends it PURGE /counters/ID/ "
                                         "(repeat for each; the variable takes them separated by spaces)",
                                         flag="--purge-url", parse=http_endpoint, metavar="URL", shown="none")
    cache_seconds: int = option(600, "with --purge-url, how long a cache may keep a read (s-maxage)",
                                parse=positive_int, metavar="SECONDS")
    redis: str | None = option(None, "keep the counters in Redis, shared by every process that names it: "
                               "redis://HOST:PORT[/DB], rediss://..., unix://PATH, or "
                               "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]; needs redis-py "
                               '(pip install "livecounter[redis]")', parse=redis_url, metavar="URL", shown="none: the data file")
    reconnect_window: ReconnectWindow = option(
        ReconnectWindow(1, 5), "seconds a client waits before it reconnects a stream that ended (a "
        "restart), drawn for each stream (its SSE retry field) so that they don't all come back at once",
        parse=ReconnectWindow.parse, metavar="MIN-MAX")
    # Not an option: a token on the command line would show in ps. LIVECOUNTER_ADMIN_TOKEN sets it.
    admin_token: str | None = option(None, "", parse=any_text)  # PUT and DELETE need it as a Bearer token

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, checked_setting(field, getattr(self, field.name)))


def checked_setting(field: dataclasses.Field, given: object) -> object:
    """A setting's value as its field's parse reads it (ValueError naming the setting if it can't):
    None where the default is None, each item of a list setting (a tuple or list, never a string)."""
    parse = field.metadata["parse"]
    try:
        if given is None and field.default is None:
            return None
        if isinstance(field.default, tuple):
            if isinstance(given, (str, bytes)) or not isinstance(given, (tuple, list)):
                raise ValueError(f"takes a list of them, e.g. ({field.default or 'URL'!r},), not {given!r}")
            return tuple(parse(item) for item in given)
        return parse(given)
    except ValueError as error:
        raise ValueError(f"{field.name}: {error}") from None


def default_max_listeners() -> int:
    """Listeners the process's open-file limit allows, keeping room for POSTs, the data file and logs."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = 1_000_000
    return max(1, soft_limit - max(64, soft_limit // 10))


# --------------------------------------------------------------------------------------------------
# Counters, and the one feed their changes leave by
# --------------------------------------------------------------------------------------------------
#
# A change is about a channel: a counter's values, or its watcher count (how many streams carry its
# values, see Presence). The channel's Key names it wherever a change goes: the frames streams get,
# the paths a cache in front holds, the channels Pushpin holds streams on. The store makes each
# change and hands it to the ChangeFeed, which passes it, in order, to every receiver registered in
# create_app: the journal first (in durable mode the others hear of a change only once it is on
# disk), then the listener hub, presence, the cache purger and the GRIP publisher. A new receiver is
# one registration. A deletion ends both channels of its counter.

# Not only dots: browsers and proxies resolve "." and ".." in a path, so such a counter can't be
# reached. One pattern for the route (where "/" follows the id) and for ids checked on their own.
ID_PATTERN = r"(?!\.+(?:/|$))[A-Za-z0-9._-]{1,64}"
COUNTER_ID = re.compile(ID_PATTERN)
ID_RULE = "an id is 1-64 letters, digits, '.', '_' or '-', and not only dots"
MAX_VALUE = 2**53 - 1  # the largest integer a browser's JavaScript reads exactly

# Every change goes out in four encodings, made once per broadcast: a single-counter stream's
# "message" event, or a multi-counter stream's "counter" (or "watchers") event, each bare (HTTP/1.0)
# or as one chunk (HTTP/1.1). A listener's `style` is its index into that tuple.
Frames = tuple[bytes, bytes, bytes, bytes]
MESSAGE_STYLE, NAMED_STYLE = 0, 2  # + 1 when chunked


def chunk(payload: bytes) -> bytes:
    """payload as one chunk of HTTP/1.1 chunked transfer encoding."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Key(tuple):
    """A channel: a counter's values, Key((id, False)), or its watcher count, Key((id, True)). Made
    with tuple's own constructor, the cheapest there is: a POST makes one. Ids are letters, digits,
    '.', '_' and '-': nothing in them needs escaping in JSON, a path or a Pushpin channel name."""

    __slots__ = ()
    counter_id: str = property(operator.itemgetter(0))  # type: ignore[assignment]
    watchers: bool = property(operator.itemgetter(1))  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Key(({self[0]!r}, {self[1]!r}))"

    @property
    def count(self) -> Key:
        """The channel of this counter's watcher count."""
        return Key((self.counter_id, True))

    def frames(self, value: int) -> Frames:
        """The channel's value in every style. A watcher count is a "message" event on a single
        stream (the same shape as a value) and a "watchers" event on a multi-counter stream."""
        message = b"event: message\ndata: %d\n\n" % value
        if self.watchers:
            named = b'event: watchers\ndata: {"id": "%s", "watchers": %d}\n\n' % (self.counter_id.encode(), value)
        else:
            named = b'event: counter\ndata: {"id": "%s", "value": %d}\n\n' % (self.counter_id.encode(), value)
        return message, chunk(message), named, chunk(named)

    @property
    def purge_path(self) -> str:
        """What a cache in front holds of the channel, relative to the cache's URL."""
        return f"counters/{self.counter_id}/watchers/" if self.watchers else f"counters/{self.counter_id}/"

    def grip_channel(self, multi: bool) -> str:
        """The Pushpin channel of single-counter ("message" events) or multi-counter streams. No id
        has ':', so no names collide."""
        if self.watchers:
            return f"watchers:{self.counter_id}" if multi else f"watchers-{self.counter_id}"
        return f"counters:{self.counter_id}" if multi else f"counter-{self.counter_id}"

    @classmethod
    def of_grip_channel(cls, channel: str) -> tuple[Key, bool] | None:
        """The key of a Pushpin channel, and whether it is a multi-counter stream's; None if it is
        none of livecounter's."""
        for watchers in (False, True):
            for multi in (False, True):
                prefix = cls(("", watchers)).grip_channel(multi)
                if channel.startswith(prefix) and COUNTER_ID.fullmatch(channel[len(prefix):]):
                    return cls((channel[len(prefix):], watchers)), multi
        return None


def stream_style(*, multi: bool, chunked: bool) -> int:
    return (NAMED_STYLE if multi else MESSAGE_STYLE) + chunked


def encode_values(values: dict[Key, int], style: int) -> bytes:
    """These channels' values as frames of one style: a stream's first frames, or a catch-up."""
    return b"".join(key.frames(value)[style] for key, value in values.items())


Receiver = Callable[[Key, "int | None"], None]  # hears of a channel's new value; None: it is gone


class ChangeFeed:
    """The one way a change leaves the store: to every receiver, in the order the changes were made.
    The keeper (persistence) hears of a counter's changes first; in durable mode the others hear of
    them only once it holds them on disk (it calls release). Watcher counts are kept nowhere."""

    def __init__(self) -> None:
        self._receivers: list[Receiver] = []
        self._deletion_receivers: list[Receiver] = []
        self._failed: set[Receiver] = set()  # receivers that raised: logged once each
        self._keeper: Journal | None = None
        self._held_until_kept = False

    def register(self, receiver: Receiver, *, deletions_only: bool = False) -> None:
        """receiver hears of every change, or (deletions_only) only that a counter is gone."""
        (self._deletion_receivers if deletions_only else self._receivers).append(receiver)

    def keep_with(self, keeper: Journal, *, durable: bool) -> None:
        self._keeper = keeper
        self._held_until_kept = durable

    def changed(self, key: Key, value: int | None) -> None:
        """A change the store (or presence) made. Every POST passes here: key[0] is its counter id,
        key[1] whether it is a watcher count, and the receivers are called without release()."""
        if self._keeper is not None and not key[1]:
            self._keeper.record(key[0], value)
            if self._held_until_kept:
                return  # the keeper releases it once it is on disk
        if value is None:
            self.release(key, None)
            return
        for receiver in self._receivers:
            try:
                receiver(key, value)
            except Exception:  # noqa: BLE001 - a bug in one receiver must not keep a change from the others
                self._failed_once(receiver, key)

    def release(self, key: Key, value: int | None) -> None:
        """Pass a change to every receiver (the keeper's, once it holds it)."""
        for receiver in self._receivers if value is not None else self._receivers + self._deletion_receivers:
            try:
                receiver(key, value)
            except Exception:  # noqa: BLE001 - a bug in one receiver must not keep a change from the others
                self._failed_once(receiver, key)
        if value is None and not key.watchers:  # a counter gone: its watcher count goes with it
            self.release(key.count, None)

    def _failed_once(self, receiver: Receiver, key: Key) -> None:
        if receiver not in self._failed:
            self._failed.add(receiver)
            log.exception("%s failed on a change of %s (logged once)", receiver.__qualname__, key)


# How fast changes fan out (to streams, to Pushpin, as watcher counts) is one policy: at once while
# calm, and after a rest while hot. What fans out is hot when a change comes sooner after its last
# fan-out than that fan-out took: changes come faster than it can send them, and the work they hold
# up (increments, other counters) waits. Hot, it rests REST times as long as its last fan-out took,
# so that fan-outs take at most a sixth of the time, and the next carries whatever is latest by
# then. What shares a cost shares a pace: the streams of every counter share the event loop, so
# the hub has one pace for all of them (ten hot counters rest as one, taking turns); Pushpin
# deliveries and watcher counts cost per channel, so their paces are per channel.

REST = 5


class Pace:
    """The last fan-out of what shares a pace: when it ended and how long it took (what it is taken
    to cost)."""

    __slots__ = ("ended", "took")

    def __init__(self) -> None:
        self.ended = -math.inf
        self.took = 0.0

    def wait(self, now: float) -> float:
        """Seconds before the next fan-out may go: 0 while calm, the rest of its rest while hot."""
        since = now - self.ended
        if since >= self.took:
            return 0.0
        return REST * self.took - since

    def went(self, took: float, now: float) -> None:
        self.took = took
        self.ended = now


class Paces:
    """The paces of a receiver's channels, each kept only as long as it can make one wait."""

    def __init__(self, longest_cost: float) -> None:
        self._paces: collections.OrderedDict[Hashable, Pace] = collections.OrderedDict()
        self._kept_for = REST * longest_cost  # after that long a pace waits for nothing

    def wait(self, channel: Hashable, now: float) -> float:
        pace = self._paces.get(channel)
        return 0.0 if pace is None else pace.wait(now)

    def went(self, channel: Hashable, took: float, now: float) -> None:
        pace = self._paces.pop(channel, None) or Pace()
        pace.went(took, now)
        self._paces[channel] = pace  # the newest last
        while next(iter(self._paces.values())).ended + self._kept_for < now:
            self._paces.popitem(last=False)

    def forget(self, channel: Hashable) -> None:
        self._paces.pop(channel, None)

    def __len__(self) -> int:
        return len(self._paces)


class CounterLimitReached(Exception):
    """Auto-create would pass --max-counters."""


class Unavailable(Exception):
    """The store can't take a change now (durable saves fail, Redis is down): the message says why,
    and the change is not acknowledged."""


LISTING_SEARCH = 25_000  # ids searched at a time for a page's after= (a few ms of the loop)


class CounterStore:
    """Counter values in memory. Each change goes to the feed. A write answers the new value, or in
    durable mode an awaitable of it, done once the journal holds the change (see kept_by): the
    handlers await what is awaitable, whatever the store. In durable mode streams hear only of
    values on disk: `announced` follows the feed (see heard), and new streams start from it."""

    def __init__(self, counters: dict[str, int], feed: ChangeFeed, *, auto_create: bool, max_counters: int,
                 durable: bool) -> None:
        self._values = counters
        self._feed = feed
        self._auto_create = auto_create
        self._max_counters = max_counters
        self._kept: Callable[[], Awaitable[None]] | None = None  # durable mode: what an answer waits for
        self._announced = dict(counters) if durable else counters  # the values listeners know
        self.refusing: str | None = None  # why it takes no change now (read by every write, up front)
        # For pages of the listing: the ids in order, copied when a page needs them after counters
        # were made or deleted (made_or_deleted counts those).
        self._listed: tuple[int, list[str]] | None = None
        self._made_or_deleted = 0
        self.increments = 0  # for /metrics

    @property
    def values(self) -> dict[str, int]:
        """Every value, for persistence (not to be changed)."""
        return self._values

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

    def announced_value(self, counter_id: str) -> int | None:
        """The counter's value as its listeners know it: in durable mode the one on disk (a counter
        not saved yet is, for them, as if it didn't exist); None if it doesn't exist for them."""
        return self._announced.get(counter_id, 0 if self._auto_create else None)

    def heard(self, key: Key, value: int | None) -> None:
        """Durable mode: a change the journal holds, registered first on the feed."""
        if key.watchers:
            return
        if value is None:
            self._announced.pop(key.counter_id, None)
        else:
            self._announced[key.counter_id] = value

    def kept_by(self, kept: Callable[[], Awaitable[None]]) -> None:
        """Durable mode: every write's answer waits for kept() (the journal's group commit)."""
        self._kept = kept

    async def _once_kept(self, answer: Any) -> Any:
        try:
            await self._kept()
        except SaveFailed as failure:
            raise Unavailable(str(failure)) from None
        return answer

    def increment(self, counter_id: str) -> int | Awaitable[int]:
        """Add one: the new value (or an awaitable of it, see kept_by). Unknown: KeyError, or created
        at 0 under auto-create (CounterLimitReached past max_counters). OverflowError past MAX_VALUE."""
        values = self._values
        if counter_id not in values and self._auto_create:
            if len(values) >= self._max_counters:
                raise CounterLimitReached(self._max_counters)
            values[counter_id] = 0
            self._made_or_deleted += 1
        value = values[counter_id] + 1
        if value > MAX_VALUE:
            raise OverflowError(counter_id)
        values[counter_id] = value
        self.increments += 1
        self._feed.changed(Key((counter_id, False)), value)
        return value if self._kept is None else self._once_kept(value)

    def set(self, counter_id: str, value: int) -> int | Awaitable[int]:
        """Set (and create) a counter; the caller checked that value is within ±MAX_VALUE."""
        self._made_or_deleted += counter_id not in self._values
        self._values[counter_id] = value
        self._feed.changed(Key((counter_id, False)), value)
        return value if self._kept is None else self._once_kept(value)

    def delete(self, counter_id: str) -> None | Awaitable[None]:
        """Remove a counter; KeyError if unknown."""
        del self._values[counter_id]
        self._made_or_deleted += 1
        self._feed.changed(Key((counter_id, False)), None)
        return None if self._kept is None else self._once_kept(None)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def made_or_deleted(self) -> int:
        """How many times a counter was made or deleted: values alone changed while it stays."""
        return self._made_or_deleted

    def ids(self) -> list[str]:
        """Every counter's id, in the order they were made (the data file's order, then creation)."""
        return list(self._values)

    def first_ids(self, limit: int) -> list[str]:
        """The first `limit` ids in the listing's order (no copy of them all)."""
        return list(itertools.islice(self._values, limit))

    async def ids_after(self, counter_id: str, limit: int) -> list[str] | None:
        """The `limit` ids after counter_id in the listing's order; None if it is no counter. The ids
        are copied once for each state of the set of counters (12 ms for a million), and searched
        LISTING_SEARCH at a time with the loop free in between (a dict of positions would stall it
        longer when it grows)."""
        if counter_id not in self._values:
            return None
        if self._listed is None or self._listed[0] != self._made_or_deleted:
            self._listed = self._made_or_deleted, list(self._values)
        ids = self._listed[1]  # never changed in place: a new state gets a new list
        for start in range(0, len(ids), LISTING_SEARCH):
            try:
                position = ids.index(counter_id, start, start + LISTING_SEARCH)
            except ValueError:
                await asyncio.sleep(0)
                continue
            return ids[position + 1:position + 1 + limit]
        return None

    def values_of(self, counter_ids: Sequence[str]) -> dict[str, int]:
        """The values of those of counter_ids that exist."""
        values = self._values
        return {counter_id: values[counter_id] for counter_id in counter_ids if counter_id in values}


# --------------------------------------------------------------------------------------------------
# Persistence: the data file and its journal
# --------------------------------------------------------------------------------------------------
#
# The data file (counters.json) is a JSON object of every counter, the shipped and readable file.
# A save appends what changed since the last one to the journal beside it (FILE.journal): one line
# per save, a JSON object of the counters that changed and their values then (null: deleted), so a
# save costs what changed, and replaying a line twice is harmless. In durable mode each save is one
# fdatasync of the journal, answering every change it holds (group commit).
#
# When the journal outgrows the data file (and at a clean stop) it is compacted: renamed aside
# (FILE.journal.compacting), then the data file is rewritten atomically from the values in memory
# (read in a thread, while saves go on into a new journal), then the old journal is removed. The
# values written are at least as new as the old journal, and anything newer is in the new journal,
# so a start (the data file, then the old journal if a crash left it, then the journal) comes to
# the same values whenever a crash struck.

class DataFileError(Exception):
    """The data file or its journal can't be used; the message names the file and the problem."""


class SaveFailed(Exception):
    """Durable mode: the save that would have made a change durable failed; the message says why."""


FIRST_RETRY_DELAY = 0.1  # seconds before the first retry of a failed save, purge or publish; doubles
LAST_RETRY_DELAY = 5.0  # up to this


class Outage:
    """Whether something the server keeps doing (saving, publishing, ...) fails, and why: logged once
    per outage, with the delay before the next try doubling while it lasts."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.error: str | None = None  # why it failed last; None while it works
        self.retry_delay = FIRST_RETRY_DELAY

    def failed(self, reason: str, *, unexpected: BaseException | None = None) -> None:
        """It failed; `unexpected`: an error no code expected (a bug), logged with its traceback."""
        if self.error is None:
            log.error("%s failed, will retry: %s", self.what, reason,
                      exc_info=(type(unexpected), unexpected, unexpected.__traceback__) if unexpected else None)
            self.retry_delay = FIRST_RETRY_DELAY
        else:
            self.retry_delay = min(2 * self.retry_delay, LAST_RETRY_DELAY)
        self.error = f"{self.what} failed: {reason}"

    def succeeded(self) -> None:
        if self.error is not None:
            log.info("%s works again", self.what)
            self.error = None


def errors_of(outages: Iterable[Outage]) -> str | None:
    """Why they fail, for /healthz; None while all of them work."""
    return "; ".join(outage.error for outage in outages if outage.error) or None


def unexpected(error: BaseException) -> BaseException | None:
    """error, if no outside part explains it (a bug, whose traceback is logged); None for what a peer
    or a disk does: a refused or broken connection, a timeout, an answer that isn't the one expected."""
    return None if isinstance(error, (aiohttp.ClientError, asyncio.TimeoutError, OSError)) else error


def failure_reason(error: BaseException) -> str:
    """One line for the log and /healthz; a timeout's message is empty, an unexpected error names its type."""
    if isinstance(error, (aiohttp.ClientError, asyncio.TimeoutError)):  # 3.10: not the builtin TimeoutError
        return str(error) or type(error).__name__
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return f"{type(error).__name__}: {error}"


async def forever(outage: Outage, step: Callable[[], Awaitable[None]]) -> None:
    """Run step() again and again for as long as the app runs. Nothing ends the loop: an error step()
    doesn't handle (a bug) is logged once per outage with its traceback, /healthz says it, and the
    loop goes on after the outage's delay."""
    while True:
        try:
            await step()
        except Exception as error:  # noqa: BLE001 - CancelledError (a stop) is no Exception and ends it
            outage.failed(failure_reason(error), unexpected=error)
            await asyncio.sleep(outage.retry_delay)


async def waited(done: Callable[[], bool], timeout: float, interval: float) -> None:
    """Return once done() holds, or after timeout seconds, asking every interval seconds."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(interval)


class Loaded(NamedTuple):
    counters: dict[str, int]
    snapshot_bytes: int  # the data file's size (0: none)
    journal_bytes: int  # the whole records of the journal


def load_counters(path: Path, *, starting: bool = True) -> Loaded:
    """Read and check the data file, then replay the journals beside it: a compaction's left by a
    crash, then the current one. A missing data file means no counters yet; a torn last record of a
    journal (a crash in mid-write: with --durable nothing acknowledged was in it) is dropped with a
    warning, and cut off the journal when starting (appends then follow a whole record). Not
    starting (a look at what is saved, or the seed of --redis, which writes no file): no changes, no
    warning of a missing file."""
    target = Path(os.path.realpath(path))
    journal, compacting = journal_paths(target)
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
        if starting and not (journal.exists() or compacting.exists()):
            log.warning("%s does not exist: starting with no counters (an admin PUT makes one, or "
                        "--auto-create lets a POST make it); the first change creates the file", path)
    except (OSError, UnicodeDecodeError) as error:
        raise DataFileError(f"{path}: cannot read: {error}") from None
    counters = {} if text is None else checked_counters(path, text)
    for replayed in (compacting, journal):
        journal_bytes = replay(replayed, counters, cut_torn=starting and replayed is journal)
    return Loaded(counters, 0 if text is None else len(text.encode()), journal_bytes)


def journal_paths(target: Path) -> tuple[Path, Path]:
    """The journal beside the data file (its real path), and the one a compaction renamed aside."""
    return target.with_name(target.name + ".journal"), target.with_name(target.name + ".journal.compacting")


def checked_counters(path: Path, text: str) -> dict[str, int]:
    try:
        counters = json.loads(text, object_pairs_hook=_refuse_duplicate_ids)
    except ValueError as error:
        raise DataFileError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(counters, dict):
        raise DataFileError(f"{path}: must be a JSON object mapping counter ids to integers")
    for counter_id, value in counters.items():
        if problem := record_problem(counter_id, value, deletion=False):
            raise DataFileError(f"{path}: {problem}")
    return counters


def record_problem(counter_id: str, value: object, *, deletion: bool) -> str | None:
    """What is wrong with a counter's entry (None: nothing); a journal's may be null, a deletion."""
    if not COUNTER_ID.fullmatch(counter_id):
        return f"invalid counter id {counter_id!r} ({ID_RULE})"
    if value is None and deletion:
        return None
    if type(value) is not int:  # bool is an int subclass; true is not a count
        return f"counter {counter_id!r} holds {json.dumps(value)}, not an integer"
    if abs(value) > MAX_VALUE:
        return f"counter {counter_id!r} holds {value}, outside ±(2^53 - 1)"
    return None


def _refuse_duplicate_ids(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"counter {key!r} appears twice")
        result[key] = value
    return result


def replay(journal: Path, counters: dict[str, int], *, cut_torn: bool) -> int:
    """Apply a journal's records to counters, in order; the bytes of its whole records. A torn last
    record is dropped (and, with cut_torn, cut off the file, so that appends follow a whole one)."""
    try:
        data = journal.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise DataFileError(f"{journal}: cannot read: {error.strerror or error}") from None
    lines = data.split(b"\n")  # the last is what follows the last newline: empty, or torn
    whole = len(data) - len(lines[-1])
    for number, line in enumerate(lines[:-1], 1):
        try:
            record = json.loads(line, object_pairs_hook=_refuse_duplicate_ids)
            if not isinstance(record, dict):
                raise ValueError("a record is a JSON object")
        except ValueError as error:
            if number < len(lines) - 1:
                raise DataFileError(f"{journal}: line {number} is no record ({error}); only the last "
                                    "can be torn by a crash") from None
            whole -= len(line) + 1  # the last line, newline and all, yet not whole: dropped too
            lines[-1] = line
            break
        for counter_id, value in record.items():
            if problem := record_problem(counter_id, value, deletion=True):
                raise DataFileError(f"{journal}: line {number}: {problem}")
            if value is None:
                counters.pop(counter_id, None)
            else:
                counters[counter_id] = value
    if whole < len(data):
        log.warning("%s: dropped a torn last record (%d bytes, a crash in mid-write; with --durable nothing "
                    "acknowledged was in it)", journal, len(data) - whole)
        if cut_torn:
            try:
                os.truncate(journal, whole)
            except OSError as error:
                raise DataFileError(f"{journal}: cannot cut its torn last record: {error.strerror or error}") from None
    return whole


SNAPSHOT_PIECE = 1_000  # counters formatted at a time: well under a millisecond, see snapshot_pieces


def snapshot_pieces(ids: Iterable[str], values: dict[str, int]) -> Iterator[bytes]:
    """The data file's bytes, in pieces: the counters of ids that still exist, in order, indented
    like json.dumps(indent=2) (ids need no escaping). Runs in a thread, where what holds the GIL
    holds up the event loop: json.dumps of a million counters holds it for ~0.3 s, and even joining
    a million lines and freeing them again for ~70 ms. In pieces, each followed by a moment without
    the GIL in which the loop takes it, the loop waits for well under a millisecond, not for the
    5 ms a thread busy with Python code holds the GIL before it must let go."""
    opening = "{\n"
    ids = iter(ids)
    while piece := list(itertools.islice(ids, SNAPSHOT_PIECE)):
        lines = [f'  "{counter_id}": {value}' for counter_id in piece if (value := values.get(counter_id)) is not None]
        if lines:
            yield (opening + ",\n".join(lines)).encode()
            opening = ",\n"
        time.sleep(0)  # lets go of the GIL
    yield b"{}\n" if opening == "{\n" else b"\n}\n"


class CountersMoved(Exception):
    """Counters were made or deleted while the data file's ids were read without a copy."""


def write_atomically(path: Path, pieces: Iterable[bytes]) -> int:
    """Replace path with the pieces so that a crash at any instant leaves the old file or the new
    one; the bytes written. A symbolic link stays one: the file it points to is replaced, and keeps
    its mode and owner."""
    target = Path(os.path.realpath(path))
    temporary = target.with_name(target.name + ".tmp")  # beside the target: a rename can't cross file systems
    try:
        with open(temporary, "wb") as file:
            keep_permissions(target, file.fileno())  # before the data goes in, so no one else may read it
            written = sum(file.write(piece) for piece in pieces)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)  # makes the rename itself durable
    return written


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def keep_permissions(path: Path, descriptor: int) -> None:
    """Give the open file the mode, owner and group of the file at path, if there is one (a new
    file keeps the default mode): an operator's 0600 must survive the save that replaces it."""
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        return
    try:
        os.fchown(descriptor, existing.st_uid, existing.st_gid)
    except PermissionError:
        pass  # only root gives a file away (or to a group it isn't in): the mode still carries over
    os.fchmod(descriptor, stat.S_IMODE(existing.st_mode))  # after the owner: a chown clears setuid bits


COMPACT_AT_LEAST = 1 << 20  # journal bytes before a compaction: below that it replays in milliseconds


class Journal:
    """Saves: what changed goes to the journal behind the requests (within a save interval), or
    before their answer in durable mode (group commit: one fdatasync acknowledges every change made
    before it); the journal is folded into the data file when it outgrows it, and on a stop.

    The keeper of the change feed: it records every change of a counter first, and in durable mode
    releases them to the feed's other receivers once they are on disk, whether the request that
    made a change still waits or got a 503 from an earlier save."""

    def __init__(self, path: Path, loaded: Loaded, store: CounterStore, feed: ChangeFeed, *,
                 save_interval: float, durable: bool) -> None:
        self.path = path
        self._target = Path(os.path.realpath(path))
        self._journal, self._compacting = journal_paths(self._target)
        self._store = store  # refused changes while durable saves fail
        self._values = store.values  # read when the data file is rewritten
        self._feed = feed
        self._save_interval = save_interval
        self._durable = durable
        self._unsaved: dict[str, int | None] = {}  # counter id -> its latest value (None: deleted)
        self._waiting: list[asyncio.Future[None]] = []  # durable changes the next save acknowledges
        self._due = asyncio.Event()  # set by every change, cleared when a save takes them
        self._one_at_a_time = asyncio.Lock()  # appends, and a compaction's renaming of the journal
        self._descriptor: int | None = None  # the journal, open for appending
        self._journal_bytes = loaded.journal_bytes
        self._snapshot_bytes = loaded.snapshot_bytes
        self._snapshot_exists = self._target.exists()
        self._torn = False  # an append failed and could not be cut off: the next save compacts
        self._deleted: set[str] = set()  # counters deleted since the last save took its changes
        self._compaction: asyncio.Task[bool] | None = None
        self._one_compaction_at_a_time = asyncio.Lock()
        self._retrying_compaction: asyncio.TimerHandle | None = None
        self.saving = Outage(f"saving {path}")
        self.compacting = Outage(f"folding the journal into {path}")
        if durable:
            store.kept_by(self.kept)
        # For /metrics:
        self.saves = 0
        self.save_failures = 0
        self.compactions = 0
        self.compaction_failures = 0
        self.last_save_seconds = 0.0  # how long the last save took, failed or not
        # Wall-clock time the files last held every value: the last successful save, or the load (an
        # idle server never saves, and an alert on this age must not fire for it).
        self.last_saved_at = time.time()

    @property
    def save_error(self) -> str | None:
        """Why the last save failed; None while saves work."""
        return self.saving.error

    def record(self, counter_id: str, value: int | None) -> None:
        """The feed's keeper: a counter's change, to be saved. (A change waiting means a save is due
        already: the event is set only by the first of them, as every POST passes here.)"""
        unsaved = self._unsaved
        if not unsaved:
            self._due.set()
        unsaved[counter_id] = value
        if value is None:  # durable mode releases the deletion too, if the counter is made again
            self._deleted.add(counter_id)


    async def kept(self) -> None:
        """Durable mode: return once every change made before this call is on disk, and released.
        Raises SaveFailed with the reason if the save that would have written them fails; a later
        save that succeeds releases them."""
        if not self._durable:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        await waiter

    async def run_saves(self) -> None:
        """Save whenever something changed: one interval later (write-behind), at once in durable
        mode (while one save runs, the changes behind it gather for the next), and with a growing
        delay while saves fail."""
        await self._due.wait()
        if self.saving.error is not None:
            await asyncio.sleep(max(self.saving.retry_delay, 0 if self._durable else self._save_interval))
        elif not self._durable:
            await asyncio.sleep(self._save_interval)
        await self.save()

    async def save(self) -> None:
        """Append what changed now. A failure is logged once per outage and keeps the changes to save."""
        async with self._one_at_a_time:
            self._due.clear()
            batch, self._unsaved = self._unsaved, {}
            deleted, self._deleted = self._deleted, set()
            waiting, self._waiting = self._waiting, []
            if not batch and self._snapshot_exists and not self._torn:
                self._acknowledge(waiting)
                return
            started = time.perf_counter()
            try:
                if self._torn or not self._snapshot_exists:
                    # The data file is made by the first save, and a journal that may hold a broken
                    # record is folded into it, then started anew.
                    await self._in_thread(self._rotate_and_write_snapshot, list(self._values))
                else:
                    await self._in_thread(self._append, (json.dumps(batch) + "\n").encode())
            except Exception as error:  # noqa: BLE001 - a disk that fails, or a bug: the changes wait
                self._unsaved = batch | self._unsaved  # the newer values win
                self._deleted |= deleted
                self._save_failed(error, waiting)
            except asyncio.CancelledError:  # a stop while it ran: the final save answers them
                self._unsaved = batch | self._unsaved
                self._deleted |= deleted
                self._waiting[:0] = waiting
                self._due.set()
                raise
            else:
                self._save_succeeded(batch, deleted, waiting)
            finally:
                self.saves += 1
                self.last_save_seconds = time.perf_counter() - started
        if self.compaction_due():
            self._start_compaction()

    def compaction_due(self) -> bool:
        """Whether the journal outgrew the data file (bench/run.py makes it always, to time compactions)."""
        return self._journal_bytes > max(self._snapshot_bytes, COMPACT_AT_LEAST)

    def _start_compaction(self) -> None:
        self._retrying_compaction = None
        if self._compaction is None:
            self._compaction = asyncio.create_task(self.compact())

    @staticmethod
    async def _in_thread(work: Callable[..., None], *arguments: object) -> None:
        """Run blocking file work in a thread; a cancellation waits for it (a thread can't be stopped,
        and a second save must not write beside it) and is then raised."""
        done = asyncio.ensure_future(asyncio.to_thread(work, *arguments))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.wait([done])
            raise

    def _append(self, line: bytes) -> None:
        """Runs in a thread: the line at the journal's end, on disk. If it fails, what it wrote is cut
        off again (else the journal would hold a torn record before whole ones)."""
        if self._descriptor is None:
            created = not self._journal.exists()
            self._descriptor = os.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if created:
                keep_permissions(self._target, self._descriptor)
                fsync_directory(self._target.parent)
        whole = self._journal_bytes
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._descriptor, view):]
            os.fdatasync(self._descriptor)
        except OSError:
            try:
                os.ftruncate(self._descriptor, whole)
            except OSError:
                self._torn = True
            raise
        self._journal_bytes = whole + len(line)

    def _rotate_and_write_snapshot(self, ids: list[str]) -> None:
        """Runs in a thread, holding the lock: the data file anew, and no journal (a save that found
        it missing, or a journal that may end in a broken record)."""
        self._rotate()
        self._write_snapshot(ids)

    def _rotate(self) -> None:
        """The journal set aside for a compaction (unless one that failed left it: its records are
        older than those now in the journal, which stays)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        if not self._compacting.exists() and self._journal.exists():
            os.replace(self._journal, self._compacting)
            self._journal_bytes = 0
            self._torn = False

    def _write_snapshot(self, ids: list[str] | None = None) -> None:
        """Runs in a thread: the data file from the values of ids, or (None) of every counter, read
        in their own order without a copy while the event loop goes on (a copy of a million ids
        holds it for ~15 ms). Where counters were made or deleted meanwhile, the order may have moved
        under the reading: the file is then written again, from a copy."""
        try:
            written = write_atomically(self._target, snapshot_pieces(
                self._every_id_unmoved() if ids is None else ids, self._values))
        except CountersMoved:
            written = write_atomically(self._target, snapshot_pieces(list(self._values), self._values))
        self._snapshot_bytes = written
        self._snapshot_exists = True
        self._compacting.unlink(missing_ok=True)
        fsync_directory(self._target.parent)

    def _every_id_unmoved(self) -> Iterator[str]:
        """Every counter's id, read from the values themselves; CountersMoved (at the end, before
        the file replaces the data file) if counters were made or deleted in the meantime."""
        made_or_deleted = self._store.made_or_deleted
        try:
            yield from self._values
        except RuntimeError:  # the dict changed size while it was read
            raise CountersMoved from None
        if self._store.made_or_deleted != made_or_deleted:
            raise CountersMoved

    async def compact(self) -> bool:
        """Fold the journal into the data file: set it aside between two saves (they then go on into
        a new journal), rewrite the data file from the values in a thread (each as it is when its
        piece is written: at least as new as the old journal, and the new one replays the rest),
        remove the old journal; one at a time. Whether it worked: a failure (a full disk) is an outage of its own,
        which refuses no change (they are on disk, in the journal), retried after a while; the old
        journal stays until a compaction succeeds."""
        async with self._one_compaction_at_a_time:
            try:
                async with self._one_at_a_time:
                    await self._in_thread(self._rotate)
                started = time.perf_counter()
                await self._in_thread(self._write_snapshot)
            except Exception as error:  # noqa: BLE001 - the old journal stays; a later compaction folds it
                self.compacting.failed(failure_reason(error), unexpected=unexpected(error))
                self.compaction_failures += 1
                if self._retrying_compaction is None:
                    self._retrying_compaction = asyncio.get_running_loop().call_later(
                        self.compacting.retry_delay, self._start_compaction)
                return False
            else:
                self.compacting.succeeded()
                self.compactions += 1
                log.info("compacted the journal into %s in %.2f s", self.path, time.perf_counter() - started)
                return True
            finally:
                if self._compaction is asyncio.current_task():
                    self._compaction = None

    def _save_failed(self, error: Exception, waiting: list[asyncio.Future[None]]) -> None:
        self._due.set()
        self.saving.failed(failure_reason(error), unexpected=unexpected(error))
        if self._durable:  # it takes no change it can't write: 503 up front, while saves fail
            self._store.refusing = self.saving.error
        self.save_failures += 1
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(SaveFailed(self.saving.error))

    def _save_succeeded(self, batch: dict[str, int | None], deleted: set[str],
                        waiting: list[asyncio.Future[None]]) -> None:
        self.last_saved_at = time.time()
        self.saving.succeeded()
        self._store.refusing = None
        if self._durable:  # on disk: the other receivers hear of them now
            for counter_id in deleted:
                if batch.get(counter_id) is not None:  # deleted, then made again: its streams end first
                    self._feed.release(Key((counter_id, False)), None)
            for counter_id, value in batch.items():
                self._feed.release(Key((counter_id, False)), value)
        self._acknowledge(waiting)

    @staticmethod
    def _acknowledge(waiting: list[asyncio.Future[None]]) -> None:
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        """On a stop, once the requests have ended: the last changes saved, then the journal folded
        into the data file (which then holds every value) and left empty. If saving fails, say what
        is lost: the counters whose values the files don't hold."""
        if self._unsaved or self._torn:
            await self.save()
        if self._retrying_compaction is not None:
            self._retrying_compaction.cancel()
        compacted = False
        if self._compaction is not None:  # one the last save made due
            compacted = (await asyncio.gather(self._compaction, return_exceptions=True))[0] is True
        if self.saving.error is None and (self._journal_bytes or self._compacting.exists()):
            compacted = await self.compact()
            if not compacted:
                log.warning("stopping with the journal beside %s (%s): the next start replays it", self.path,
                            self.compacting.error)
        if compacted and self.saving.error is None:
            self._empty_journal()
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        if self.saving.error is not None:
            log.error("stopping with %s not saved: %s", self._not_on_disk(), self.saving.error)

    def _empty_journal(self) -> None:
        """The journal, empty (every value is in the data file), with the data file's mode and owner."""
        with contextlib.suppress(OSError):
            descriptor = os.open(self._journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                keep_permissions(self._target, descriptor)
            finally:
                os.close(descriptor)

    def _not_on_disk(self) -> str:
        try:
            on_disk = load_counters(self.path, starting=False).counters
        except (OSError, DataFileError):
            on_disk = {}
        differ = sum(on_disk.get(counter_id) != value for counter_id, value in self._values.items())
        differ += sum(counter_id not in self._values for counter_id in on_disk)  # deleted since
        return f"the values of {differ} counter{'s' * (differ != 1)}"


# --------------------------------------------------------------------------------------------------
# The listener hub: fan-out of changes to SSE streams
# --------------------------------------------------------------------------------------------------
#
# A stream's listener is admitted before its first frames are computed, with no await between: it
# holds its slot in the limits, and counts among its counters' watchers, from then on. Once the
# stream's headers and first frames are out, the hub takes its connection over from aiohttp: the
# socket is duplicated, aiohttp's transport is aborted (which closes only aiohttp's descriptor) and
# the hub writes to the duplicate itself. aiohttp then frees everything it held for the request
# (parser, request, handler task, timers) and a listener costs a socket and one small object. A
# change made while the first frames went out reaches the stream when it is taken over.
#
# The hub writes with send() on the non-blocking socket, not through an asyncio transport: what the
# kernel doesn't take is the listener's only backlog in user space (the rest of one frame), so a
# listener that stops reading costs its kernel send buffer and no more, whatever the event loop's
# own accounting (uvloop's transports queue each small write with a large overhead and pause too
# late). Such a listener skips values and gets the latest once it drains.
#
# What the take-over relies on in aiohttp, checked by the tests on every version CI runs (the lowest
# aiohttp requirements.txt allows, and the newest): request.transport is the connection's transport,
# its "socket" extra info has the descriptor, get_write_buffer_size() says when aiohttp's bytes are
# out, and a handler that finds its transport aborted returns without writing more.
#
# A change is encoded once and written straight to every listener's socket: the kernel's send is the
# floor, so the loop around it stays as thin as possible. A channel's broadcasts follow the pace
# every fan-out follows (see Pace): at once while calm, after a rest while hot.

LISTENER_SNDBUF = 16 * 1024  # kernel send buffer per listener: a frozen client pins this, not ~2 MB
LAST_CHUNK = b"0\r\n\r\n"  # ends a chunked response


def retry_field(window: ReconnectWindow) -> bytes:
    """What a stream's first event starts with: how long the client waits before it reconnects, drawn
    for this stream, so that a restart's crowd comes back spread over the window. In the first
    event's own block: a block of only `retry:` is an empty message to some clients (httpx-sse)."""
    return b"retry: %d\n" % window.draw_ms()


KEEPALIVE = b":\n\n"
KEEPALIVE_FRAMES: Frames = (KEEPALIVE, chunk(KEEPALIVE)) * 2


class Listener:
    """One stream: its slot in the hub's limits and its channels from the moment it is admitted,
    then its socket."""

    __slots__ = ("hub", "client", "style", "sock", "channels", "first", "unsent", "behind_since", "counted")

    def __init__(self, hub: ListenerHub, client: str, style: int) -> None:
        self.hub = hub
        self.client = client  # its address, for the per-client cap
        self.style = style
        self.sock: socket.socket | None = None  # the duplicate, once the hub took the stream over
        self.channels: list[Channel] = []
        self.first: dict[Key, int] | None = {}  # what its first frames carry, until it is taken over
        self.unsent = b""  # what the kernel didn't take of the last write; not empty: behind
        self.behind_since = 0.0  # monotonic time it fell behind; 0 while it keeps up
        self.counted = True  # holds a slot in listener_count, its client's count and its channels

    def write(self, data: bytes) -> None:
        """Send data, or as much as the kernel takes; the rest goes out when the socket drains, and
        until then the listener skips values (the hub doesn't write to it)."""
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client is gone: its socket is readable now, and on_readable() drops it
            return
        if sent < len(data):
            self.unsent = data[sent:]
            self.hub.fell_behind(self)

    def on_readable(self) -> None:
        """The client of a stream has nothing more to say: what it sends is dropped; EOF means it left."""
        try:
            if self.sock.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.hub.disconnect(self)

    def on_writable(self) -> None:
        """The socket drained: the rest of the last write, then the latest values."""
        try:
            sent = self.sock.send(self.unsent)
        except BlockingIOError:
            return
        except OSError:
            self.hub.disconnect(self)
            return
        self.unsent = self.unsent[sent:]
        if not self.unsent:
            self.hub.caught_up(self)

    def close(self) -> None:
        """Close the socket now. Whatever the kernel holds still goes out before its FIN; nothing in
        user space waits for a client that doesn't read."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        if self.unsent:
            loop.remove_writer(self.sock.fileno())
        self.sock.close()


class Channel:
    """One channel's listeners (taken over, and still arriving) and what they have been sent."""

    __slots__ = ("key", "listeners", "arriving", "value", "sent", "pending", "last_write")

    def __init__(self, key: Key, value: int) -> None:
        self.key = key
        self.listeners: set[Listener] = set()  # taken over: broadcasts write to them
        self.arriving: set[Listener] = set()  # admitted, their first frames still going out
        self.value = value  # the latest value the feed released
        self.sent = value  # the value the last broadcast carried
        self.pending = False  # a broadcast of it waits its turn (see ListenerHub.changed)
        self.last_write = time.monotonic()

    def __len__(self) -> int:
        return len(self.listeners) + len(self.arriving)


class ListenerHub:
    """Every stream's listener, by channel. A listener's slot is taken when its request is admitted
    and given back on every way out, so requests that arrive together can't pass the limits.

    Values on a stream never go backwards (between admin writes, which may set a lower value): a
    channel's `value` only grows between them, and every write to a listener carries a channel's
    latest value, never what an earlier broadcast carried."""

    def __init__(self, *, keepalive_interval: float, stall_timeout: float, max_listeners: int,
                 max_listeners_per_ip: int) -> None:
        self._channels: dict[Key, Channel] = {}
        self._behind: set[Listener] = set()
        self._per_client: dict[str, int] = {}  # listeners by client address
        self._keepalive_interval = keepalive_interval
        self._stall_timeout = stall_timeout
        self._max_listeners = max_listeners
        self._max_listeners_per_ip = max_listeners_per_ip
        self._closing = False
        self.listener_count = 0
        self.watchers_changed: Callable[[str], None] = lambda counter_id: None  # Presence's, see there
        self.sweeping = Outage("sweeping stalled listeners and idle streams")
        self.broadcasts = 0  # for /metrics
        self.coalesced = 0  # changes folded into a broadcast already scheduled
        # Broadcasts share the event loop, so they share one pace: the channels whose broadcast
        # waits, in the order they changed, each sent in its turn, and the loop's turn scheduled.
        self._pace = Pace()
        self._waiting: dict[Channel, None] = {}
        self._turn: asyncio.Handle | None = None
        self._queued = 0  # changes that put a channel in the queue (with coalesced: every change)

    def refusal(self, client: str) -> tuple[type[web.HTTPException], str] | None:
        """Why the server, or this client, can't open another stream now: the status and reason."""
        if self._closing:
            return web.HTTPServiceUnavailable, "the server is shutting down"
        if self.listener_count >= self._max_listeners:
            return web.HTTPServiceUnavailable, f"too many listeners (limit {self._max_listeners})"
        if self._per_client.get(client, 0) >= self._max_listeners_per_ip:
            return web.HTTPTooManyRequests, f"too many streams from {client} (limit {self._max_listeners_per_ip})"
        return None

    def admit(self, client: str, style: int, keys: list[Key], value_of: Callable[[Key], int]) -> Listener:
        """A listener of these channels (the limits checked just before, with no await between),
        counted in them from now on; its `first` values are the channels' latest (value_of for a
        channel nobody listens to yet). release() gives its slot back."""
        self.listener_count += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        listener = Listener(self, client, style)
        for key in keys:  # a counter's values before its watcher count, which then counts this one
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = Channel(key, value_of(key))
            channel.arriving.add(listener)
            listener.channels.append(channel)
            listener.first[key] = channel.value
            if not key.watchers:
                self.watchers_changed(key.counter_id)
        return listener

    def release(self, listener: Listener) -> None:
        """Give back the listener's slot, once; its channels let go of it."""
        if not listener.counted:
            return
        listener.counted = False
        self.listener_count -= 1
        if self._per_client[listener.client] == 1:
            del self._per_client[listener.client]
        else:
            self._per_client[listener.client] -= 1
        self._behind.discard(listener)
        for channel in listener.channels:
            channel.listeners.discard(listener)
            channel.arriving.discard(listener)
            if not channel and self._channels.get(channel.key) is channel:
                self._waiting.pop(channel, None)
                del self._channels[channel.key]
            if not channel.key.watchers:
                self.watchers_changed(channel.key.counter_id)
        listener.channels = []

    async def take_over(self, listener: Listener, transport: asyncio.Transport) -> None:
        """Take over a stream to which aiohttp has sent the headers and the first frames: from then on
        it gets every change of its channels (and at once any made meanwhile). A listener ended
        meanwhile (its counter deleted, a stop) is left to aiohttp, which ends the response.

        Otherwise aiohttp's side of the connection is aborted on every way out: its handler finds it
        closed and lets go. The caller releases the listener's slot if it isn't taken over here."""
        if not await self._sent_by_aiohttp(transport, listener):
            if listener.counted:
                transport.abort()  # the client left, or doesn't read its first frames
            return
        try:
            listener.sock = duplicate(transport)
        except OSError as error:  # out of descriptors: the stream ends, the client will retry
            log.warning("a stream ended at its start: %s", error.strerror or error)
            return
        finally:
            transport.abort()  # closes aiohttp's descriptor only: the connection lives on in the duplicate
        # From here on nothing yields to the loop until the listener is in its channels.
        catch_up = {}
        for channel in listener.channels:
            channel.arriving.discard(listener)
            channel.listeners.add(listener)
            # Changed since its first frame: a broadcast that is scheduled carries the latest value to
            # every listener of the channel, this one included; only one already made can't.
            if channel.value != listener.first[channel.key] and not channel.pending:
                catch_up[channel.key] = channel.value
        listener.first = None
        asyncio.get_running_loop().add_reader(listener.sock.fileno(), listener.on_readable)
        if catch_up:
            listener.write(encode_values(catch_up, listener.style))

    async def _sent_by_aiohttp(self, transport: asyncio.Transport, listener: Listener) -> bool:
        """Wait until aiohttp's bytes are out, so that none of ours can overtake them; False if the
        client left first, didn't take them within the stall timeout, or the listener was ended."""
        deadline = time.monotonic() + self._stall_timeout
        while transport.get_write_buffer_size():
            if transport.is_closing() or time.monotonic() > deadline or not listener.counted:
                return False
            await asyncio.sleep(0.01)
        return listener.counted and not transport.is_closing()

    def disconnect(self, listener: Listener) -> None:
        """The client left, or is dropped: close its socket and give back its slot."""
        if listener.counted:
            self.release(listener)
            listener.close()

    def _end(self, listener: Listener) -> None:
        """End the stream properly (the last chunk) if it keeps up; a listener that is behind would
        never take it, so its socket just closes. One still arriving is ended by aiohttp."""
        if listener.sock is not None and not listener.unsent and listener.style & 1:
            try:
                listener.sock.send(LAST_CHUNK)
            except OSError:
                pass
        self.release(listener)
        if listener.sock is not None:
            listener.close()

    def fell_behind(self, listener: Listener) -> None:
        """The kernel took only part of a write: wait for the socket to drain, skipping values."""
        listener.behind_since = time.monotonic()
        self._behind.add(listener)
        asyncio.get_running_loop().add_writer(listener.sock.fileno(), listener.on_writable)

    def caught_up(self, listener: Listener) -> None:
        """It drained: send the latest value of each of its channels."""
        asyncio.get_running_loop().remove_writer(listener.sock.fileno())
        listener.behind_since = 0.0
        self._behind.discard(listener)
        listener.write(encode_values({channel.key: channel.value for channel in listener.channels}, listener.style))

    def changed(self, key: Key, value: int | None) -> None:
        """The feed's receiver: a channel's value changed (broadcast at its pace, the latest value
        when it goes), or the channel is gone (its streams end)."""
        channel = self._channels.get(key)
        if channel is None:
            return
        if value is None:
            for listener in [*channel.listeners, *channel.arriving]:
                self._end(listener)
            return
        channel.value = value
        if channel.pending:
            self.coalesced += 1
            return
        # Marked here, not when the broadcast starts: a burst of POSTs schedules it once.
        channel.pending = True
        self._waiting[channel] = None
        self._queued += 1
        if self._turn is None:
            self._schedule_turn()

    def _schedule_turn(self) -> None:
        """The next waiting broadcast, for a change that comes now: at once while calm, after the
        rest while hot."""
        loop = asyncio.get_running_loop()
        if rest := self._pace.wait(time.monotonic()):
            self._turn = loop.call_later(rest, self._take_turn)
        else:
            self._turn = loop.call_soon(self._take_turn)

    def _take_turn(self) -> None:
        self._turn = None
        if not self._waiting:
            return  # its channels are gone
        channel = next(iter(self._waiting))
        del self._waiting[channel]
        channel.pending = False
        went = self._broadcast(channel)
        if not self._waiting:
            return
        if not went:
            self._schedule_turn()
            return
        # Others wait: whether the loop is hot depends on the changes of the next moment (as long as
        # the broadcast took). None: the burst is over, and they go in turn at once, not after rests.
        changes = self.coalesced + self._queued
        self._turn = asyncio.get_running_loop().call_later(self._pace.took, self._hot_or_not, changes)

    def _hot_or_not(self, changes_before: int) -> None:
        if self.coalesced + self._queued == changes_before:
            self._take_turn()
        else:
            self._turn = asyncio.get_running_loop().call_later((REST - 1) * self._pace.took, self._take_turn)

    def _broadcast(self, channel: Channel) -> bool:
        """Send the channel's latest value, if its listeners don't have it: whether it went."""
        if channel.value == channel.sent:
            return False
        started = time.monotonic()
        channel.sent = channel.value
        self._write_all(channel, channel.key.frames(channel.value))
        self.broadcasts += 1
        ended = time.monotonic()
        self._pace.went(ended - started, ended)
        return True

    def _write_all(self, channel: Channel, frames: Frames) -> None:
        """Write to every listener that keeps up; the others get the latest when they drain."""
        channel.last_write = time.monotonic()
        for listener in channel.listeners:
            if not listener.unsent:
                listener.write(frames[listener.style])

    async def sweep_now_and_then(self) -> None:
        await asyncio.sleep(min(0.5, self._keepalive_interval / 2))
        self.sweep()
        self.sweeping.succeeded()

    def sweep(self) -> None:
        """Disconnect listeners stuck past the stall timeout; keep idle streams alive."""
        now = time.monotonic()
        for listener in list(self._behind):
            if now - listener.behind_since > self._stall_timeout:
                log.info("disconnecting a listener that took no data for %.0f s", self._stall_timeout)
                self.disconnect(listener)
        for channel in self._channels.values():
            if now - channel.last_write >= self._keepalive_interval:
                self._write_all(channel, KEEPALIVE_FRAMES)

    def value(self, key: Key) -> int | None:
        """The latest value a channel's streams here had, or will have once its broadcast goes; None:
        nobody here listens to it."""
        channel = self._channels.get(key)
        return None if channel is None else channel.value

    def watchers(self, counter_id: str) -> int:
        """How many streams here carry the counter's values (not its watcher count)."""
        channel = self._channels.get(Key((counter_id, False)))
        return len(channel) if channel is not None else 0

    def close(self) -> None:
        """End every stream (on shutdown); no new listener is taken after this."""
        self._closing = True
        for channel in list(self._channels.values()):
            for listener in [*channel.listeners, *channel.arriving]:
                self._end(listener)


def duplicate(transport: asyncio.Transport) -> socket.socket:
    """A non-blocking duplicate of the transport's socket, set up for a stream."""
    sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LISTENER_SNDBUF)
    if sock.family in (socket.AF_INET, socket.AF_INET6):  # not on a UNIX socket (an embedder's UnixSite)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame goes out when written
    return sock


# --------------------------------------------------------------------------------------------------
# Presence: how many are watching each counter
# --------------------------------------------------------------------------------------------------
#
# A counter's watchers are the open streams that carry its values: the hub's listeners of its
# channel (single-counter streams and multi-counter streams naming it, from the moment they are
# admitted), plus, with --grip-stats, the subscribers Pushpin reports on its channels. Streams of a
# watcher count don't count: watching the count is not watching the counter. Streams, not people:
# every tab counts.
#
# A count changes with every arrival and departure: a reconnect storm of 10,000 streams would be
# 10,000 new counts for every watcher of the count. So a count goes out through the change feed at
# the pace of every fan-out (see Pace), each taken to cost WATCHERS_COST: at once while arrivals and
# departures are rare, while they come faster at most every REST × WATCHERS_COST (half a second),
# the latest count when it goes; never on a POST's path (arrivals and departures only schedule it).

WATCHERS_COST = 0.1  # seconds a count's fan-out is taken to cost: a hot count goes out twice a second


class Presence:
    """Every counter's watcher count, sent through the feed when it changes."""

    def __init__(self, hub: ListenerHub, feed: ChangeFeed, exists: Callable[[str], bool]) -> None:
        self._hub = hub
        self._feed = feed
        self._exists = exists  # whether a counter exists (for its listeners): a deleted one has no count
        # counter -> {(Pushpin instance, channel): (subscribers, when the report expires)}
        self._proxied: dict[str, dict[tuple[str, str], tuple[int, float]]] = {}
        self._sent: dict[str, int] = {}  # counter -> the count last sent, if not 0
        self._pending: dict[str, asyncio.Handle] = {}  # counter -> its next send
        self._paces = Paces(WATCHERS_COST)
        # With --redis: the other processes' counts, and this one's as last shared (see RedisLink).
        self._link: RedisLink | None = None
        self._remote: dict[str, dict[str, int]] = {}  # counter -> {process: its count, if not 0}
        self._heard_from: dict[str, float] = {}  # process -> when it was last heard from
        self._shared: dict[str, int] = {}  # counter -> this process's own count as last shared, if not 0
        self.stats_reading = Outage("reading Pushpin's stats")
        hub.watchers_changed = self.changed

    def shares_with(self, link: RedisLink) -> None:
        """--redis: counts are summed over every process, each sharing its own through the link.
        Pushpin's reports (--grip-stats, read by every process) count in the leader's only."""
        self._link = link

    def count(self, counter_id: str) -> int:
        remote = self._remote.get(counter_id)
        return self.own_count(counter_id) + (sum(remote.values()) if remote else 0)

    def own_count(self, counter_id: str) -> int:
        """This process's streams of the counter, and Pushpin's (unless another process counts them)."""
        if self._link is not None and not self._link.leading:
            return self._hub.watchers(counter_id)
        return self._hub.watchers(counter_id) + self.proxied(counter_id)

    def proxied(self, counter_id: str) -> int:
        """The subscribers Pushpin reports on the counter's channels, summed over its instances."""
        reports = self._proxied.get(counter_id)
        return sum(subscribers for subscribers, _ in reports.values()) if reports else 0

    def changed(self, counter_id: str) -> None:
        """A stream of the counter came or went: send its count at its pace."""
        if counter_id in self._pending:
            return  # the send that is scheduled takes the count as it is then
        loop = asyncio.get_running_loop()
        if rest := self._paces.wait(counter_id, time.monotonic()):
            self._pending[counter_id] = loop.call_later(rest, self._send, counter_id)
        else:
            self._pending[counter_id] = loop.call_soon(self._send, counter_id)

    def _send(self, counter_id: str) -> None:
        del self._pending[counter_id]
        if not self._exists(counter_id):  # deleted meanwhile: heard() forgot it
            return
        if self._link is not None:
            self._share(counter_id, self.own_count(counter_id))
        count = self.count(counter_id)
        # A stream of the count here may have started from the count at its admission, one not sent
        # (this one resting): then it gets this one even if it is the one last sent.
        shown = self._hub.value(Key((counter_id, True)))
        if count == self._sent.get(counter_id, 0) and shown in (None, count):
            return
        if count:
            self._sent[counter_id] = count
        else:  # a counter nobody watches takes no memory
            self._sent.pop(counter_id, None)
        self._paces.went(counter_id, WATCHERS_COST, time.monotonic())
        self._feed.changed(Key((counter_id, True)), count)

    def heard(self, key: Key, value: int | None) -> None:
        """The feed's receiver: a deleted counter's count is forgotten (made again, it counts from 0)."""
        if value is None and not key.watchers:
            if (pending := self._pending.pop(key.counter_id, None)) is not None:
                pending.cancel()
            self._sent.pop(key.counter_id, None)
            self._proxied.pop(key.counter_id, None)
            self._remote.pop(key.counter_id, None)
            if self._link is not None:
                self._share(key.counter_id, 0)
            self._paces.forget(key.counter_id)

    @property
    def tracked(self) -> int:
        """For /metrics and tests: counters whose count this holds state for."""
        return len(self._sent.keys() | self._pending.keys() | self._proxied.keys() | self._remote.keys()
                   | self._shared.keys())

    # --- with --redis: the counts of every process ---

    def _share(self, counter_id: str, own: int) -> None:
        if own != self._shared.get(counter_id, 0):
            self._link.share_count(counter_id, own)
            if own:
                self._shared[counter_id] = own
            else:
                del self._shared[counter_id]

    def share_all(self) -> None:
        """Every count of this process, shared again (after an outage, the others may have lost them)."""
        for counter_id, own in self._shared.items():
            self._link.share_count(counter_id, own)

    def remote(self, process: str, counter_id: str, count: int) -> None:
        """Another process's count of a counter's watchers."""
        self._heard_from[process] = time.monotonic()
        counts = self._remote.setdefault(counter_id, {})
        if count:
            counts[process] = count
        else:
            counts.pop(process, None)
            if not counts:
                del self._remote[counter_id]
        self.changed(counter_id)

    def alive(self, process: str) -> None:
        self._heard_from[process] = time.monotonic()

    def replace_remote(self, counts: dict[str, dict[str, int]], silent_for: dict[str, float]) -> None:
        """The other processes' counts as Redis holds them (after a subscription), and how long each
        has been silent: a process that died a moment ago counts only until DEAD_AFTER after its last
        heartbeat, not DEAD_AFTER after this one read its counts."""
        touched = set(self._remote)
        self._remote = {}
        now = time.monotonic()
        for process, by_counter in counts.items():
            self._heard_from[process] = max(self._heard_from.get(process, -math.inf), now - silent_for[process])
            for counter_id, count in by_counter.items():
                if count:
                    self._remote.setdefault(counter_id, {})[process] = count
                    touched.add(counter_id)
        for counter_id in touched:
            self.changed(counter_id)

    def drop_silent(self) -> None:
        """Forget the counts of processes not heard from within DEAD_AFTER: one that died counts nobody."""
        now = time.monotonic()
        for process in [process for process, heard in self._heard_from.items() if now - heard > DEAD_AFTER]:
            self.gone(process)

    def gone(self, process: str) -> None:
        """A process that stopped, or died: its counts go."""
        self._heard_from.pop(process, None)
        for counter_id, counts in list(self._remote.items()):
            if counts.pop(process, None) is not None:
                if not counts:
                    del self._remote[counter_id]
                self.changed(counter_id)

    def reported(self, report: dict[str, Any]) -> None:
        """A `sub` report from Pushpin's stats: one channel's subscribers on one Pushpin instance.
        ValueError for a report that makes no sense (a count below 0, a ttl that isn't one)."""
        named = Key.of_grip_channel(str(report["channel"]))
        if named is None or named[0].watchers:
            return  # a watcher count's channel: its subscribers watch the count, not the counter
        counter_id = named[0].counter_id
        source = (str(report["from"]), str(report["channel"]))
        unavailable = bool(report.get("unavailable"))  # the last subscriber on that instance left
        if not unavailable:
            subscribers, ttl = report.get("subscribers", 1), report["ttl"]
            if type(subscribers) is not int or subscribers < 0 or type(ttl) not in (int, float) or not 0 < ttl < 86_400:
                raise ValueError(f"subscribers {subscribers!r}, ttl {ttl!r}")
        reports = self._proxied.setdefault(counter_id, {})
        if unavailable:
            reports.pop(source, None)
        else:
            reports[source] = (subscribers, time.monotonic() + ttl)
        if not reports:
            del self._proxied[counter_id]
        self.changed(counter_id)

    def recount_proxied(self) -> None:
        """--redis: the leadership moved, and with it whose count Pushpin's reports are in."""
        for counter_id in list(self._proxied):
            self.changed(counter_id)

    def expire(self) -> None:
        """Forget reports past their ttl: a Pushpin that went silent holds nobody any more."""
        now = time.monotonic()
        for counter_id, reports in list(self._proxied.items()):
            for source, (_, expires) in list(reports.items()):
                if expires < now:
                    del reports[source]
                    self.changed(counter_id)
            if not reports:
                del self._proxied[counter_id]


# Pushpin's stats socket (its stats_spec: a ZeroMQ PUB socket) reports each channel's subscribers per
# instance: sent when they change (at most once a second), and again every 0.75 × ttl (45 s), with
# "unavailable": true when the last one leaves. A message is one frame, "sub " then J and JSON or T
# and a tnetstring (stats_format). ../shared/notes/pushpin.md has the details, read from Pushpin's source.

STATS_EXPIRY_CHECK = 1.0  # seconds between checks for reports past their ttl


async def read_pushpin_stats(endpoints: tuple[str, ...], presence: Presence) -> None:
    """Subscribe to the `sub` reports of every Pushpin's stats socket, and keep presence told."""
    zmq = import_zmq()
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"sub ")
    for endpoint in endpoints:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as error:  # e.g. no such transport: the others are still read
            log.error("can't read Pushpin's stats at %s: %s", endpoint, error)
    unreadable = False  # logged once: a Pushpin that sends what this can't read
    try:
        while True:
            if await sock.poll(STATS_EXPIRY_CHECK * 1000):
                message = await sock.recv()
                try:
                    presence.reported(stats_report(message))
                except Exception as error:  # noqa: BLE001 - whatever a Pushpin sends, the reading goes on
                    if not unreadable:
                        log.warning("a Pushpin stats message this can't read (%s): %.200r", error, message)
                    unreadable = True
            presence.expire()
            presence.stats_reading.succeeded()
    finally:
        sock.close(linger=0)
        context.term()


def import_zmq() -> Any:
    """pyzmq, needed only for --grip-stats."""
    try:
        import zmq.asyncio
    except ImportError:
        raise ValueError('--grip-stats needs the ZeroMQ client pyzmq: .venv/bin/pip install pyzmq (or, installed as '
                         'a package, pip install "livecounter[pushpin-stats]")') from None
    return zmq


def stats_report(message: bytes) -> dict[str, Any]:
    """A `sub` stats message's fields: "sub J{...}" (JSON) or "sub T..." (a tnetstring)."""
    kind, _, body = message.partition(b" ")
    if kind != b"sub" or body[:1] not in (b"J", b"T"):
        raise ValueError("not a sub report")
    report = json.loads(body[1:]) if body[:1] == b"J" else tnetstring(body[1:])[0]
    if not isinstance(report, dict):
        raise TypeError("a report is a map")
    return report


def tnetstring(data: bytes) -> tuple[Any, bytes]:
    """The first value of a tnetstring (Pushpin's default stats format), and what follows it."""
    size, _, rest = data.partition(b":")
    if not size.isdigit() or len(rest) <= int(size):
        raise ValueError("a truncated tnetstring")
    payload, kind, rest = rest[:int(size)], rest[int(size):int(size) + 1], rest[int(size) + 1:]
    if kind in (b"]", b"}"):
        items = []
        while payload:
            item, payload = tnetstring(payload)
            items.append(item)
        return (dict(zip(items[::2], items[1::2])) if kind == b"}" else items), rest
    scalars = {b",": lambda: payload.decode("utf-8", "replace"), b"#": lambda: int(payload),
               b"^": lambda: float(payload), b"!": lambda: payload == b"true", b"~": lambda: None}
    if kind not in scalars:
        raise ValueError(f"a tnetstring of unknown type {kind!r}")
    return scalars[kind](), rest


# --------------------------------------------------------------------------------------------------
# Caches in front: purged on every change
# --------------------------------------------------------------------------------------------------
#
# With --purge-url, reads of counters that exist (plain, JSON, and the answers Pushpin holds streams
# with) may be kept by a cache in front for --cache-seconds (Varnish: deploy/varnish/livecounter.vcl),
# and every change purges what the cache holds of its channel: PURGE /counters/<id>/ (its every Vary
# variant) for a value, /counters/<id>/watchers/ for a watcher count, both for a deletion. Nothing
# else is cacheable: errors (a 404 that a creation would have to purge), badges, reads of ids that
# --auto-create would make, so only counters that exist need purging, and the paths waiting for a
# cache that is down are at most two per counter. As with publishing: one request in flight per
# cache, the oldest path first, never on a POST's path; a cache that fails is its own outage, logged
# once and retried. Each publish to Pushpin waits (briefly) for its counters' purges, as the
# original Live Counter did: a viewer who arrives after a change gets it from the origin, not the
# old answer.

PURGE_TIMEOUT = 2.0  # seconds for one PURGE
PURGE_BEFORE_PUBLISH = 0.5  # seconds a publish waits at most for its counters' purges
# Varnish's PURGE (and a ban) passes over an answer it is still fetching: a read answered just
# before a change and stored just after its purge stays cached until the next change. So every path
# is purged once more, this long after its last purge: longer than any answer takes to arrive.
SECOND_PURGE_DELAY = 1.0


class CacheTarget:
    """One cache: the paths it still has to purge, and whether purging it works."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/"
        self.unpurged: dict[str, bool] = {}  # paths, the oldest first -> whether it is a second purge
        self.second_purges: dict[str, asyncio.TimerHandle] = {}  # path -> its second purge to come
        self.purging_now: str | None = None  # the path of the request in flight
        self.wakeup = asyncio.Event()
        self.purging = Outage(f"purging {self.url}")


class CachePurger:
    def __init__(self, urls: tuple[str, ...], exists: Callable[[str], bool]) -> None:
        self._targets = [CacheTarget(url) for url in urls]
        self._exists = exists  # whether a counter exists: only then can a cache hold its reads
        self.leading = True  # with --redis, only the leader purges
        self.purges = 0  # for /metrics
        self.failures = 0

    @property
    def outages(self) -> list[Outage]:
        return [target.purging for target in self._targets]

    @property
    def unpurged(self) -> int:
        """For /metrics: paths waiting to be purged from the cache furthest behind."""
        return max(len(target.unpurged) + bool(target.purging_now) for target in self._targets)

    def changed(self, key: Key, value: int | None) -> None:
        """The feed's receiver: every cache drops what it holds of the channel."""
        if not self.leading or value is not None and not self._exists(key.counter_id):
            return  # a watcher count of an id --auto-create would make: never cached
        path = key.purge_path
        for target in self._targets:
            target.unpurged[path] = False
            target.wakeup.set()

    async def purged(self, keys: Iterable[Key], timeout: float) -> None:
        """Wait until every cache that works has purged these channels, for at most timeout seconds."""
        paths = {key.purge_path for key in keys}
        await waited(lambda: not any(target.purging.error is None and (target.purging_now in paths or any(
                     not target.unpurged.get(path, True) for path in paths)) for target in self._targets),
                     timeout, 0.002)

    async def flushed(self, timeout: float) -> None:
        """On a stop: wait until every cache has purged everything, for at most timeout seconds."""
        # A cache that fails is not waited for: it is retried after its delay, not before the end.
        await waited(lambda: not any((target.unpurged or target.purging_now) and target.purging.error is None
                                     for target in self._targets), timeout, 0.02)
        if unpurged := self.unpurged:
            log.warning("stopping with %d read%s not purged from every cache: stale there for up to "
                        "--cache-seconds", unpurged, "s" * (unpurged != 1))

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PURGE_TIMEOUT)) as session:
            await asyncio.gather(*(forever(target.purging, functools.partial(self._purge_all, session, target))
                                   for target in self._targets))

    async def _purge_all(self, session: aiohttp.ClientSession, target: CacheTarget) -> None:
        """Purge whatever waits, the oldest first; a failure leaves the path waiting and pauses."""
        await target.wakeup.wait()
        target.wakeup.clear()
        while target.unpurged:
            path = target.purging_now = next(iter(target.unpurged))
            second = target.unpurged.pop(path)
            try:
                async with session.request("PURGE", target.url + path) as response:
                    if response.status >= 300:
                        answer = (await response.read()).decode("utf-8", "replace").strip()[:200]
                        raise aiohttp.ClientError(f"{response.status} {answer}")
            except Exception as error:  # noqa: BLE001 - whatever goes wrong with one cache is its own outage
                target.purging_now = None
                target.unpurged.setdefault(path, second)
                self.failures += 1
                target.purging.failed(failure_reason(error), unexpected=unexpected(error))
                await asyncio.sleep(target.purging.retry_delay)
                continue
            target.purging_now = None
            self.purges += 1
            target.purging.succeeded()
            if not second:
                self._purge_again_later(target, path)

    def _purge_again_later(self, target: CacheTarget, path: str) -> None:
        """Purge the path once more when SECOND_PURGE_DELAY passed since its last purge (see there)."""
        if (pending := target.second_purges.pop(path, None)) is not None:
            pending.cancel()
        target.second_purges[path] = asyncio.get_running_loop().call_later(
            SECOND_PURGE_DELAY, self._purge_again, target, path)

    def _purge_again(self, target: CacheTarget, path: str) -> None:
        del target.second_purges[path]
        target.unpurged.setdefault(path, True)
        target.wakeup.set()


# --------------------------------------------------------------------------------------------------
# GRIP publishing: Pushpin holds the connections, livecounter publishes the changes
# --------------------------------------------------------------------------------------------------
#
# A stream requested through Pushpin (it signs the request with Grip-Sig) is answered with its
# first frames and Grip-Hold instructions; Pushpin keeps the connection and subscribes it to the
# channels. Every change is then published to each Pushpin over its HTTP publish API, at the pace
# of every fan-out (see Pace: a calm counter's change at once, a hot one's after a rest, so that
# Pushpin, which delivers each publish to every subscriber, is not flooded by one counter), paced
# again per Pushpin to its message rate, and with GRIP ids so that Pushpin finds a stream that
# missed one (docs/pushpin.md).
#
# What the publisher keeps of a channel goes once nothing about it waits: at once for a channel no
# stream here was held on (a watcher count of an anonymous id, say), FORGET_HELD after the last held
# stream's last refresh otherwise (each held stream asks its next link every --grip-link-timeout, and
# Pushpin keeps a channel's last id while it lingers), and once its close went out for a deletion.

PUBLISH_BATCH = 500  # channels per publish request; a long outage may leave many to catch up
PUBLISH_TIMEOUT = 5.0  # seconds; a slow Pushpin delays only its own next publish
PUBLISH_COST = 0.03  # seconds a channel's publish is taken to cost: a hot one goes out about 6 times a second
HINT_DELAY = 0.25  # seconds after a channel's last publish to a Pushpin, its hint (see _hint_later)
HINT_WINDOW = 2.0  # seconds: a publish is hinted if a stream was held on its channel this lately
HINT = "hint"  # in a Pushpin's queue in place of a value: the channel's streams are to ask their next link
STOP_PUBLISH_TIMEOUT = 2.0  # seconds a stop waits for the last publishes (streams on Pushpin outlive it)
ITEMS_PER_CHANGE = 2  # a change goes to both of its channel's Pushpin channels (publish_items)
PACING_ROUND = 0.1  # seconds of --grip-message-rate a paced round waits for when many changes wait
SUBSCRIPTION_LINGER = 60  # seconds Pushpin keeps a channel's last id after its last subscriber (the shipped config)
FORGET_CHECK = 1.0  # seconds between looks for channels to forget


class PublishPacing:
    """A token bucket of publish items for one Pushpin: `rate` a second, a second's worth at most.

    Pushpin's handler (1.36, handler/engine.cpp and ratelimiter.cpp) queues one delivery per item
    and subscribed connection, sends them at its message_rate a second, and drops any past
    message_hwm queued ("exceeded publish hwm"), answering the publish 200 all the same. Paced here,
    the backlog waits in `unpublished` instead, where a newer value replaces an older one."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(float(rate), ITEMS_PER_CHANGE)
        # A round goes when the bucket holds all that waits, or this much when more waits: a backlog
        # goes out in ~1 / PACING_ROUND requests a second, not one request per change.
        self.round = min(self.capacity, max(rate * PACING_ROUND, ITEMS_PER_CHANGE))
        self.tokens = self.capacity
        self.counted = time.monotonic()

    def delay(self, items: int) -> float:
        """Seconds before a round for `items` waiting items may go; 0: now."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.counted) * self.rate)
        self.counted = now
        needed = min(items, self.round)
        return 0.0 if self.tokens >= needed else (needed - self.tokens) / self.rate

    def take(self, items: int) -> int:
        """How many of `items` may go now, in whole changes (call delay() first); spent."""
        granted = min(items, int(self.tokens // ITEMS_PER_CHANGE) * ITEMS_PER_CHANGE)
        self.tokens -= granted
        return granted


class PushpinTarget:
    """One Pushpin instance: what it still has to be sent, and whether publishing to it works."""

    def __init__(self, url: str, message_rate: float) -> None:
        self.publish_url = url.rstrip("/") + "/publish/"
        self.unpublished: dict[Key, int | str] = {}  # channel -> latest value, or HINT
        # Channels whose counter was deleted: each closes before any value that follows (the counter made
        # again), which a dict of latest values would have put in its place.
        self.closing: dict[Key, None] = {}
        self.in_flight: dict[Key, int | str] = {}  # what the request in flight carries
        self.closing_now: dict[Key, None] = {}
        self.hints: dict[Key, asyncio.TimerHandle] = {}  # channel -> its hint to come
        self.sent: dict[Key, str] = {}  # channel -> the publish id last sent here (its prev-id)
        self.wakeup = asyncio.Event()
        self.publishing = Outage(f"publishing to {self.publish_url}")
        self.pacing = PublishPacing(message_rate)


RESTING_NOTHING = object()  # a GripChannel's `resting` when no value waits for its rest to end


class GripChannel:
    """What the publisher keeps of one channel while it matters."""

    __slots__ = ("number", "handed", "handed_id", "answered", "resting", "rest", "closed")

    def __init__(self) -> None:
        self.number = 0  # of its latest publish
        self.handed = 0  # the latest of those numbers handed to a Pushpin
        self.handed_id: str | None = None  # its id; with --redis, maybe another process's (the leader's)
        self.answered = -math.inf  # monotonic time a stream was last held on it
        self.resting: int | object = RESTING_NOTHING  # its latest value, while it rests (hot)
        self.rest: asyncio.TimerHandle | None = None  # the end of its rest
        self.closed = False  # its counter was deleted


class GripPublisher:
    """Publishes every change to every Pushpin, each with its id (see publish_id) and the id this
    Pushpin was last sent for the channel as prev-id, so that Pushpin finds a listener that missed
    one and fetches its next link."""

    def __init__(self, urls: tuple[str, ...], message_rate: float, *, link_timeout: float,
                 exists: Callable[[str], bool], purger: CachePurger | None = None) -> None:
        self._targets = [PushpinTarget(url, message_rate) for url in urls]
        # Publish ids are "<epoch>.<n>": n counts the publishes of this process, the epoch (its start,
        # in ms) keeps a restarted process's ids from repeating old ones (Pushpin drops an id it saw
        # within id_cache_ttl, and takes an old prev-id for current). Counted over every channel, an
        # id is never used twice, so a channel's entries can be forgotten.
        self._epoch = f"{int(time.time() * 1000):x}"
        self._count = 0
        self._channels: dict[Key, GripChannel] = {}
        self._held: collections.OrderedDict[Key, float] = collections.OrderedDict()  # by when last held
        self._paces = Paces(PUBLISH_COST)
        self._exists = exists  # whether a counter exists: a count of an anonymous id may go unpublished
        self._purger = purger  # a cache in front: its purges go before each publish
        self._forget_held = link_timeout + SUBSCRIPTION_LINGER + 10
        # With --redis only the leader publishes; every process answers held streams with the ids the
        # leader handed out, which it shares (see RedisLink).
        self.leading = True
        self.share_handed: Callable[[Key, str | None], None] = lambda key, publish_id: None
        self.forgetting = Outage("forgetting idle GRIP channels")
        self.published = 0  # for /metrics: publish requests Pushpin accepted
        self.failures = 0

    def publish_id(self, key: Key, number: int | None = None) -> str:
        """The id of a channel's publish `number`, or by default of the latest one handed to a Pushpin
        (number 0 before any): a listener answered now is told it as its prev-id, whatever value it
        is sent, since the next publish Pushpin gets names it as its prev-id (a newer value waiting
        for its turn comes with that publish). Not a value queued but not handed yet: Pushpin would
        find every publish of a paced backlog out of sequence, and ask for the next link each time."""
        if number is None:
            channel = self._channels.get(key)
            if channel is not None and channel.handed_id is not None:
                return channel.handed_id
            number = 0
        return f"{self._epoch}.{number}"

    def _learned(self, channel: GripChannel) -> str | None:
        """--redis, a new leader: the id another process (the old leader) handed to Pushpin last for
        the channel, which is what every Pushpin got last; None if the last one was this process's."""
        handed = channel.handed_id
        return handed if handed is not None and not handed.startswith(self._epoch + ".") else None

    def learn_handed(self, key: Key, publish_id: str | None) -> None:
        """--redis: the id the leader handed to Pushpin for a channel (None: it forgot the channel)."""
        if self.leading:
            return
        if publish_id is None:
            if (channel := self._channels.get(key)) is not None:
                channel.handed_id = None
                self._forget_if_done(key)
            return
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = GripChannel()
        channel.handed_id = publish_id

    @property
    def outages(self) -> list[Outage]:
        return [target.publishing for target in self._targets] + [self.forgetting]

    @property
    def waiting(self) -> int:
        """For /metrics: changed counters not yet published to the Pushpin furthest behind, the ones
        resting and in flight included (hints, which change nothing, left out)."""
        resting = sum(channel.rest is not None for channel in self._channels.values())
        return resting + max(len({key for queue in (target.unpublished, target.in_flight)
                                  for key, value in queue.items() if value != HINT}
                                 | target.closing.keys() | target.closing_now.keys()) for target in self._targets)

    @property
    def tracked(self) -> int:
        """For /metrics and tests: channels the publisher keeps anything of."""
        return len(self._channels.keys() | {key for target in self._targets for key in target.sent})

    def changed(self, key: Key, value: int | None) -> None:
        """The feed's receiver: publish a channel's latest value (None: the counter was deleted) to
        every Pushpin, at the channel's pace; never waits."""
        if not self.leading:
            return
        channel = self._channels.get(key)
        if channel is None:
            if value is not None and key.watchers and not self._exists(key.counter_id):
                return  # the count of an id --auto-create would make, on which no stream here was held
            channel = self._channels[key] = GripChannel()
        if value is None:  # a deletion goes at once: its streams end
            channel.closed = True
            if channel.rest is not None:
                channel.rest.cancel()
                channel.rest, channel.resting = None, RESTING_NOTHING
            self._queue(key, channel, None)
            return
        channel.closed = False
        if channel.rest is not None:
            channel.resting = value  # goes when its rest ends, the latest by then
            return
        if rest := self._paces.wait(key, time.monotonic()):
            channel.resting = value
            channel.rest = asyncio.get_running_loop().call_later(rest, self._rested, key)
            return
        self._queue(key, channel, value)

    def _rested(self, key: Key) -> None:
        channel = self._channels[key]
        channel.rest = None
        value, channel.resting = channel.resting, RESTING_NOTHING
        self._queue(key, channel, value)

    def _queue(self, key: Key, channel: GripChannel, value: int | None) -> None:
        self._count += 1
        channel.number = self._count
        if value is not None:
            self._paces.went(key, PUBLISH_COST, time.monotonic())
        for target in self._targets:
            target.wakeup.set()
            if value is not None:
                target.unpublished[key] = value
                continue
            target.closing[key] = None
            target.unpublished.pop(key, None)  # a value for the counter gone, or a hint: the close ends them
            if (pending := target.hints.pop(key, None)) is not None:
                pending.cancel()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PUBLISH_TIMEOUT)) as session:
            await asyncio.gather(forever(self.forgetting, self._forget_now_and_then), *(
                forever(target.publishing, functools.partial(self._publish_round, session, target))
                for target in self._targets))

    async def _publish_round(self, session: aiohttp.ClientSession, target: PushpinTarget) -> None:
        """One request in flight per Pushpin; what changes meanwhile goes in the next, latest only.
        Paced to its message rate: the counters changed longest ago go first, each with its latest
        value, so every change gets out, a hot counter no more often than the rest. A Pushpin that
        fails is its own outage: logged once, retried, and the other Pushpins go on."""
        await target.wakeup.wait()
        waiting = min(len(target.closing) + len(target.unpublished), PUBLISH_BATCH) * ITEMS_PER_CHANGE
        if delay := target.pacing.delay(waiting):
            await asyncio.sleep(delay)  # wakeup stays set; what changes meanwhile still coalesces
            return
        target.wakeup.clear()
        if not waiting:
            return
        changes = target.pacing.take(waiting) // ITEMS_PER_CHANGE
        closes = target.closing_now = dict.fromkeys(itertools.islice(target.closing, changes))
        batch = target.in_flight = dict(itertools.islice(target.unpublished.items(), changes - len(closes)))
        for key in closes:
            del target.closing[key]
        for key in batch:
            del target.unpublished[key]
        # Each value's number: its channel's latest, and the id this Pushpin got last for the channel
        # (with --redis, after a new leader took over: the one the old leader handed out). Not for a
        # deletion or a hint: neither has an id.
        numbers, previous = {}, {}
        for key, value in batch.items():
            if type(value) is int and (channel := self._channels.get(key)) is not None:
                numbers[key] = channel.number
                previous[key] = target.sent.get(key) or self._learned(channel) or self.publish_id(key, 0)
                if channel.number > channel.handed:
                    channel.handed = channel.number
                    channel.handed_id = self.publish_id(key, channel.number)
                    self.share_handed(key, channel.handed_id)
        try:
            items = self._items(numbers, previous, closes, batch)
            if self._purger is not None:
                await self._purger.purged([*closes, *batch], PURGE_BEFORE_PUBLISH)
            await send_publish(session, target.publish_url, items)
        except Exception as error:  # noqa: BLE001 - whatever goes wrong with one Pushpin is its own outage
            for key, value in batch.items():  # unless superseded, or closed since, meanwhile
                if key not in target.closing:
                    target.unpublished.setdefault(key, value)
            target.closing = {**closes, **target.closing}
            self.failures += 1
            target.publishing.failed(failure_reason(error), unexpected=unexpected(error))
            await asyncio.sleep(target.publishing.retry_delay)
            target.wakeup.set()
            return
        finally:
            target.in_flight, target.closing_now = {}, {}
        target.sent.update((key, self.publish_id(key, number)) for key, number in numbers.items())
        self.published += 1
        target.publishing.succeeded()
        now = time.monotonic()
        for key in numbers:
            channel = self._channels.get(key)
            if key in target.hints or (channel is not None and now - channel.answered < HINT_WINDOW):
                self._hint_later(target, key)
        for key in [*closes, *batch]:
            self._forget_if_done(key)
        if target.unpublished or target.closing:
            target.wakeup.set()

    def answered(self, keys: Iterable[Key]) -> None:
        """Streams are held on these channels now: their next publishes are followed by a hint, and
        the publisher keeps their ids while they may be held."""
        now = time.monotonic()
        for key in keys:
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = GripChannel()
            channel.answered = now
            self._held.pop(key, None)
            self._held[key] = now  # the latest last

    async def _forget_now_and_then(self) -> None:
        """Forget the channels whose streams were last held or refreshed FORGET_HELD ago."""
        await asyncio.sleep(FORGET_CHECK)
        now = time.monotonic()
        while self._held and next(iter(self._held.values())) < now - self._forget_held:
            key, _ = self._held.popitem(last=False)
            self._forget_if_done(key)
        self.forgetting.succeeded()

    def _forget_if_done(self, key: Key) -> None:
        """Forget a channel once nothing about it waits (see above): its next publish, if any, names
        no prev-id a stream could have (number 0)."""
        channel = self._channels.get(key)
        if channel is not None:
            if channel.rest is not None:
                return
            if not channel.closed and time.monotonic() - channel.answered < self._forget_held:
                return
        if any(key in target.unpublished or key in target.in_flight or key in target.hints
               or key in target.closing or key in target.closing_now for target in self._targets):
            return  # forgotten once that goes out
        if (forgotten := self._channels.pop(key, None)) is not None and forgotten.handed_id and self.leading:
            self.share_handed(key, None)
        self._held.pop(key, None)
        self._paces.forget(key)
        for target in self._targets:
            target.sent.pop(key, None)

    def _hint_later(self, target: PushpinTarget, key: Key) -> None:
        """Hint the channel's streams on this Pushpin once its publishes paused for HINT_DELAY, if
        a stream was held on it lately (within HINT_WINDOW).

        Pushpin's ids leave one gap (1.36): a stream answered before a publish but subscribed after
        it was delivered is checked against the last id Pushpin recorded for the channel, and every
        mismatch clears that record, so a second such stream is not checked and keeps the old value
        until the next publish. A hint has every stream of the channel ask its next link at once
        (not through Pushpin's 10-a-second update limiter): the ones that missed a value get it,
        the others an empty answer, shared by the streams whose last ids are the same."""
        if (pending := target.hints.pop(key, None)) is not None:
            pending.cancel()
        target.hints[key] = asyncio.get_running_loop().call_later(HINT_DELAY, self._hint, target, key)

    def _hint(self, target: PushpinTarget, key: Key) -> None:
        del target.hints[key]
        target.unpublished.setdefault(key, HINT)  # a change waiting goes instead, and is hinted after
        target.wakeup.set()

    async def flushed(self, timeout: float) -> None:
        """Publish what rests at once, then wait until every change has been published to every
        Pushpin, for at most timeout seconds: on a stop, so that the last changes still reach the
        streams the Pushpins keep holding."""
        for key, channel in list(self._channels.items()):
            if channel.rest is not None:
                channel.rest.cancel()
                self._rested(key)
        # A Pushpin that fails is not waited for: it is retried after its delay, not before the end.
        await waited(lambda: not any((target.unpublished or target.in_flight or target.closing or target.closing_now)
                                     and target.publishing.error is None for target in self._targets), timeout, 0.02)
        if waiting := self.waiting:
            log.warning("stopping with the latest value%s of %d counter%s not published to every Pushpin",
                        "s" * (waiting != 1), waiting, "s" * (waiting != 1))

    def _items(self, numbers: dict[Key, int], previous: dict[Key, str], closes: Iterable[Key],
               batch: dict[Key, int | str]) -> list[dict[str, object]]:
        """The batch's publish items for a Pushpin, each with its publish id, and as prev-id the id
        this Pushpin was last sent for the channel (number 0, the first time in this process: what
        the listeners answered before were told). Pushpin finds a listener whose prev-id differs and
        has it ask its next link, at most 10 links a second per Pushpin (its update limiter), so the
        ids must match in the common case: publish_id says why listeners are told the handed one.
        After a restart, Pushpin holds a channel's first publish back until message_wait (5 s) since
        it follows none of the ids it saw (the previous process's), and the listeners from before
        the restart ask their next link."""
        items = []
        for key, item in publish_items(closes, batch):
            if key in numbers and "content" in item["formats"]["http-stream"]:  # a close or a hint goes
                item["id"] = self.publish_id(key, numbers[key])  # to every stream, whatever it missed
                item["prev-id"] = previous[key]
            items.append(item)
        return items


async def send_publish(session: aiohttp.ClientSession, url: str, items: list[dict[str, object]]) -> None:
    """One publish request; ClientError with Pushpin's status and answer (any bytes) unless it is 200."""
    async with session.post(url, json={"items": items}) as response:
        if response.status != 200:
            answer = (await response.read()).decode("utf-8", "replace").strip()[:200]
            raise aiohttp.ClientError(f"{response.status} {answer}")


def publish_items(closes: Iterable[Key], batch: dict[Key, int | str]) -> list[tuple[Key, dict[str, object]]]:
    """GRIP publish items, by channel: a deleted counter's close first, then each change (of a
    counter's value or watcher count), each on both of its Pushpin channels; a HINT has their
    streams ask their next link."""
    items = [(key, {"channel": key.grip_channel(multi), "formats": {"http-stream": {"action": "close"}}})
             for key in closes for multi in (False, True)]
    for key, value in batch.items():
        for multi in (False, True):
            if value == HINT:
                content = {"action": "hint"}
            else:
                content = {"content": key.frames(value)[NAMED_STYLE if multi else MESSAGE_STYLE].decode()}
            items.append((key, {"channel": key.grip_channel(multi), "formats": {"http-stream": content}}))
    return items


def raw_bytes(text: str) -> bytes:
    """The bytes a header or environment variable held: where they weren't UTF-8, aiohttp and
    os.environ hold surrogates that plain .encode() refuses."""
    return text.encode("utf-8", "surrogateescape")


def grip_sig_valid(signature: str, key: str | None) -> bool:
    """Whether a Grip-Sig came from Pushpin: a JWT signed with the shared key (HS256), not expired.

    Without a key, any Grip-Sig is taken (fine while only Pushpin can reach livecounter)."""
    if key is None:
        return True
    try:
        jwt.decode(raw_bytes(signature), raw_bytes(key), algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.InvalidTokenError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Redis: counters shared by processes and machines (--redis)
# --------------------------------------------------------------------------------------------------
#
# With --redis the counters live in Redis, and every livecounter process (--workers on one machine,
# or processes on several) keeps a replica of them in memory: reads and streams are answered from
# it, also while Redis is unreachable. A write is one Lua script that changes the value, bumps the
# counter's version and PUBLISHes the change, all in one step, so every process sees every change,
# in the order Redis made them. Each process applies the changes it hears (and the answers to its
# own writes) to its replica when their version is newer, and its change feed takes them to its
# streams. The writes of one turn of the event loop go in one pipeline (a round trip for all).
#
# The keys, all in the hash slot {livecounter} (one Redis, or one slot of a cluster):
#   {livecounter}:values          hash: counter id -> value
#   {livecounter}:versions        hash: counter id -> how many changes it had (never reset)
#   {livecounter}:order           sorted set: counter id -> creation number (the listing's order)
#   {livecounter}:made            the last creation number (and {livecounter}:made:probe, which a
#                                 write probes with: a replica refuses it, as it would a change)
#   {livecounter}:seeded          "done" once the data file's counters went in (the first start)
#   {livecounter}:leader          the process that purges caches and publishes to Pushpin (expires)
#   {livecounter}:watchers:PROC   hash: counter id -> streams of process PROC watching it (expires)
# and the pub/sub channel {livecounter}:changes, whose messages are "v ID VALUE VERSION" (a value),
# "d ID VERSION" (a deletion), "w PROC ID COUNT" (a process's watcher count), "h PROC" (a process is
# alive, every second), "x PROC" (a process stopped) and "g CHANNEL ID" (the GRIP id the leader last
# handed to Pushpin for a channel, "-" once forgotten).
#
# Watcher counts: each process shares its own streams' count of each counter; a counter's count is
# the sum over the processes heard from within DEAD_AFTER. GRIP publishes and cache purges go out
# once per change: from the leader, which holds {livecounter}:leader while it lives; a new leader
# publishes and purges again what changed in the last RECENT seconds, and goes on from the GRIP ids
# the old one handed out (every process knows them: it answers held streams with them).

REDIS_PREFIX = "{livecounter}:"
REDIS_TIMEOUT = 0.8  # seconds for a command to connect, go and be answered: a refusal comes within 2 s
REDIS_GIVE_UP = 1.8  # seconds after which a write is refused whatever the client still tries
HEARTBEAT = 1.0  # seconds between a process's heartbeats and renewals
DEAD_AFTER = 3.5  # seconds of silence after which a process counts no watchers
LEADER_TTL_MS = 3000  # how long the leadership lasts unless renewed
RECENT = 10.0  # seconds a change is remembered, for a new leader to publish and purge it again
WAIT_TIMEOUT_MS = 400  # --durable: how long a change waits for a replica (within REDIS_TIMEOUT's read)
SEED_CHUNK = 10_000  # counters per command when the data file seeds an empty Redis
SEED_HOLD = 10  # seconds a seed in progress holds off the others, renewed with each chunk

# The change script, with the keys and the settings it needs written into it: a call is then EVALSHA,
# its SHA1, 0 and 2 or 3 arguments, which redis-py packs in a fraction of the time 13 took (packing
# was 14% of a POST's CPU, py-spy).
CHANGE_SCRIPT = string.Template("""
-- ARGV: operation (incr, set, delete, probe), counter id, value (set). Answers {value, version};
-- version 0 with value -1: no such counter, -2: the limit of counters, -3: at the largest value,
-- -4: Redis lost its counters (restarted empty) and has not been given them again.
local values, versions, order, made = "${prefix}values", "${prefix}versions", "${prefix}order", "${prefix}made"
local operation, id = ARGV[1], ARGV[2]
if operation == "probe" then
  redis.call("SET", made .. ":probe", "1")  -- a write: refused by a replica, as a change would be
  return {0, 0}
end
if redis.call("GET", "${prefix}seeded") ~= "done" then return {-4, 0} end
local exists = redis.call("HEXISTS", values, id) == 1
local value = 0
if operation == "incr" then
  if not exists then
    if not ${auto_create} then return {-1, 0} end
    if redis.call("HLEN", values) >= ${max_counters} then return {-2, 0} end
  elseif tonumber(redis.call("HGET", values, id)) >= ${max_value} then
    return {-3, 0}
  end
  value = redis.call("HINCRBY", values, id, 1)
elseif operation == "set" then
  value = tonumber(ARGV[3])
  redis.call("HSET", values, id, ARGV[3])
elseif not exists then
  return {-1, 0}
else
  redis.call("HDEL", values, id)
  redis.call("ZREM", order, id)
end
if not exists then
  redis.call("ZADD", order, redis.call("INCR", made), id)
end
local version = redis.call("HINCRBY", versions, id, 1)
if operation == "delete" then
  redis.call("PUBLISH", "${prefix}changes", "d " .. id .. " " .. version)
else
  redis.call("PUBLISH", "${prefix}changes", "v " .. id .. " " .. string.format("%d", value) .. " " .. version)
end
return {value, version}
""")

RENEW_SCRIPT = """
-- KEYS: leader. ARGV: this process, ttl ms. Take the leadership if nobody holds it, keep it if held.
if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then return 1 end
if redis.call("GET", KEYS[1]) == ARGV[1] then redis.call("PEXPIRE", KEYS[1], ARGV[2]) return 1 end
return 0
"""


def import_redis() -> Any:
    """redis-py (with hiredis, if installed), needed only for --redis."""
    try:
        import redis.asyncio
        import redis.asyncio.sentinel
    except ImportError:
        raise ValueError('--redis needs the Redis client redis-py: pip install "livecounter[redis]"') from None
    return redis


def redis_client(url: str) -> Any:
    """A redis-py client that gives up rather than waits: short timeouts, no retries (the caller
    refuses the change, and the link's loop tries again)."""
    redis = import_redis()
    options = {"socket_timeout": REDIS_TIMEOUT, "socket_connect_timeout": REDIS_TIMEOUT,
               "retry": redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0), "health_check_interval": 0}
    if (parts := sentinel_parts(url)) is not None:
        sentinel = redis.asyncio.sentinel.Sentinel(parts.sentinels, sentinel_kwargs={
            "socket_timeout": REDIS_TIMEOUT, "socket_connect_timeout": REDIS_TIMEOUT}, **options)
        return sentinel.master_for(parts.service, db=parts.database, password=parts.password)
    return redis.asyncio.Redis.from_url(url, **options)


def shown_url(url: str) -> str:
    """url without its password, for the log and /healthz."""
    return re.sub(r"://[^@/]*@", "://", url)


class RedisLink:
    """This process's connection to Redis: writes (scripted, a pipeline per turn of the loop), the
    changes every process makes (pub/sub), heartbeats, the shared watcher counts and the leadership."""

    def __init__(self, url: str, *, durable: bool, auto_create: bool, max_counters: int) -> None:
        self.url = url
        self._redis = import_redis()
        self.client = redis_client(url)
        self.process = f"{socket.gethostname()}:{os.getpid()}:{random.randrange(1 << 32):08x}"
        self.durable = durable
        self.working = Outage(f"Redis at {shown_url(url)}")
        self.fitness = Outage(f"Redis at {shown_url(url)} for --durable")  # checked each heartbeat
        self.leading = False
        self.replicas = 0  # --durable: replicas a change waits for (one), if the primary has any
        # The scripts by their SHA1 (EVALSHA), loaded at the start and again when Redis says it lacks
        # them (restarted, or another primary): a pipeline of registered scripts would ask SCRIPT
        # EXISTS each time, one more round trip.
        self._change_script = CHANGE_SCRIPT.substitute(prefix=REDIS_PREFIX, max_value=MAX_VALUE,
                                                       auto_create="true" if auto_create else "false",
                                                       max_counters=max_counters)
        self._scripts = {script: hashlib.sha1(script.encode()).hexdigest()
                         for script in (self._change_script, RENEW_SCRIPT)}
        self._keys = [REDIS_PREFIX + name for name in ("values", "versions", "order", "made")]
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []  # writes of this turn
        self._heard = asyncio.Event()  # set by each message: the subscription lives
        self._counts_to_store: dict[str, int] = {}  # this process's counts, for its hash at the next beat
        self._beaten = False
        self.subscribed = asyncio.Event()  # the first subscription is made, and the replica loaded
        # What the rest of the process does with what the link hears (wired in create_app):
        self.on_message: Callable[[str], None] = lambda message: None
        self.on_subscribed: Callable[[], Awaitable[None]] | None = None  # re-read what may have changed
        self.on_leadership: Callable[[bool], None] = lambda leading: None
        self.on_beat: Callable[[], None] = lambda: None
        self.writes = 0  # for /metrics
        self.failures = 0

    @property
    def refusing(self) -> str | None:
        """Why changes are refused now: Redis fails, or (--durable) the primary doesn't fsync each one."""
        return self.working.error or self.fitness.error

    # --- writes ---

    def change(self, operation: str, counter_id: str, value: int | None = None) -> Awaitable[list[int]]:
        """Run the change script (see CHANGE_SCRIPT): its answer {value, version}, once Redis made it
        (and with --durable, once a replica holds it). Unavailable if Redis doesn't answer in time."""
        return self._queue(("change", operation, counter_id) + (() if value is None else (str(value),)))

    def publish(self, message: str) -> None:
        """A message to every process, with the next pipeline; failing is the link's outage."""
        self._queue(("publish", message))

    def _queue(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        if not self._pending:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._send_pending()))
        self._pending.append((command, future))
        return future

    async def _send_pending(self) -> None:
        pending, self._pending = self._pending, []
        pipe = self.client.pipeline(transaction=False)
        waits = self.durable and self.replicas and any(command[0] == "change" for command, _ in pending)
        try:
            for command, _ in pending:
                if command[0] == "change":
                    pipe.evalsha(self._scripts[self._change_script], 0, *command[1:])
                else:
                    pipe.publish(REDIS_PREFIX + "changes", command[1])
            if waits:
                pipe.execute_command("WAIT", 1, WAIT_TIMEOUT_MS)
            answers = await asyncio.wait_for(pipe.execute(raise_on_error=False), REDIS_GIVE_UP)
            if len(answers) != len(pending) + bool(waits):
                raise RuntimeError(f"{len(answers)} answers to {len(pending) + bool(waits)} commands")
            if any(isinstance(answer, self._redis.exceptions.NoScriptError) for answer in answers):
                # A Redis that doesn't know the script yet (restarted, or promoted): a script's
                # NOSCRIPT changed nothing, so the writes go again once it knows it.
                await self.load_scripts()
                self._pending[:0] = pending
                asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._send_pending()))
                return
        except Exception as error:  # noqa: BLE001 - a Redis that is down, failing over, or a bug: refused
            self._failed(error)
            for _, future in pending:
                if not future.done():
                    future.set_exception(Unavailable(self.working.error))
            future_exception_retrieved(pending)
            return
        if waits and answers[-1] == 0:
            reason = f"no replica of Redis at {shown_url(self.url)} acknowledged the change within {WAIT_TIMEOUT_MS} ms"
            answers = [Unavailable(reason) if command[0] == "change" else answer
                       for (command, _), answer in zip(pending, answers)]
        for (_, future), answer in zip(pending, answers):
            if future.done():
                continue
            if isinstance(answer, Unavailable):
                future.set_exception(answer)
            elif isinstance(answer, Exception):  # READONLY (a replica since a failover), OOM, ...
                self._failed(answer)
                future.set_exception(Unavailable(self.working.error))
            else:
                future.set_result(answer)
        future_exception_retrieved(pending)
        self.writes += len(pending)

    def _failed(self, error: BaseException) -> None:
        self.failures += 1
        self.working.failed(failure_reason(error) or type(error).__name__, unexpected=redis_unexpected(error))

    # --- at the start ---

    async def load_scripts(self) -> None:
        for script in self._scripts:
            await asyncio.wait_for(self.client.script_load(script), REDIS_GIVE_UP)

    async def check(self) -> None:
        """At the start: Redis answers, and with --durable it writes every change to disk before it
        answers (appendonly yes, appendfsync always): else ValueError naming the setting."""
        try:
            await asyncio.wait_for(self.client.ping(), REDIS_GIVE_UP)
            await self.load_scripts()
            if self.durable:
                config = {**await self.client.config_get("appendonly"), **await self.client.config_get("appendfsync")}
                replication = await self.client.info("replication")
        except Exception as error:  # noqa: BLE001 - whatever stops it, the start says it in one line
            raise ValueError(f"--redis {shown_url(self.url)}: {failure_reason(error)}") from None
        if self.durable and (unfit := self._judge_durability(config, replication)):
            raise ValueError(unfit)

    def _judge_durability(self, config: dict[Any, Any], replication: dict[str, Any]) -> str | None:
        """--durable: why this Redis (the primary now) can't make a change durable before it answers,
        or None; an outage of its own while it lasts (changes are refused), and the replicas to wait for."""
        config = {key.decode() if isinstance(key, bytes) else key: value.decode() if isinstance(value, bytes) else value
                  for key, value in config.items()}
        self.replicas = int(replication.get("connected_slaves", 0))
        if config.get("appendonly") == "yes" and config.get("appendfsync") == "always":
            self.fitness.succeeded()
            return None
        reason = (f"--durable with --redis needs Redis to write every change to disk before it answers: "
                  f"appendonly yes and appendfsync always (it has appendonly {config.get('appendonly')}, "
                  f"appendfsync {config.get('appendfsync')})")
        self.fitness.failed(reason)
        return reason

    async def seed(self, counters: dict[str, int], versions: dict[str, int] | None = None) -> bool:
        """Counters (with their versions, if given), into a Redis that has none (no seeded key: the
        first start, or a Redis that lost its data): whether this process put them in. Another process
        doing it meanwhile is waited for. Every process reads Redis anew once it is done (the message
        "r"): those running meanwhile may hold other counters."""
        seeded, mine = REDIS_PREFIX + "seeded", f"in progress {self.process}"
        while not await self.client.set(seeded, mine, nx=True, ex=SEED_HOLD):  # the others wait for "done"
            if (held := await self.client.get(seeded)) == b"done":
                return False
            if held == mine.encode():  # this process's own seed, which failed (Redis stalled): again
                break
            await asyncio.sleep(0.1)  # another process seeds (if it dies, its key expires: then this one)
        ids = list(counters)
        for start in range(0, len(ids), SEED_CHUNK):
            chunk = {counter_id: counters[counter_id] for counter_id in ids[start:start + SEED_CHUNK]}
            pipe = self.client.pipeline(transaction=False)
            pipe.expire(seeded, SEED_HOLD)
            pipe.hset(self._keys[0], mapping=chunk)
            if versions:
                pipe.hset(self._keys[1], mapping={counter_id: versions.get(counter_id, 0) for counter_id in chunk})
            pipe.zadd(self._keys[2], {counter_id: start + number for number, counter_id in enumerate(chunk)})
            await pipe.execute()
        await self.client.set(self._keys[3], len(ids), nx=True)
        await self.client.set(seeded, "done")
        await self.client.publish(REDIS_PREFIX + "changes", "r")
        return True

    async def load(self, known: Iterable[str] = ()) -> tuple[dict[str, int], dict[str, int]]:
        """Every counter's value and version, in the listing's order; and the versions of the known
        ids Redis has no counter of (0 if it never had: a Redis that lost its data counts anew)."""
        ids = [member.decode() for member in await self.client.zrange(self._keys[2], 0, -1)]
        values, versions = {}, {}
        for start in range(0, len(ids), SEED_CHUNK):
            chunk = ids[start:start + SEED_CHUNK]
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self._keys[0], chunk)
            pipe.hmget(self._keys[1], chunk)
            chunk_values, chunk_versions = await pipe.execute()
            for counter_id, value, version in zip(chunk, chunk_values, chunk_versions):
                if value is not None:
                    values[counter_id] = int(value)
                    versions[counter_id] = int(version or 0)
        missing = [counter_id for counter_id in known if counter_id not in values]
        for start in range(0, len(missing), SEED_CHUNK):
            chunk = missing[start:start + SEED_CHUNK]
            versions.update(zip(chunk, (int(version or 0) for version in await self.client.hmget(self._keys[1], chunk))))
        return values, versions

    async def lost_its_counters(self) -> bool:
        """Whether Redis has no counters it was given (restarted empty, or flushed)."""
        return await self.client.get(REDIS_PREFIX + "seeded") != b"done"

    async def watcher_counts(self) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
        """Every other process's shared counts, process -> {counter id: count}, and how long ago each
        last renewed them (its heartbeat sets them to expire DEAD_AFTER later)."""
        counts, silent_for = {}, {}
        async for key in self.client.scan_iter(match=REDIS_PREFIX + "watchers:*", count=1000):
            process = key.decode()[len(REDIS_PREFIX + "watchers:"):]
            if process != self.process:
                pipe = self.client.pipeline(transaction=False)
                pipe.hgetall(key)
                pipe.pttl(key)
                by_counter, expires_in_ms = await pipe.execute()
                counts[process] = {counter_id.decode(): int(count) for counter_id, count in by_counter.items()}
                silent_for[process] = max(0.0, DEAD_AFTER - max(expires_in_ms, 0) / 1000)
        return counts, silent_for

    def share_count(self, counter_id: str, count: int) -> None:
        """This process's own count of the counter's watchers, for the others (batched)."""
        self._queue(("publish", f"w {self.process} {counter_id} {count}"))
        self._counts_to_store[counter_id] = count

    # --- while it runs ---

    async def run(self) -> None:
        """Subscribe, and hand every message to on_message; after a failure, again (on_subscribed
        re-reads what may have changed meanwhile). Meanwhile: heartbeats and the leadership."""
        await asyncio.gather(forever(self.working, self._listen), forever(self.working, self._beat))

    async def _listen(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await asyncio.wait_for(pubsub.subscribe(REDIS_PREFIX + "changes"), REDIS_GIVE_UP)
            if self.on_subscribed is not None:
                await self.on_subscribed()
            self.subscribed.set()
            await self.load_scripts()
            await asyncio.wait_for(self.client.evalsha(self._scripts[self._change_script], 0, "probe"), REDIS_GIVE_UP)
            self.working.succeeded()
            quiet_since = time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=HEARTBEAT)
                if message is not None:
                    quiet_since = time.monotonic()
                    if message["data"] == b"r" and self.on_subscribed is not None:
                        await self.on_subscribed()  # Redis was given counters anew: read them all
                    else:
                        self.on_message(message["data"].decode())
                elif time.monotonic() - quiet_since > DEAD_AFTER:  # not even its own heartbeat came
                    raise asyncio.TimeoutError("no message from Redis, not even this process's heartbeat")
        except Exception as error:  # noqa: BLE001 - the outage, then a new subscription
            self._failed(error)
            # Each second, like the heartbeat, not after the outage's growing delay: a Redis back
            # after a restart or a failover takes changes again within a second, and streams follow.
            await asyncio.sleep(HEARTBEAT)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), REDIS_GIVE_UP)

    async def _beat(self, retried: bool = False) -> None:
        """Every HEARTBEAT (the first at once): say this process lives, keep its shared counts, take
        or keep the leadership."""
        if self._beaten and not retried:
            await asyncio.sleep(HEARTBEAT)
        self._beaten = True
        watchers = REDIS_PREFIX + "watchers:" + self.process
        counts, self._counts_to_store = self._counts_to_store, {}
        pipe = self.client.pipeline(transaction=False)
        pipe.get(REDIS_PREFIX + "seeded")
        pipe.publish(REDIS_PREFIX + "changes", f"h {self.process}")
        for counter_id, count in counts.items():
            if count:
                pipe.hset(watchers, counter_id, count)
            else:
                pipe.hdel(watchers, counter_id)
        pipe.pexpire(watchers, int(1000 * DEAD_AFTER))
        if self.durable:  # what --durable needs, each second: the primary may be another since the last
            pipe.config_get("appendonly")
            pipe.config_get("appendfsync")
            pipe.info("replication")
        pipe.evalsha(self._scripts[RENEW_SCRIPT], 1, REDIS_PREFIX + "leader", self.process, LEADER_TTL_MS)
        try:
            answers = await asyncio.wait_for(pipe.execute(), REDIS_GIVE_UP)
        except Exception as error:  # noqa: BLE001 - Redis down or failing over: the next beat tries again
            self._counts_to_store = counts | self._counts_to_store
            if isinstance(error, self._redis.exceptions.NoScriptError) and not retried:
                # A Redis restarted, or another primary: it knows the scripts once they are loaded.
                with contextlib.suppress(Exception):
                    await self.load_scripts()
                    return await self._beat(retried=True)
            self._failed(error)
            return
        self.working.succeeded()  # writes work again (the leader's key is one): changes are taken again
        if answers[0] is None:  # its counters are gone, though no connection broke (FLUSHALL, an eviction):
            self.publish("r")  # every process reads Redis anew, and the first puts its copy back
        if self.durable:
            self._judge_durability({**answers[-4], **answers[-3]}, answers[-2])
        self.on_beat()
        if (leading := answers[-1] == 1) != self.leading:
            log.info("this process %s", "leads: it purges caches and publishes to Pushpin" if leading
                     else "no longer leads: another process took over")
            self.leading = leading
            self.on_leadership(leading)

    async def close(self) -> None:
        """On a stop: this process's counts go at once (not DEAD_AFTER later), and its leadership."""
        with contextlib.suppress(Exception):
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(REDIS_PREFIX + "watchers:" + self.process)
            pipe.publish(REDIS_PREFIX + "changes", f"x {self.process}")
            if self.leading:
                pipe.delete(REDIS_PREFIX + "leader")
            await asyncio.wait_for(pipe.execute(), REDIS_GIVE_UP)
        with contextlib.suppress(Exception):
            await self.client.aclose()


def future_exception_retrieved(pending: list[tuple[Any, asyncio.Future[Any]]]) -> None:
    """A publish's future nobody awaits: its exception is not an 'exception never retrieved'."""
    for _, future in pending:
        if future.done() and not future.cancelled():
            future.exception()


def redis_unexpected(error: BaseException) -> BaseException | None:
    """A Redis that is down, failing over or refusing is no bug; anything else is (its traceback)."""
    redis = import_redis()
    return None if isinstance(error, (redis.exceptions.RedisError, Unavailable)) else unexpected(error)


class RedisCounters(CounterStore):
    """Counters in Redis (see above), with a replica of them here. Writes answer once Redis made them
    (an awaitable); the change reaches this process's feed then, and the other processes' when they
    hear of it. Reads, listings and new streams are answered from the replica."""

    def __init__(self, link: RedisLink, feed: ChangeFeed, *, auto_create: bool, max_counters: int) -> None:
        super().__init__({}, feed, auto_create=auto_create, max_counters=max_counters, durable=False)
        self._link = link
        self._versions: dict[str, int] = {}
        self._gone: collections.OrderedDict[str, float] = collections.OrderedDict()  # deleted ids, by when
        self.recent: collections.OrderedDict[str, float] = collections.OrderedDict()  # changed ids, by when

    @property
    def versions(self) -> dict[str, int]:
        """Each counter's version (how many changes Redis made to it), and those deleted lately."""
        return self._versions

    @property
    def known(self) -> list[str]:
        """The ids this replica has a version of: its counters, and those deleted lately."""
        return list(self._versions)

    @property
    def refusing(self) -> str | None:  # type: ignore[override]
        """While Redis fails: changes are refused at once (503), not queued behind a timeout."""
        return self._link.refusing

    @refusing.setter
    def refusing(self, reason: str | None) -> None:
        pass  # CounterStore's __init__ sets it: here it is the link's outage

    def replace_all(self, values: dict[str, int], versions: dict[str, int]) -> None:
        """Values and versions read anew from Redis (at the start, after an outage): they are the
        truth, the versions of counters it doesn't have too (Redis may have lost them, and counts
        anew); what changed goes to the feed."""
        for counter_id in [counter_id for counter_id in self._versions if counter_id not in values]:
            self.apply(counter_id, None, versions.get(counter_id, 0), exactly=True)
        for counter_id, value in values.items():
            if self._values.get(counter_id) != value or self._versions.get(counter_id) != versions[counter_id]:
                self.apply(counter_id, value, versions[counter_id], exactly=True)

    def apply(self, counter_id: str, value: int | None, version: int, *, exactly: bool = False) -> None:
        """A change Redis made (heard, or the answer to a write here): into the replica and the feed,
        unless an answer or a message already brought a newer one (exactly: it is the truth, read
        from Redis itself)."""
        if version <= self._versions.get(counter_id, 0) and not exactly:
            return
        self._versions[counter_id] = version
        if exactly and self._values.get(counter_id) == value:
            return
        now = time.monotonic()
        self.recent.pop(counter_id, None)
        self.recent[counter_id] = now
        while next(iter(self.recent.values())) < now - RECENT:
            self.recent.popitem(last=False)
        if value is None:
            if self._values.pop(counter_id, None) is not None:
                self._made_or_deleted += 1
            self._gone[counter_id] = now  # its version stays a while: a late message must not bring it back
        else:
            self._made_or_deleted += counter_id not in self._values
            self._values[counter_id] = value
            self._gone.pop(counter_id, None)
        while self._gone and next(iter(self._gone.values())) < now - RECENT:
            self._versions.pop(self._gone.popitem(last=False)[0], None)
        self._feed.changed(Key((counter_id, False)), value)

    def increment(self, counter_id: str) -> Awaitable[int]:  # type: ignore[override]
        return self._write("incr", counter_id)

    def set(self, counter_id: str, value: int) -> Awaitable[int]:  # type: ignore[override]
        return self._write("set", counter_id, value)

    def delete(self, counter_id: str) -> Awaitable[None]:  # type: ignore[override]
        return self._write("delete", counter_id)

    async def _write(self, operation: str, counter_id: str, value: int = 0) -> Any:
        answer, version = await self._link.change(operation, counter_id, value if operation == "set" else None)
        if version == 0:
            if answer == -2:
                raise CounterLimitReached(self._max_counters)
            if answer == -3:
                raise OverflowError(counter_id)
            if answer == -4:  # a change now could be overwritten when the counters go back in
                raise Unavailable(f"Redis at {shown_url(self._link.url)} lost its counters; they go back in "
                                  "from a running process, or the data file at the next start")
            raise KeyError(counter_id)
        self.increments += operation == "incr"
        self.apply(counter_id, None if operation == "delete" else answer, version)
        return None if operation == "delete" else answer

    def hear(self, message: str) -> None:
        """A value or deletion message (see above) from Redis."""
        kind, _, rest = message.partition(" ")
        if kind == "v":
            counter_id, value, version = rest.split(" ")
            self.apply(counter_id, int(value), int(version))
        elif kind == "d":
            counter_id, version = rest.split(" ")
            self.apply(counter_id, None, int(version))


def hear_from_redis(link: RedisLink, store: RedisCounters, presence: Presence, grip: GripPublisher | None,
                    message: str) -> None:
    """Where each message from Redis goes (see the keys above); this process's own counts and
    heartbeats come back to it too, and are its own already."""
    kind = message[:1]
    if kind in ("v", "d"):
        store.hear(message)
    elif kind == "w":
        _, process, counter_id, count = message.split(" ")
        if process != link.process:
            presence.remote(process, counter_id, int(count))
    elif kind == "h":
        if (process := message[2:]) != link.process:
            presence.alive(process)
    elif kind == "x":  # a process that stopped: its counts go now
        presence.gone(message[2:])
    elif kind == "g" and grip is not None:
        _, channel, publish_id = message.split(" ")
        if (named := Key.of_grip_channel(channel)) is not None:
            grip.learn_handed(named[0], None if publish_id == "-" else publish_id)


async def resynchronized(link: RedisLink, store: RedisCounters, presence: Presence) -> None:
    """After (re)subscribing: what changed while this process wasn't listening (every value, the
    other processes' counts), and this process's own counts shared again. A Redis that lost its
    counters (restarted empty) gets this process's, the latest there are, unless another's came first."""
    if await link.lost_its_counters() and await link.seed(dict(store.values), dict(store.versions)):
        log.warning("Redis had lost its counters: this process's %d are in it again", len(store.values))
    store.replace_all(*await link.load(store.known))
    presence.replace_remote(*await link.watcher_counts())
    presence.share_all()


def leadership_changed(store: RedisCounters, presence: Presence, senders: list[GripPublisher | CachePurger],
                       leading: bool) -> None:
    """The leader purges and publishes; one that takes over sends again what changed lately (the
    old leader may have died before it did)."""
    for sender in senders:
        sender.leading = leading
    presence.recount_proxied()
    if leading:
        for counter_id in store.recent:
            key = Key((counter_id, False))
            value = store.values.get(counter_id)
            for sender in senders:
                sender.changed(key, value)
                if value is not None:
                    sender.changed(key.count, presence.count(counter_id))


# --------------------------------------------------------------------------------------------------
# Requests and answers
# --------------------------------------------------------------------------------------------------

class RateLimiter:
    """A token bucket per key: `rate` requests a second, in bursts of up to `burst`. For --post-rate
    the key is (client address, counter id): a page that counts several counters at once (embed.js
    with three ids) makes one increment of each, and none of them is refused for the others."""

    # Past this many buckets the least recently used one is forgotten: a key that comes back starts
    # full, like a new one. Forgetting gives nobody more than one burst, and only after MAX_BUCKETS
    # other keys were used, so flooding the table (many addresses, or ids that don't exist) gains nothing.
    MAX_BUCKETS = 100_000

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        # key -> (tokens, when counted), least recently used first: forgetting one is O(1), however
        # many keys there are (a scan of them all would stall the loop with many IPv6 clients).
        self._buckets: collections.OrderedDict[Hashable, tuple[float, float]] = collections.OrderedDict()

    def retry_after(self, key: Hashable) -> float:
        """Take a token for key: 0 if it had one, else the seconds until it will."""
        now = time.monotonic()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            tokens = self._burst
            if len(buckets) >= self.MAX_BUCKETS:
                buckets.popitem(last=False)  # the key idle the longest
        else:
            tokens, counted = bucket
            tokens = min(self._burst, tokens + (now - counted) * self._rate)
            buckets.move_to_end(key)
        if tokens < 1:
            buckets[key] = (tokens, now)
            return (1 - tokens) / self._rate
        buckets[key] = (tokens - 1, now)
        return 0.0


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", CounterStore)
JOURNAL = web.AppKey("journal", Journal | None)  # None with --redis
REDIS = web.AppKey("redis", RedisLink | None)  # None without --redis
SEED = web.AppKey("seed", dict[str, int])  # --redis: the data file's counters, for a Redis that has none
HUB = web.AppKey("hub", ListenerHub)
GRIP = web.AppKey("grip", GripPublisher | None)  # None without --grip-url
POST_RATE = web.AppKey("post_rate", RateLimiter | None)  # None without --post-rate
PRESENCE = web.AppKey("presence", Presence)
PURGER = web.AppKey("purger", CachePurger | None)  # None without --purge-url
CACHING = web.AppKey("caching", dict[str, str])  # the caching headers of reads

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY_BYTES = 1024  # an increment needs no body; this admits the small forms some clients send
BODY_TIMEOUT = 10  # seconds for a body of at most MAX_BODY_BYTES to arrive
PLAIN_TEXT = "text/plain"
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
ALLOW_ORIGIN = "Access-Control-Allow-Origin"  # on every answer (CORS): see allowing_origin


def client_address(request: web.Request) -> str:
    """The client's address: behind a trusted proxy, the one it appended to X-Forwarded-For."""
    if request.app[SETTINGS].trust_proxy:
        forwarded = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
        if forwarded:
            return forwarded
    return request.remote or "unknown"


class AccessLogger(web.AbstractAccessLogger):
    """One line per request in the combined log format, as Apache and nginx write it, with the
    client address as client_address takes it: behind --trust-proxy, the client's, not the proxy's."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)  # the format is aiohttp's; this one is always combined
        self._second = -1  # the clock's second that _timestamp shows: formatted once a second, not per line
        self._timestamp = ""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)  # aiohttp formats no line that nothing would log

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_taken: float) -> None:
        second = int(time.time() - time_taken)  # when the request came, as %t says
        if second != self._second:
            self._second = second
            self._timestamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second))
        try:
            client = client_address(request)  # type: ignore[arg-type]
        except (AssertionError, AttributeError):  # a request aiohttp refused before routing has no app
            client = request.remote or "-"
        # %b is the body's size: aiohttp's body_length counts the headers too. A stream's isn't known.
        body_size = response.content_length if request.method != "HEAD" else None
        headers, version = request.headers, request.version
        self.logger.info(
            f'{client} - - [{self._timestamp}] "{request.method} {quoted(request.raw_path)} '
            f'HTTP/{version.major}.{version.minor}" {response.status} {body_size or "-"} '
            f'"{quoted(headers.get("Referer", "-"))}" "{quoted(headers.get("User-Agent", "-"))}"')


def quoted(text: str) -> str:
    """text for a quoted field of the access log: a quote in it must not end the field."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def readable_counter_id(request: web.Request) -> str:
    """The counter id in the path (valid: its route admits no other), if the counter is readable."""
    counter_id = request.match_info["counter_id"]
    if not request.app[STORE].readable(counter_id):
        unknown_counter(counter_id)
    return counter_id


def preferred_format(request: web.Request) -> str:
    """The first of event-stream, JSON or plain text that the Accept header names; plain text if none."""
    for media_range in request.headers.get("Accept", "").split(","):
        media_type = media_range.split(";", 1)[0].strip().lower()
        if media_type in ("text/event-stream", "application/json", PLAIN_TEXT):
            return media_type
    return PLAIN_TEXT


# Nothing caches the answer to a POST or PUT, so it has no Cache-Control: a header less on the hot path
# (the instructions row of bench/run.py). A read says how it may be cached (caching_headers).
CHANGED_VALUE_HEADERS = {"Content-Type": "text/plain; charset=utf-8"}


def value_response(request: web.Request, counter_id: str, field: str, value: int, media_type: str) -> web.Response:
    """A read of a counter's value or watcher count (field): `27\n`, or {"id": "2", field: 27}. A
    cache may keep it only if the counter exists (one --auto-create would make is never purged)."""
    caching = request.app[CACHING] if counter_id in request.app[STORE] else NOT_CACHED
    if media_type == "application/json":
        return web.json_response({"id": counter_id, field: value}, headers=caching)
    return web.Response(body=b"%d\n" % value, headers={**CHANGED_VALUE_HEADERS, **caching})


NOT_CACHED = {"Cache-Control": "no-cache"}


def caching_headers(settings: Settings) -> dict[str, str]:
    """What reads say about caching: nothing may keep them, unless a cache in front is purged on every
    change (--purge-url); then it may for --cache-seconds (browsers still may not: max-age is 0)."""
    if not settings.purge_urls:
        return NOT_CACHED
    return {"Cache-Control": f"public, max-age=0, s-maxage={settings.cache_seconds}", "Vary": "Accept"}


def changed_value_response(value: int) -> web.Response:
    """The answer to a POST or PUT: bytes and ready headers, no text to encode or type to parse."""
    return web.Response(body=b"%d\n" % value, headers=CHANGED_VALUE_HEADERS)


def abort(status: type[web.HTTPException], reason: str, **arguments: Any) -> NoReturn:
    """Refuse the request: status, and the reason as one line of plain text (arguments: the status's own)."""
    raise status(text=reason + "\n", **arguments)


def retry_later(status: type[web.HTTPException], reason: str, seconds: float) -> NoReturn:
    """Refuse the request for now: Retry-After says when to try again (at most a day), also to pages
    of other origins."""
    abort(status, reason, headers={"Retry-After": str(max(1, math.ceil(min(seconds, 86_400)))),
                                   "Access-Control-Expose-Headers": "Retry-After"})


def unknown_counter(counter_id: str) -> NoReturn:
    abort(web.HTTPNotFound, f"unknown counter {counter_id!r} (an admin PUT creates it; with --auto-create, a POST)")


async def read_body(request: web.Request) -> bytes:
    """The request body: 413 past MAX_BODY_BYTES (declared or, if chunked, received), 408 if it
    doesn't arrive within BODY_TIMEOUT (a client must not hold a handler by sending slowly)."""
    if not request.body_exists:
        return b""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        body_too_large()

    async def read() -> bytes:
        body = b""
        while received := await request.content.read(MAX_BODY_BYTES + 1):
            body += received
            if len(body) > MAX_BODY_BYTES:
                body_too_large()
        return body
    try:  # asyncio.wait_for: asyncio.timeout() is Python 3.11+
        return await asyncio.wait_for(read(), BODY_TIMEOUT)
    except asyncio.TimeoutError:  # the builtin TimeoutError from 3.11 on, but a class of its own on 3.10
        abort(web.HTTPRequestTimeout, f"the request body did not arrive within {BODY_TIMEOUT} s",
              headers={"Connection": "close"})
    except ConnectionResetError:  # the client left before its body ended: nothing changed, no bug
        abort(web.HTTPBadRequest, "the request body ended early (the connection closed)", headers={"Connection": "close"})


def body_too_large() -> NoReturn:
    abort(web.HTTPRequestEntityTooLarge, f"request body too large: at most {MAX_BODY_BYTES} bytes (an increment "
          "needs none)", max_size=MAX_BODY_BYTES, actual_size=MAX_BODY_BYTES + 1)


# Every answer carries the allowed origin (CORS); paths and methods the API doesn't have get theirs.

def allowing_origin(origin: str, handler: Handler) -> Handler:
    """The handler, with the allowed origin on its every answer, errors included (a stream sends it
    itself). Not an on_response_prepare signal, aiohttp's usual place for it: that is a dispatch on
    every POST (python bench/profile_post.py)."""
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as refusal:
            refusal.headers[ALLOW_ORIGIN] = origin
            # No cache keeps an error: a counter made after its 404 must read at once through one.
            refusal.headers.setdefault("Cache-Control", "no-store")
            raise
        response.headers[ALLOW_ORIGIN] = origin
        return response
    return answer


# A badge: a counter's value (or watcher count) as a flat SVG image in the style of shields.io, for
# pages that run no script (a README). Text widths are Verdana's at 11 px, and textLength holds each
# text to its box in whatever font the viewer has, so nothing is clipped.

BADGE_STYLES = ("flat", "flat-square")
MAX_LABEL = 40  # characters
VERDANA_11PX = dict(zip(
    " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~",
    (3.9, 4.7, 5.6, 9.2, 7.0, 12.1, 8.0, 3.0, 5.0, 5.0, 7.0, 9.2, 4.0, 5.0, 4.0, 5.0, 7.0, 7.0, 7.0, 7.0,
     7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 5.0, 5.0, 9.2, 9.2, 9.2, 6.1, 11.0, 7.5, 7.5, 7.7, 8.5, 7.0, 6.3, 8.5,
     8.3, 4.6, 5.0, 7.6, 6.1, 9.3, 8.2, 8.7, 6.6, 8.7, 7.6, 7.5, 6.8, 8.1, 7.5, 10.9, 7.5, 6.8, 7.5, 5.0,
     5.0, 5.0, 9.2, 7.0, 7.0, 6.7, 6.9, 5.7, 6.9, 6.6, 3.8, 6.9, 7.0, 3.0, 3.8, 6.5, 3.0, 10.7, 7.0, 6.7,
     6.9, 6.9, 4.7, 5.7, 4.3, 7.0, 6.5, 9.0, 6.5, 6.5, 5.8, 7.0, 5.0, 7.0, 9.2)))
FULL_WIDTH = 11.0  # a CJK character or an emoji: an em
OTHER_WIDTH = 7.5  # any other letter (Cyrillic, Greek, ...): about a capital's
BADGE_HEADERS = {"Content-Type": "image/svg+xml", "Cache-Control": "no-cache, max-age=0",
                 # GitHub's image proxy (camo) keeps an image unless it expired: this one always has.
                 "Expires": "Thu, 01 Jan 1970 00:00:00 GMT"}


def text_width(text: str) -> float:
    return sum(character_width(character) for character in text)


def character_width(character: str) -> float:
    """A character's width at 11 px: Verdana's for ASCII, its base letter's for an accented one, an
    em for a wide one, none for a combining mark. A guess too wide would stretch the text (textLength)."""
    if (width := VERDANA_11PX.get(character)) is not None:
        return width
    if unicodedata.combining(character) or unicodedata.category(character) in ("Mn", "Me", "Cf"):
        return 0.0
    if unicodedata.east_asian_width(character) in ("W", "F"):
        return FULL_WIDTH
    base = unicodedata.normalize("NFD", character)[0]
    return VERDANA_11PX.get(base, OTHER_WIDTH)


UNKNOWN_BADGE_COLOR = "#9f9f9f"  # shields.io's grey for what isn't there


def badge_response(request: web.Request, label: str, value: int | None, color: str) -> web.Response:
    """A badge of value (with thousands separators) under ?label= (or label), in ?style= (flat); for
    a counter that doesn't exist (value None) a grey "not found" badge, status 404, as shields.io
    answers: an image still, not a broken one."""
    label = request.query.get("label", label)
    if not 1 <= len(label) <= MAX_LABEL or not label.isprintable():
        abort(web.HTTPBadRequest, f"label must be 1 to {MAX_LABEL} printable characters")
    style = request.query.get("style", BADGE_STYLES[0])
    if style not in BADGE_STYLES:
        abort(web.HTTPBadRequest, f"style must be one of {', '.join(BADGE_STYLES)}")
    rounded = style == "flat"
    if value is None:
        return web.Response(status=404, headers=BADGE_HEADERS,
                            body=badge_svg(label, "not found", UNKNOWN_BADGE_COLOR, rounded=rounded))
    return web.Response(body=badge_svg(label, f"{value:,}", color, rounded=rounded), headers=BADGE_HEADERS)


def badge_svg(label: str, text: str, color: str, *, rounded: bool) -> bytes:
    """A two-part badge: label on grey, text on color, each centred in its box with 5 px to spare."""
    label_width, text_width_ = round(text_width(label)), round(text_width(text))
    left, right = label_width + 10, text_width_ + 10
    width = left + right
    title = html.escape(f"{label}: {text}")
    label, text = html.escape(label), html.escape(text)
    shade = ('<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/>'
             '<stop offset="1" stop-opacity=".1"/></linearGradient>') if rounded else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
            f'aria-label="{title}"><title>{title}</title>{shade}'
            f'<clipPath id="r"><rect width="{width}" height="20" rx="{3 if rounded else 0}" fill="#fff"/></clipPath>'
            f'<g clip-path="url(#r)"><rect width="{left}" height="20" fill="#555"/>'
            f'<rect x="{left}" width="{right}" height="20" fill="{color}"/>'
            + (f'<rect width="{width}" height="20" fill="url(#s)"/>' if rounded else "") +
            '</g><g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" '
            'font-size="11" lengthAdjust="spacingAndGlyphs">'
            f'<text x="{left / 2}" y="15" fill="#010101" fill-opacity=".3" textLength="{label_width}">{label}</text>'
            f'<text x="{left / 2}" y="14" textLength="{label_width}">{label}</text>'
            f'<text x="{left + right / 2}" y="15" fill="#010101" fill-opacity=".3" textLength="{text_width_}">{text}</text>'
            f'<text x="{left + right / 2}" y="14" textLength="{text_width_}">{text}</text></g></svg>').encode()


def refusing_other_methods(allowed: list[str]) -> Handler:
    """The answer on a path to any method but `allowed`: 405, with Allow and a one-line reason."""
    async def wrong_method(request: web.Request) -> web.StreamResponse:
        abort(web.HTTPMethodNotAllowed, f"{request.method} is not allowed here: {', '.join(allowed)}",
              method=request.method, allowed_methods=allowed)
    return wrong_method


# --------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------

async def get_counter(request: web.Request) -> web.StreamResponse:
    if "Grip-Last" in request.headers:
        return what_pushpin_missed(request)
    counter_id = readable_counter_id(request)
    media_type = preferred_format(request)
    if media_type != "text/event-stream":
        return value_response(request, counter_id, "value", request.app[STORE].value(counter_id), media_type)
    return await stream(request, [Key((counter_id, False))], multi=False)


async def get_watchers(request: web.Request) -> web.StreamResponse:
    """How many streams carry the counter's values now: like a counter's value, read or watched."""
    if "Grip-Last" in request.headers:
        return what_pushpin_missed(request)
    counter_id = readable_counter_id(request)
    media_type = preferred_format(request)
    if media_type == "text/event-stream":
        return await stream(request, [Key((counter_id, True))], multi=False)
    return value_response(request, counter_id, "watchers", request.app[PRESENCE].count(counter_id), media_type)


async def counter_badge(request: web.Request) -> web.Response:
    """The counter's value as a badge. Showing it doesn't count a view: a page counts with a POST."""
    counter_id = request.match_info["counter_id"]
    store = request.app[STORE]
    return badge_response(request, "views", store.value(counter_id) if store.readable(counter_id) else None, "#4c1")


async def watchers_badge(request: web.Request) -> web.Response:
    counter_id = request.match_info["counter_id"]
    count = request.app[PRESENCE].count(counter_id) if request.app[STORE].readable(counter_id) else None
    return badge_response(request, "watching", count, "#007ec6")


def value_on_channel(app: web.Application, key: Key) -> int | None:
    """A channel's value as its listeners know it: a counter's (None if it doesn't exist for them,
    see announced_value), or a counter's watcher count."""
    value = app[STORE].announced_value(key.counter_id)
    if value is None or not key.watchers:
        return value
    return app[PRESENCE].count(key.counter_id)


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream(request: web.Request, keys: list[Key], *, multi: bool) -> web.StreamResponse:
    """The channels' current values (counters' values or watcher counts), then every change, until
    the client leaves or the server stops."""
    if request.method == "HEAD":
        return web.Response(headers=SSE_HEADERS)
    value_of = functools.partial(value_on_channel, request.app)
    for key in keys:
        if value_of(key) is None:  # in durable mode, a counter whose creation isn't on disk yet
            unknown_counter(key.counter_id)
    signature = request.headers.get("Grip-Sig")
    if signature and request.app[GRIP] and grip_sig_valid(signature, request.app[SETTINGS].grip_key):
        return held_by_pushpin(request, keys, multi)
    transport = request.transport  # aiohttp forgets it when the client leaves: held for take_over
    if transport is None:
        abort(web.HTTPBadRequest, "the client left")  # not even this answer will arrive
    if transport.get_extra_info("sslcontext") is not None:
        # The hub writes to the socket itself (see take_over), which TLS can't allow.
        retry_later(web.HTTPServiceUnavailable, "event streams need plain HTTP here: "
                    "terminate TLS in a proxy in front of livecounter", 3600)
    hub = request.app[HUB]
    client = client_address(request)
    if refusal := hub.refusal(client):
        retry_later(*refusal, 10)
    # Admitted before its first frames are read, with no await between: it counts among the watchers
    # of its counters at once (its own watcher count frame counts it), and gets what changes after.
    listener = hub.admit(client, stream_style(multi=multi, chunked=request.version >= HttpVersion11), keys, value_of)
    settings = request.app[SETTINGS]
    # The origin now: allowing_origin adds it after the handler, and these headers go out first.
    response = web.StreamResponse(headers={**SSE_HEADERS, ALLOW_ORIGIN: settings.cors_origin})
    # aiohttp sends a StreamResponse's headers at prepare() unless told to hold them for the first
    # write: held, a stream opens with one send, not two (a tenth of its CPU in a reconnect storm, see
    # bench/README.md). A switch of newer aiohttp (3.14 has it); 3.10 has none and sends them at once.
    response._send_headers_immediately = False
    try:
        # The stream ends with its connection: a client must not pool it for another request.
        response.force_close()
        await response.prepare(request)  # aiohttp chunks it for HTTP/1.1, as the listener's style says
        # The headers (held, see above) and the first frames, the retry field in the first one's block,
        # in one packet (aiohttp does the chunking).
        await response.write(retry_field(settings.reconnect_window)
                             + encode_values(listener.first, stream_style(multi=multi, chunked=False)))
        await hub.take_over(listener, transport)
    except ConnectionError:
        pass  # the client left: not a failure
    finally:
        if listener.sock is None:  # never taken over: the slot goes back, whatever the way out
            hub.release(listener)
    return response  # aiohttp finds its side of the connection closed (or ends the stream), and is done


def held_by_pushpin(request: web.Request, keys: list[Key], multi: bool) -> web.Response:
    """The first frames, and the instructions for Pushpin to hold the stream on the channels.

    Without a cache in front, the body goes to this client alone (Pushpin forwards each client's
    request: tests/test_pushpin.py checks that their retry fields differ), so after a Pushpin restart
    they come back spread too; a cache (--purge-url) shares one answer, retry field included."""
    app = request.app
    first = {key: value_on_channel(app, key) for key in keys}
    # A stream of a counter and its watcher count counts itself, if Pushpin's stats are read: its
    # subscription is reported within a second, which the count follows.
    if app[SETTINGS].grip_stats:
        for key in keys:
            if key.count in first and not key.watchers:
                first[key.count] += 1
    settings = app[SETTINGS]
    return web.Response(
        body=retry_field(settings.reconnect_window) + encode_values(first, stream_style(multi=multi, chunked=False)),
        # Multi-counter streams are never cached: no purge names them.
        headers={**grip_hold_headers(request, keys, multi),
                 **({} if multi or keys[0].counter_id not in app[STORE] else app[CACHING])})


def grip_hold_headers(request: web.Request, keys: list[Key], multi: bool) -> dict[str, str]:
    """Pushpin's instructions for a stream of these channels: hold it on each, with the id of the
    publish its value came with as prev-id (a listener that missed one is found by Pushpin), and the
    next link, where Pushpin asks what a stream missed.

    Every stream has the same next link, answered from Grip-Last (which names a stream's channels and
    the last id each got): Pushpin refreshes at most 10 distinct links a second, each for up to 100
    streams, and refreshes every stream of a channel once it subscribes to it, holding back its
    publishes meanwhile. With a link per counter, a Pushpin subscribing 300 counters at once held
    the last of them back for 30 s; with one link, 1,000 streams a second go."""
    settings, grip = request.app[SETTINGS], request.app[GRIP]
    grip.answered(keys)
    channels = ", ".join(f"{key.grip_channel(multi)}; prev-id={grip.publish_id(key)}" for key in keys)
    # /counters/ under the app's prefix, if a sub-app: from the route's pattern, where an id is {counter_id}
    route_pattern = request.match_info.route.resource.canonical
    counters_path = route_pattern[:route_pattern.rindex("/counters")] + "/counters/"
    return {**SSE_HEADERS, "Grip-Hold": "stream", "Grip-Channel": channels,
            "Grip-Link": f"<{counters_path}?after=last>; rel=next; timeout={settings.grip_link_timeout}",
            "Grip-Keep-Alive": f":\\n\\n; format=cstring; timeout={max(1, round(settings.keepalive_interval))}"}


def what_pushpin_missed(request: web.Request) -> web.Response:
    """The answer to a next link (Pushpin asks it with Grip-Last, whatever its path and Accept say):
    Grip-Last names the stream's channels and the last id each got. The latest value of each channel
    that moved past it, and the hold again (nothing moved: an empty body). A counter deleted
    meanwhile: no hold, which ends the stream."""
    signature = request.headers.get("Grip-Sig")
    if not (signature and request.app[GRIP] and grip_sig_valid(signature, request.app[SETTINGS].grip_key)):
        abort(web.HTTPBadRequest, "Grip-Last comes from Pushpin, with a valid Grip-Sig")
    last_ids: dict[Key, str] = {}
    multi = False
    for entry in ",".join(request.headers.getall("Grip-Last")).split(","):
        channel, _, parameters = entry.partition(";")
        if (named := Key.of_grip_channel(channel.strip())) is None:
            abort(web.HTTPBadRequest, f"Grip-Last names an unknown channel {channel.strip()!r}")
        last_ids[named[0]] = parameters.partition("last-id=")[2].strip()
        multi |= named[1]
    grip = request.app[GRIP]
    missed = {}
    for key, last_id in last_ids.items():
        if (value := value_on_channel(request.app, key)) is None:
            return web.Response(headers={"Cache-Control": "no-store"})
        if grip.publish_id(key) != last_id:
            missed[key] = value
    return web.Response(body=encode_values(missed, stream_style(multi=multi, chunked=False)),
                        headers={**grip_hold_headers(request, list(last_ids), multi), "Cache-Control": "no-store"})


def increment_handler(app: web.Application) -> Handler:
    """POST, the hot path. What it needs from the app is looked up once, here: an app[KEY] lookup is a
    call in Python, and a POST needs several (the instructions row of bench/run.py)."""
    store, post_rate = app[STORE], app[POST_RATE]

    async def increment_counter(request: web.Request) -> web.Response:
        # Everything here runs for every increment, so the default mode awaits nothing.
        counter_id = request.match_info["counter_id"]
        if request.body_exists:
            await read_body(request)
        # One bucket per client and counter: a tuple key costs a little, and only with --post-rate.
        if post_rate is not None and (wait := post_rate.retry_after((client_address(request), counter_id))):
            retry_later(web.HTTPTooManyRequests, "too many increments of this counter from this address", wait)
        refuse_while_unavailable(store)
        try:
            value = store.increment(counter_id)  # the feed takes the change to the streams, caches, Pushpin
            if type(value) is not int:  # answered once durable: see CounterStore
                value = await value
        except KeyError:
            unknown_counter(counter_id)
        except CounterLimitReached as limit:
            abort(web.HTTPForbidden, f"counter {counter_id!r} not created: the limit of {limit} counters is reached")
        except OverflowError:
            abort(web.HTTPConflict, f"counter {counter_id!r} is at its maximum, {MAX_VALUE}")
        except Unavailable as failure:
            retry_later(web.HTTPServiceUnavailable, str(failure), LAST_RETRY_DELAY)
        return changed_value_response(value)
    return increment_counter


def refuse_while_unavailable(store: CounterStore) -> None:
    """A store that can't take changes now (durable saves failing): 503 at once, never a lost ack."""
    if store.refusing:
        retry_later(web.HTTPServiceUnavailable, store.refusing, LAST_RETRY_DELAY)


async def answered(write: Any) -> Any:
    """What a store's write answered, awaited if the store answers later; 503 if it can't take it."""
    try:
        return await write if inspect.isawaitable(write) else write
    except Unavailable as failure:
        retry_later(web.HTTPServiceUnavailable, str(failure), LAST_RETRY_DELAY)


def require_admin(request: web.Request) -> None:
    """PUT and DELETE need Authorization: Bearer <the admin token>; with no token set, nobody may."""
    token = request.app[SETTINGS].admin_token
    if not token:
        abort(web.HTTPForbidden, "admin writes are off: set LIVECOUNTER_ADMIN_TOKEN to allow them")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(raw_bytes(given.strip()), raw_bytes(token)):
        abort(web.HTTPUnauthorized, "a valid Authorization: Bearer token is needed",
              headers={"WWW-Authenticate": 'Bearer realm="livecounter"'})


async def set_counter(request: web.Request) -> web.Response:
    """PUT {"value": N}: set (and create) a counter."""
    counter_id = request.match_info["counter_id"]
    require_admin(request)
    body = await read_body(request)
    try:
        value = json.loads(body)["value"]
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: "[" nested a thousand deep
        abort(web.HTTPBadRequest, 'the body must be JSON like {"value": 27}')
    if type(value) is not int or abs(value) > MAX_VALUE:
        abort(web.HTTPBadRequest, f"value must be an integer within ±{MAX_VALUE}")
    store = request.app[STORE]
    refuse_while_unavailable(store)
    await answered(store.set(counter_id, value))
    return changed_value_response(value)


async def delete_counter(request: web.Request) -> web.Response:
    """DELETE: remove a counter and end its streams."""
    counter_id = request.match_info["counter_id"]
    require_admin(request)
    store = request.app[STORE]
    refuse_while_unavailable(store)
    try:
        await answered(store.delete(counter_id))
    except KeyError:
        unknown_counter(counter_id)
    return web.Response(status=204)

MAX_STREAM_IDS = 100
MAX_PAGE = 1000  # counters in a page of the listing (?limit=)
LISTING_SLICE = 5_000  # counters encoded per write of a listing: a few ms of the loop at a time
LISTING_HEADERS = {"Cache-Control": "no-cache", "Access-Control-Expose-Headers": "X-Total-Count, Link"}


async def list_counters(request: web.Request) -> web.StreamResponse:
    """Every counter as one JSON object, or a page of them (?limit=N&after=ID); with Accept:
    text/event-stream, a stream of the counters in ?ids=."""
    if "Grip-Last" in request.headers:
        return what_pushpin_missed(request)
    if preferred_format(request) == "text/event-stream":
        return await stream_counters(request)
    store = request.app[STORE]
    headers = {**LISTING_HEADERS, "X-Total-Count": str(len(store))}
    if "limit" in request.query or "after" in request.query:
        counter_ids = await page_of(request, store, headers)
    else:  # the ids now, in order (a copy: what is made or deleted meanwhile can't disturb the listing)
        counter_ids = store.ids()
    if request.method == "HEAD":
        return web.Response(content_type="application/json", headers=headers)
    if len(counter_ids) <= LISTING_SLICE:
        return web.json_response(store.values_of(counter_ids), headers=headers)
    return await listing_in_slices(request, counter_ids, headers)


async def page_of(request: web.Request, store: CounterStore, headers: dict[str, str]) -> list[str]:
    """The ids of the page ?limit=N&after=ID asks for: the N after ID in the listing's order (from
    the first without after=). A Link header names the next page, if there is one."""
    limit_text = request.query.get("limit", str(MAX_PAGE))
    if not (re.fullmatch(r"[0-9]{1,4}", limit_text) and 1 <= int(limit_text) <= MAX_PAGE):
        abort(web.HTTPBadRequest, f"limit must be a number from 1 to {MAX_PAGE}")
    limit = int(limit_text)
    if (after := request.query.get("after")) is None:
        page = store.first_ids(limit + 1)  # one more: whether a next page follows
    elif (page := await store.ids_after(after, limit + 1)) is None:
        abort(web.HTTPBadRequest, f"after={after!r} names no counter (deleted since?): list from the start")
    if len(page) > limit:
        page = page[:limit]
        headers["Link"] = f'<?limit={limit}&after={page[-1]}>; rel="next"'
    return page


async def listing_in_slices(request: web.Request, counter_ids: list[str], headers: dict[str, str]) -> web.StreamResponse:
    """A listing too large to encode at once goes out in slices, with the loop free between them:
    encoded in one go, a million counters would stall every other request for most of a second.
    Each slice has the values of its time; a counter deleted before its slice is left out."""
    store = request.app[STORE]
    response = web.StreamResponse(headers={**headers, "Content-Type": "application/json; charset=utf-8",
                                           ALLOW_ORIGIN: request.app[SETTINGS].cors_origin})
    opening = b"{"
    try:
        await response.prepare(request)
        for start in range(0, len(counter_ids), LISTING_SLICE):
            if values := store.values_of(counter_ids[start:start + LISTING_SLICE]):
                await response.write(opening + json.dumps(values)[1:-1].encode())
                opening = b", "
            await asyncio.sleep(0)  # a write that the kernel takes at once doesn't yield
        await response.write(b"{}" if opening == b"{" else b"}")
        await response.write_eof()
    except ConnectionError:
        pass  # the client left: not a failure
    return response


async def stream_counters(request: web.Request) -> web.StreamResponse:
    """One stream for the counters in ?ids=: a counter event for each at the start and per change;
    with watchers=1 also a watchers event for each, at the start and when its count changes."""
    counter_ids = list(dict.fromkeys(request.query.get("ids", "").split(",")))  # once each, in order
    if counter_ids == [""]:
        abort(web.HTTPBadRequest, "name the counters to stream: ?ids=1,2,3")
    if len(counter_ids) > MAX_STREAM_IDS:
        abort(web.HTTPBadRequest, f"too many ids: one stream takes at most {MAX_STREAM_IDS}")
    watchers = request.query.get("watchers", "0")
    if watchers not in ("0", "1"):
        abort(web.HTTPBadRequest, "watchers must be 1 (send the counters' watcher counts too) or 0")
    store = request.app[STORE]
    for counter_id in counter_ids:
        if not COUNTER_ID.fullmatch(counter_id):
            abort(web.HTTPBadRequest, f"invalid counter id {counter_id!r}: {ID_RULE}")
        if not store.readable(counter_id):
            unknown_counter(counter_id)
    keys = [Key((counter_id, False)) for counter_id in counter_ids]
    if watchers == "1":
        keys += [key.count for key in keys]
    return await stream(request, keys, multi=True)


async def health(request: web.Request) -> web.Response:
    """ok, or 503 with what fails: saving the data file, purging a cache, publishing to Pushpin, any
    background work. With ?local, only this process's own duties: a load balancer that checks each
    Pushpin through it must not take every Pushpin out because one of them fails to take publishes."""
    outages = request.app[LOCAL_OUTAGES] if "local" in request.query else request.app[OUTAGES]
    if problems := errors_of(outages):
        return web.Response(status=503, text=problems + "\n")
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of what an operator watches."""
    store, journal, hub = request.app[STORE], request.app[JOURNAL], request.app[HUB]
    samples = [
        ("listeners", "gauge", "Event streams open now.", hub.listener_count),
        ("counters", "gauge", "Counters that exist.", len(store)),
        ("increments_total", "counter", "Increments acknowledged or pending.", store.increments),
        ("broadcasts_total", "counter", "Changes written to a counter's listeners.", hub.broadcasts),
        ("coalesced_updates_total", "counter",
         "Changes folded into a broadcast that was already scheduled.", hub.coalesced),
        ("watched_counters", "gauge", "Counters whose watcher count is kept (watched, or lately).",
         request.app[PRESENCE].tracked),
        ("background_failing", "gauge", "1 while any background work fails (see /healthz), else 0.",
         int(errors_of(request.app[OUTAGES]) is not None)),
    ]
    if journal is not None:
        samples += [
            ("saves_total", "counter", "Saves attempted (appends to the journal).", journal.saves),
            ("save_errors_total", "counter", "Saves that failed.", journal.save_failures),
            ("last_save_duration_seconds", "gauge", "How long the last save took.", journal.last_save_seconds),
            ("last_save_success_timestamp_seconds", "gauge",
             "Unix time the files last held every value: the last successful save, or the start.",
             journal.last_saved_at),
            ("saves_failing", "gauge", "1 while saves fail (see /healthz), else 0.", int(journal.save_error is not None)),
            ("compactions_total", "counter", "Times the journal was folded into the data file.", journal.compactions),
            ("compaction_errors_total", "counter", "Compactions that failed (the journal stays).",
             journal.compaction_failures),
        ]
    if (link := request.app[REDIS]) is not None:
        samples += [
            ("redis_writes_total", "counter", "Changes and messages sent to Redis.", link.writes),
            ("redis_errors_total", "counter", "Commands to Redis that failed.", link.failures),
            ("redis_failing", "gauge", "1 while Redis fails (see /healthz), else 0.", int(link.working.error is not None)),
            ("redis_leader", "gauge", "1 if this process purges and publishes for every process, else 0.",
             int(link.leading)),
        ]
    if (purger := request.app[PURGER]) is not None:
        samples += [
            ("purges_total", "counter", "PURGE requests a cache accepted.", purger.purges),
            ("purge_errors_total", "counter", "PURGE requests that failed.", purger.failures),
            ("purging_failing", "gauge", "1 while purging a cache fails, else 0.", int(errors_of(purger.outages) is not None)),
            ("unpurged_paths", "gauge", "Paths waiting to be purged from the cache furthest behind.", purger.unpurged),
        ]
    if (grip := request.app[GRIP]) is not None:
        samples += [
            ("grip_publishes_total", "counter", "Publish requests Pushpin accepted.", grip.published),
            ("grip_publish_errors_total", "counter", "Publish requests that failed.", grip.failures),
            ("grip_publishing_failing", "gauge", "1 while publishing to a Pushpin fails, else 0.",
             int(errors_of(grip.outages) is not None)),
            ("grip_unpublished_counters", "gauge", "Changed counters waiting to be published to the "
             "Pushpin furthest behind (resting, paced to --grip-message-rate, or failing).", grip.waiting),
            ("grip_channels", "gauge", "Channels the GRIP publisher keeps ids of (changed or held lately).",
             grip.tracked),
        ]
    text = "".join(f"# HELP livecounter_{name} {help}\n# TYPE livecounter_{name} {kind}\n"
                   f"livecounter_{name} {value}\n" for name, kind, help, value in samples)
    return web.Response(text=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight: any request the API takes may come from the allowed origin."""
    headers = {"Access-Control-Allow-Methods": ALLOWED_METHODS, "Access-Control-Max-Age": "86400"}
    requested_headers = request.headers.get("Access-Control-Request-Headers")
    if requested_headers:
        headers["Access-Control-Allow-Headers"] = requested_headers
    return web.Response(status=204, headers=headers)


async def invalid_counter_id(request: web.Request) -> web.StreamResponse:
    """Any request to a counter path whose id the counter routes refused."""
    abort(web.HTTPBadRequest, f"invalid counter id: {ID_RULE}")


async def no_such_path(request: web.Request) -> web.StreamResponse:
    abort(web.HTTPNotFound, "no such path: the counters are at counters/")


async def home(request: web.Request) -> web.Response:
    """The demo page for browsers; a pointer to the API for everyone else."""
    if "text/html" in request.headers.get("Accept", ""):
        return web.Response(text=DEMO_PAGE, content_type="text/html", headers={"Cache-Control": "no-cache"})
    return web.Response(text="livecounter: the counters are at counters/ (GET, POST, or GET with "
                             "Accept: text/event-stream to watch)\n")


async def embed_script(request: web.Request) -> web.Response:
    return web.Response(text=EMBED_SCRIPT, content_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=3600"})


# --------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------

OUTAGES = web.AppKey("outages", list[Outage])  # what /healthz reports
LOCAL_OUTAGES = web.AppKey("local_outages", list[Outage])  # what /healthz?local reports: this process's own


def create_app(data_path: str | os.PathLike[str] = Settings.data_path, **options: object) -> web.Application:
    """The livecounter application, standalone or as a sub-app; options are Settings' fields.

    Raises DataFileError if the data file or its journal can't be used, ValueError for a setting
    that isn't one (the message names it).
    """
    settings = Settings(data_path=data_path, **options)  # type: ignore[arg-type]
    if settings.grip_urls and settings.grip_key is None:
        log.warning("--grip-url without --grip-key: any request with a Grip-Sig header is taken for "
                    "Pushpin's, so a client reaching livecounter directly could have a stream held for it")
    app = web.Application()
    app[SETTINGS] = settings
    loaded = load_counters(settings.data_path, starting=not settings.redis)  # --redis: only its seed
    feed = ChangeFeed()
    if settings.redis:  # the counters live in Redis; the data file only seeds an empty one (see there)
        app[REDIS] = link = RedisLink(settings.redis, durable=settings.durable, auto_create=settings.auto_create,
                                      max_counters=settings.max_counters)
        app[STORE] = store = RedisCounters(link, feed, auto_create=settings.auto_create,
                                           max_counters=settings.max_counters)
        app[SEED] = loaded.counters
        app[JOURNAL] = journal = None
    else:
        app[REDIS] = link = None
        app[STORE] = store = CounterStore(loaded.counters, feed, auto_create=settings.auto_create,
                                          max_counters=settings.max_counters, durable=settings.durable)
        app[JOURNAL] = journal = Journal(settings.data_path, loaded, store, feed,
                                         save_interval=settings.save_interval, durable=settings.durable)
    app[HUB] = hub = ListenerHub(
        keepalive_interval=settings.keepalive_interval, stall_timeout=settings.stall_timeout,
        max_listeners=settings.max_listeners or default_max_listeners(),
        max_listeners_per_ip=settings.max_listeners_per_ip)
    exists = store.__contains__
    app[PRESENCE] = presence = Presence(hub, feed, exists=lambda counter_id: store.announced_value(counter_id) is not None)
    app[PURGER] = purger = CachePurger(settings.purge_urls, exists) if settings.purge_urls else None
    app[GRIP] = grip = (GripPublisher(settings.grip_urls, settings.grip_message_rate, exists=exists, purger=purger,
                                      link_timeout=settings.grip_link_timeout) if settings.grip_urls else None)
    senders = [sender for sender in (purger, grip) if sender is not None]
    # The change feed: the journal keeps a change first (in durable mode the others hear of it once it
    # is on disk), then every receiver hears of it, each registered once, here.
    if journal is not None:
        feed.keep_with(journal, durable=settings.durable)
        if settings.durable:
            feed.register(store.heard)  # what new streams start from: values on disk
    feed.register(hub.changed)
    feed.register(presence.heard, deletions_only=True)
    for sender in senders:
        feed.register(sender.changed)
    if link is not None:  # Redis's messages reach the store, presence and the publisher; a leader sends
        link.on_message = functools.partial(hear_from_redis, link, store, presence, grip)
        link.on_subscribed = functools.partial(resynchronized, link, store, presence)
        link.on_leadership = functools.partial(leadership_changed, store, presence, senders)
        link.on_beat = presence.drop_silent
        presence.shares_with(link)
        for sender in senders:
            sender.leading = False
        if grip is not None:
            grip.share_handed = lambda key, publish_id: link.publish(f"g {key.grip_channel(False)} {publish_id or '-'}")
    app[LOCAL_OUTAGES] = ([journal.saving, journal.compacting] if journal else [link.working, link.fitness]) + [
        hub.sweeping, presence.stats_reading]
    app[OUTAGES] = app[LOCAL_OUTAGES] + (purger.outages if purger else []) + (grip.outages if grip else [])
    if settings.grip_stats:
        import_zmq()  # missing, it is said at the start, not when the first report would come
    app[CACHING] = caching_headers(settings)
    app[POST_RATE] = (RateLimiter(settings.post_rate, burst=max(1.0, 2 * settings.post_rate))
                      if settings.post_rate else None)
    add_routes(app)
    app.cleanup_ctx.append(run_background_work)
    app.on_shutdown.append(end_streams)
    return app


def add_routes(app: web.Application) -> None:
    """Every path with and without its trailing slash; any other method gets a 405, any other path a 404."""
    # The route's pattern is the id rule: aiohttp's own match checks it, no check of ours runs per POST.
    counter_path = f"/counters/{{counter_id:{ID_PATTERN}}}"
    routes: list[tuple[tuple[str, ...], dict[str, Handler]]] = [
        ((counter_path + "/", counter_path),
         {"GET": get_counter, "HEAD": get_counter, "POST": increment_handler(app), "PUT": set_counter,
          "DELETE": delete_counter, "OPTIONS": preflight}),
        ((counter_path + "/watchers/", counter_path + "/watchers"),
         {"GET": get_watchers, "HEAD": get_watchers, "OPTIONS": preflight}),
        ((counter_path + "/badge.svg", counter_path + "/badge.svg/"),
         {"GET": counter_badge, "HEAD": counter_badge, "OPTIONS": preflight}),
        ((counter_path + "/watchers/badge.svg", counter_path + "/watchers/badge.svg/"),
         {"GET": watchers_badge, "HEAD": watchers_badge, "OPTIONS": preflight}),
        # Only ids the counter routes refused get here: 400 whatever the method (a preflight still passes).
        (("/counters/{counter_id}/", "/counters/{counter_id}",
          "/counters/{counter_id}/{resource:watchers/?|badge\\.svg/?|watchers/badge\\.svg/?}"),
         {"OPTIONS": preflight, "*": invalid_counter_id}),
        (("/counters/", "/counters"), {"GET": list_counters, "HEAD": list_counters, "OPTIONS": preflight}),
        (("/healthz", "/healthz/"), {"GET": health, "HEAD": health, "OPTIONS": preflight}),
        (("/metrics", "/metrics/"), {"GET": metrics, "HEAD": metrics, "OPTIONS": preflight}),
        (("/",), {"GET": home, "HEAD": home, "OPTIONS": preflight}),
        (("/embed.js", "/embed.js/"), {"GET": embed_script, "HEAD": embed_script, "OPTIONS": preflight}),
    ]
    origin = app[SETTINGS].cors_origin
    for paths, handlers in routes:
        methods = [method for method in handlers if method != "*"]
        # Any other method: the table's "*", else a 405 from here, with the origin like every answer.
        answers = {method: handlers[method] for method in methods} | {
            "*": handlers.get("*") or refusing_other_methods(methods)}  # "*" last, as aiohttp wants
        for path in paths:
            resource = app.router.add_resource(path)
            for method, handler in answers.items():
                resource.add_route(method, allowing_origin(origin, handler))
    # Any other path, whatever the method: 404 (a preflight too: nothing there would take the request).
    app.router.add_route("*", "/{path:.*}", allowing_origin(origin, no_such_path))


async def run_background_work(app: web.Application):
    """Saves, sweeps, purging and publishing while the app runs, each a loop nothing ends but the
    stop; once every stream and request has ended, the final save, then the last purges and
    publishes (in durable mode the final save releases what it holds)."""
    journal, hub, presence, link = app[JOURNAL], app[HUB], app[PRESENCE], app[REDIS]
    tasks = [asyncio.create_task(forever(hub.sweeping, hub.sweep_now_and_then))]
    if journal is not None:
        tasks.append(asyncio.create_task(forever(journal.saving, journal.run_saves)))
    if link is not None:
        await start_on_redis(link, app[SEED])
        tasks.append(asyncio.create_task(link.run()))
        await wait_for_subscription(link, tasks[-1])
    if app[SETTINGS].grip_stats:
        tasks.append(asyncio.create_task(forever(presence.stats_reading, functools.partial(
            read_pushpin_stats, app[SETTINGS].grip_stats, presence))))
    outbound = [(sender, asyncio.create_task(sender.run())) for sender in (app[PURGER], app[GRIP]) if sender]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if journal is not None:
        await journal.close()
    if link is not None:
        await link.close()
    await asyncio.gather(*(sender.flushed(STOP_PUBLISH_TIMEOUT) for sender, _ in outbound))
    for _, task in outbound:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


REDIS_START = 10.0  # seconds a start waits for its first subscription to Redis, the counters loaded
REDIS_SEED_TIME = 120.0  # seconds a start waits for the data file's counters to go into an empty Redis


async def start_on_redis(link: RedisLink, seed: dict[str, int]) -> None:
    """Redis answers, is fit for --durable if asked, and has counters (the data file's, the first
    time): else ValueError, and the start fails with it."""
    await link.check()
    try:
        if await asyncio.wait_for(link.seed(seed), REDIS_SEED_TIME):
            log.info("Redis had no counters: the data file's %d are in it now", len(seed))
    except Exception as error:  # noqa: BLE001 - the start says why, in one line
        raise ValueError(f"--redis {shown_url(link.url)}: seeding its counters failed: {failure_reason(error)}") from None


async def wait_for_subscription(link: RedisLink, running: asyncio.Task[None]) -> None:
    """Serve once the replica is loaded and every change is heard: the first subscription."""
    done, _ = await asyncio.wait([asyncio.ensure_future(link.subscribed.wait()), running], timeout=REDIS_START,
                                 return_when=asyncio.FIRST_COMPLETED)
    if not link.subscribed.is_set():
        running.cancel()
        raise ValueError(f"--redis {shown_url(link.url)}: {link.working.error or 'no subscription'}")


async def end_streams(app: web.Application) -> None:
    # Streams are the hub's connections, not aiohttp's: they end (last chunk, close) as soon as
    # shutdown begins, and no stream is taken after that, whatever aiohttp still waits for.
    app[HUB].close()

# --------------------------------------------------------------------------------------------------
# Pages: the demo page and the embeddable script
# --------------------------------------------------------------------------------------------------
#
# Inline, with no build step, CDN or external script, so they work offline and from a sub-app's
# prefix (every URL in them is relative to where they are served).
#
# Each is a string.Template rendered once, at import (below the three): what comes from the Python
# side is a named placeholder ($live_source, $stream_ids, ...), and "$$" is a literal "$" of the
# JavaScript. A "$" left unescaped, or a placeholder without a value, fails the import.

# The one reconnection both pages share (inlined into each). An EventSource retries by itself only
# after a network error or the end of a stream; any answer but 200 (a proxy's 502 while livecounter
# restarts, a 503) closes it for good. Then this opens a new one, after 1 s doubling to 30 s, each
# wait ±25% so that the pages one restart cut off don't all come back in the same second.
#
# A page's counters are split into streams by count and by URL length: STREAM_QUERY_MAX characters
# after the base (`?ids=a,b,…`) keep a stream's request line far below what proxies take (Pushpin
# refused ~4 KB; nginx takes 8 KB, aiohttp 8,190 bytes): 30 ids of 64 characters, 100 short ones.
STREAM_QUERY_MAX = 2000

LIVE_SOURCE_TEMPLATE = string.Template("""\
/* An EventSource on url that is reopened whenever it closes for good. listen(source) adds the
   handlers to each one; state(name, seconds) hears "live", "reconnecting" (the browser retries)
   and "offline" (closed for good: a new one in `seconds`). Returns a function that ends it. */
function liveSource(url, listen, state) {
  var delay = 1, source, timer;
  (function open() {
    source = new EventSource(url);
    listen(source);
    source.onopen = function () { delay = 1; state("live"); };
    source.onerror = function () {
      if (source.readyState !== EventSource.CLOSED) { state("reconnecting"); return; }
      var wait = delay * (0.75 + Math.random() / 2);
      delay = Math.min(2 * delay, 30);
      state("offline", Math.round(wait));
      timer = setTimeout(open, wait * 1000);
    };
  })();
  return function end() { clearTimeout(timer); source.close(); };
}

/* The ids split into the streams that carry them, each {ids, watchers}: at most STREAM_IDS ids a
   stream (the server's limit), and at most STREAM_QUERY characters of URL after the base
   ("?ids=a,b,...&watchers=1"), since proxies refuse long URLs (through Pushpin, ~4 KB fails).
   watches(id) says whether the id's watcher count is wanted too: its stream then asks for every
   id's (the parameter is per stream), which is a few characters more. An id is at most 64
   characters: one always fits. */
var STREAM_IDS = $stream_ids, STREAM_QUERY = $stream_query;
var WATCHERS = "&watchers=1";
function streamsOf(ids, watches) {
  var streams = [], some = null;
  ids.forEach(function (id) {
    var more = encodeURIComponent(id).length + 1;  // the id and the "=" or "," before it
    var watched = !!watches(id);
    if (!some || some.ids.length === STREAM_IDS
        || some.length + more + (watched && !some.watchers ? WATCHERS.length : 0) > STREAM_QUERY) {
      streams.push(some = {ids: [], watchers: false, length: "?ids".length});
    }
    some.ids.push(id);
    some.length += more;
    if (watched && !some.watchers) {
      some.watchers = true;
      some.length += WATCHERS.length;
    }
  });
  return streams;
}

function queryOf(stream) {
  return "?ids=" + stream.ids.map(encodeURIComponent).join(",") + (stream.watchers ? WATCHERS : "");
}
""")

DEMO_PAGE_TEMPLATE = string.Template("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>livecounter</title>
<link rel="icon" href="data:,">
<style>
  :root { --ink: #1d2433; --muted: #667085; --line: #e4e7ec; --accent: #2f6fed; --flash: #fff3c4; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         color: var(--ink); background: #f7f8fa; }
  main { max-width: 960px; margin: 0 auto; padding: 40px 20px; }
  h1 { margin: 0; font-size: 28px; letter-spacing: -0.02em; }
  .lead { margin: 4px 0 28px; color: var(--muted); }
  .status { display: inline-block; margin-left: 8px; padding: 1px 8px; border-radius: 999px;
            font-size: 13px; background: var(--line); color: var(--muted); vertical-align: middle; }
  .status.live { background: #dcfae6; color: #067647; }
  .status.offline { background: #fee4e2; color: #b42318; }
  /* Five cards a row on a laptop, two on a phone. The cards of a row are as tall as the tallest, and
     each has its "+1" at the bottom: the buttons of a row line up whatever the cards show. */
  #counters { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 16px; }
  .counter { background: #fff; border: 1px solid var(--line); border-radius: 12px; padding: 16px;
             display: flex; flex-direction: column; gap: 6px; transition: background-color 0.6s;
             container-type: inline-size; }
  .counter.changed { background: var(--flash); transition: none; }
  .id { color: var(--muted); font-size: 13px; overflow-wrap: anywhere; }
  .reading { display: flex; flex-direction: column; }
  /* A value takes at most its card's width: its font shrinks from 34 px by its --characters (set with
     the text), at 0.7 em a character (a bold digit of DejaVu Sans, Chromium's on Debian, is 0.68 em
     here; most fonts' are narrower). Past the 14 px floor (14 characters in a narrow card) it wraps.
     Its line keeps the height of 34 px text, the text at its foot, so that "N watching" (a line of
     its own) sits level across a row. */
  .value { display: flex; align-items: flex-end; min-height: calc(1.25 * 34px); line-height: 1.25;
           font-size: clamp(14px, 100cqi / (0.7 * var(--characters, 1)), 34px); overflow-wrap: anywhere;
           font-weight: 650; font-variant-numeric: tabular-nums; letter-spacing: -0.02em; }
  .watching { min-height: 1.5em; color: var(--muted); font-size: 13px; white-space: nowrap; }
  button { align-self: flex-start; margin-top: auto; border: 1px solid var(--accent); color: var(--accent);
           background: #fff; border-radius: 8px; padding: 4px 14px; font: inherit; font-weight: 600;
           cursor: pointer; }
  button:hover { background: var(--accent); color: #fff; }
  footer { margin-top: 32px; color: var(--muted); font-size: 14px; }
  code { background: var(--line); padding: 1px 5px; border-radius: 4px; font-size: 13px; }
  #empty { color: var(--muted); }
  #empty p { margin: 0 0 6px; }
  #empty pre { margin: 0 0 16px; padding: 10px 12px; background: var(--line); border-radius: 8px;
               color: var(--ink); font-size: 13px; white-space: pre-wrap; overflow-wrap: anywhere; }
</style>
</head>
<body>
<main>
  <h1>livecounter <span id="status" class="status">connecting</span></h1>
  <p class="lead"><span id="summary">Listing the counters…</span> <span id="counted"></span></p>
  <div id="counters"></div>
  <div id="empty" hidden>
    <p>Make one with a <code>POST</code> to its URL, if livecounter runs with <code>--auto-create</code>:</p>
    <pre>curl -X POST <span class="url"></span></pre>
    <p>or with a <code>PUT</code> of its value, if livecounter has an admin token
      (<code>LIVECOUNTER_ADMIN_TOKEN</code>):</p>
    <pre>curl -X PUT -H "Authorization: Bearer $$LIVECOUNTER_ADMIN_TOKEN" -d '{"value": 0}' <span class="url"></span></pre>
    <p>In place of ID: $id_rule.</p>
  </div>
  <footer><code>POST counters/{id}/</code> increments; <code>GET counters/{id}/</code> with
    <code>Accept: text/event-stream</code> watches. Add a live number to any page with
    <code>embed.js</code>. This page lists the counters again every 30 s.</footer>
</main>
<script>
"use strict";
$live_source
const SHOWN = 100;  // cards, over as many streams as their ids need (streamsOf)
const RELIST = 30;  // seconds: how soon counters created (or deleted) elsewhere show here
const grid = document.getElementById("counters");
const status = document.getElementById("status");
const summary = document.getElementById("summary");
const empty = document.getElementById("empty");  // how to make a counter, shown while there is none
empty.querySelectorAll(".url").forEach((url) => {  // as this page reaches it: any host, any prefix
  url.textContent = new URL("counters/ID/", document.baseURI).href;
});
const cards = new Map();  // id -> {element, number, watching}; Maps: an id like "constructor" is just an id
const grouped = new Intl.NumberFormat("en-US");  // 1,234,567 as badges show it, whatever the reader's locale
let watched = null, ends = [];  // the ids of the cards' streams (joined), and what ends each
let counted = false;

function card(id, value) {
  const element = document.createElement("div");
  element.className = "counter";
  element.dataset.id = id;
  const label = document.createElement("div");
  label.className = "id";
  label.textContent = "counter " + id;
  const number = document.createElement("span");
  number.className = "value";
  showNumber(number, value);
  const watching = document.createElement("span");  // filled by the stream's first watchers event
  watching.className = "watching";
  const reading = document.createElement("div");
  reading.className = "reading";
  reading.append(number, watching);
  const button = document.createElement("button");
  button.textContent = "+1";
  button.addEventListener("click", () => fetch("counters/" + encodeURIComponent(id) + "/", {method: "POST"}));
  element.append(label, reading, button);
  grid.append(element);
  cards.set(id, {element, number, watching});
}

function showNumber(number, value) {  // its font shrinks with its --characters (the page's CSS)
  number.textContent = grouped.format(value);
  number.style.setProperty("--characters", number.textContent.length);
}

function show(id, value) {
  const shown = cards.get(id);
  if (!shown || shown.number.textContent === grouped.format(value)) return;
  showNumber(shown.number, value);
  shown.element.classList.remove("changed");
  void shown.element.offsetWidth;  // restart the highlight
  shown.element.classList.add("changed");
  setTimeout(() => shown.element.classList.remove("changed"), 50);
}

function showWatchers(id, watchers) {  // no highlight: arrivals and departures aren't the counter's news
  const shown = cards.get(id);
  if (shown) shown.watching.textContent = grouped.format(watchers) + " watching";
}

function count() {  // the page-view snippet, on counter 1 if it exists: after its first value, once
  counted = true;
  fetch("counters/1/", {method: "POST"}).then((response) => {
    if (response.ok) document.getElementById("counted").textContent = "This page counted its own view on counter 1.";
  }, () => {});
}

function watch(ids) {  // the streams of the cards shown (as few as URLs allow), replacing the last ones
  ends.forEach((end) => end());
  watched = ids.join(",");
  const streams = streamsOf(ids, () => true);  // every card shows its watchers: each stream asks for them
  const states = streams.map(() => ({state: "connecting"}));
  ends = streams.map((some, index) => liveSource("counters/" + queryOf(some), (source) => {
    source.addEventListener("counter", (event) => {
      const {id, value} = JSON.parse(event.data);
      show(id, value);  // a new stream starts with every value: the cards keep theirs until then
      if (id === "1" && !counted) count();
    });
    source.addEventListener("watchers", (event) => {  // this page's stream is one of them
      const {id, watchers} = JSON.parse(event.data);
      showWatchers(id, watchers);
    });
  }, (state, seconds) => {
    states[index] = {state, seconds};
    say(states.find((stream) => stream.state !== "live") || states[0]);  // live once every stream is
  }));
  say(ids.length ? states[0] : {state: "idle"});
}

function say({state, seconds}) {
  status.textContent = state === "offline" ? "offline, retrying in " + seconds + " s"
    : state === "reconnecting" ? "reconnecting…" : state;
  status.className = "status " + state;
}

function describe(total) {
  if (!total) return "No counters yet.";
  const counters = total === 1 ? "1 counter" : total + " counters";
  return cards.size < total ? `$${counters}, $${cards.size} of them shown (a stream takes at most $${SHOWN}).`
    : `$${counters}.`;
}

function relist() {  // the cards that still exist stay; new counters fill the places up to SHOWN
  let total = 0;
  // The first SHOWN in the listing's order, and how many there are: not a listing of every counter.
  fetch("counters/?limit=" + SHOWN, {headers: {Accept: "application/json"}})
    .then((response) => {
      if (!response.ok) throw new Error(response.status);
      total = Number(response.headers.get("X-Total-Count"));
      return response.json();
    })
    .then((counters) => {
      const listed = new Map(Object.entries(counters));
      cards.forEach((shown, id) => {
        if (!listed.has(id)) {
          shown.element.remove();
          cards.delete(id);
        }
      });
      listed.forEach((value, id) => { if (cards.size < SHOWN && !cards.has(id)) card(id, value); });
      summary.textContent = describe(total);
      empty.hidden = total > 0;
      const ids = [...cards.keys()];
      if (ids.join(",") !== watched) watch(ids);
    })
    .catch(() => {})  // unreachable for now: the cards stay, and the next listing tries again
    .finally(() => setTimeout(relist, RELIST * 1000));
}

relist();
</script>
</body>
</html>
""")

EMBED_SCRIPT_TEMPLATE = string.Template("""\
/* livecounter embed: <span data-livecounter="2"></span> becomes counter 2's live value;
   data-livecounter-count on it also counts this page view once (in each tab).
   <span data-livecounter-watchers="2"></span> becomes how many streams watch counter 2 now, this
   page's own among them. One stream per 100 counters (fewer if their ids are long: streamsOf),
   shared by the tabs of the origin that show the same counters.
   Its elements say data-livecounter-state="connecting", then "live"; while a stream is down they
   keep their value and say "reconnecting" or "offline", for the page's CSS. A classic or a module
   script; included twice, the second copy finds every element taken (it has a state) and leaves it. */
(function () {
  "use strict";
$live_source
  // Where it is served from: a module script has no currentScript, so then the <script> of .../embed.js
  var script = document.currentScript || [].filter.call(document.querySelectorAll("script[src]"), function (s) {
    return /\\/embed\\.js([?#]|$$)/.test(s.src);
  })[0];
  if (!script) throw new Error('livecounter: include it as <script src=".../embed.js">');
  var base = new URL("counters/", script.src).href;
  var VALID = $valid_id;  // the server's rule, ID_PATTERN: not only dots
  // Tabs of this origin that show the same counters share their streams: over HTTP/1.1 a browser
  // opens at most six connections to a host and each stream holds one, so a seventh tab would wait
  // for ever. Each stream has a Web Lock and a BroadcastChannel named after its URL: the tab holding
  // the lock opens the stream and relays every value and state over the channel; when that tab
  // closes, another gets the lock and opens the stream again. Without either API (Web Locks needs a
  // secure context: HTTPS or localhost) each tab opens its own streams, as it would alone.
  var SHARED = typeof BroadcastChannel === "function" && !!navigator.locks;

  // An element shows a counter's value (data-livecounter, which wins if it has both) or its watcher
  // count (data-livecounter-watchers); a valid id in that attribute, or it is skipped.
  function kindOf(element) {
    return element.hasAttribute("data-livecounter") ? "value" : "watchers";
  }

  function idOf(element) {
    return element.getAttribute(kindOf(element) === "value" ? "data-livecounter" : "data-livecounter-watchers");
  }

  function start() {
    var elements = [].filter.call(
      document.querySelectorAll("[data-livecounter]:not([data-livecounter-state]), "
                                + "[data-livecounter-watchers]:not([data-livecounter-state])"),
      function (element) { return VALID.test(idOf(element)); });
    // No prototypes: "constructor" is an id like any other. elementsOf[id] has the id's elements of
    // each kind: an id may have only watcher elements, and its stream still carries its values.
    var ids = [], elementsOf = Object.create(null), uncounted = Object.create(null);
    elements.forEach(function (element) {
      var id = idOf(element), kind = kindOf(element);
      element.setAttribute("data-livecounter-state", "connecting");  // taken
      if (!elementsOf[id]) {
        elementsOf[id] = {value: [], watchers: []};
        ids.push(id);
      }
      elementsOf[id][kind].push(element);
      // A view counts after the value, and only where a value is shown: a watcher count isn't a view
      if (kind === "value" && element.hasAttribute("data-livecounter-count")) uncounted[id] = true;
    });
    ids.sort();  // the same counters in any order make the same streams, which tabs can share
    streamsOf(ids, function (id) { return elementsOf[id].watchers.length; }).forEach(function (some) {
      var stream = {url: base + queryOf(some), ids: some.ids, values: Object.create(null),
                    watchers: Object.create(null), state: "connecting"};
      if (SHARED) share(stream);
      else open(stream);
    });

    // What a stream says, from this tab's EventSource or relayed by the tab that holds it:
    // {id, value} for a counter, {id, watchers} for its watcher count, {state} for the stream.
    function hear(stream, message) {
      if ("state" in message) {
        stream.state = message.state;
        stream.ids.forEach(function (id) {
          elementsOf[id].value.concat(elementsOf[id].watchers).forEach(function (element) {
            element.setAttribute("data-livecounter-state", message.state);
          });
        });
      } else if ("watchers" in message) {
        stream.watchers[message.id] = message.watchers;  // for the tabs that join later, as values are
        elementsOf[message.id].watchers.forEach(function (element) { element.textContent = message.watchers; });
      } else {
        stream.values[message.id] = message.value;  // for the tabs that join later, should this one hold it
        show(message.id, message.value);
      }
    }

    function show(id, value) {
      elementsOf[id].value.forEach(function (element) { element.textContent = value; });
      if (uncounted[id]) {  // after the first value, as the snippet does:
        delete uncounted[id];  // once, however often the stream reopens or passes to another tab
        fetch(base + encodeURIComponent(id) + "/", {method: "POST"});
      }
    }

    function open(stream, relay) {  // this tab's EventSource; relay(message) passes on what it says
      function heard(message) {
        hear(stream, message);
        if (relay) relay(message);
      }
      liveSource(stream.url, function (source) {
        source.addEventListener("counter", function (event) {
          var counter = JSON.parse(event.data);
          heard({id: counter.id, value: counter.value});
        });
        source.addEventListener("watchers", function (event) {  // only on a stream that asked for them
          var counter = JSON.parse(event.data);
          heard({id: counter.id, watchers: counter.watchers});
        });
      }, function (state) { heard({state: state}); });
    }

    function share(stream) {
      var name = "livecounter " + stream.url, holding = false;
      var channel = new BroadcastChannel(name);
      function relay(message) { channel.postMessage(message); }
      channel.onmessage = function (event) {
        if (!event.data.hello) hear(stream, event.data);
        else if (holding) replay(stream, relay);
      };
      relay({hello: true});  // a tab that joins asks: the holder, if any, sends what it has at once
      navigator.locks.request(name, function () {
        holding = true;
        if (stream.state !== "connecting") {  // the tab that held it closed, and its stream with it
          hear(stream, {state: "reconnecting"});
          relay({state: "reconnecting"});
        }
        open(stream, relay);
        return new Promise(function () {});  // held as long as this tab lives
      }).catch(function () {  // refused (an opaque origin, a sandboxed frame): a stream of its own
        if (!holding) open(stream);
      });
    }

    function replay(stream, relay) {  // the values and watcher counts this tab has, then the stream's state
      Object.keys(stream.values).forEach(function (id) { relay({id: id, value: stream.values[id]}); });
      Object.keys(stream.watchers).forEach(function (id) { relay({id: id, watchers: stream.watchers[id]}); });
      relay({state: stream.state});
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
""")


def javascript_regex(pattern: str) -> str:
    """A JavaScript RegExp (an expression) that takes a whole string as re.fullmatch(pattern) does, for
    a pattern in the syntax both share (ID_PATTERN's: test_livecounter.py runs it in node). Made from
    a string literal, JSON's escapes being JavaScript's: a regex literal would end at the "/"."""
    return f"new RegExp({json.dumps(f'^(?:{pattern})$')})"


# Rendered once, at import. embed.js checks ids by the route's own pattern: the two can't disagree.
LIVE_SOURCE = LIVE_SOURCE_TEMPLATE.substitute(stream_ids=MAX_STREAM_IDS, stream_query=STREAM_QUERY_MAX)
DEMO_PAGE = DEMO_PAGE_TEMPLATE.substitute(live_source=LIVE_SOURCE, id_rule=html.escape(ID_RULE))
EMBED_SCRIPT = EMBED_SCRIPT_TEMPLATE.substitute(live_source=LIVE_SOURCE, valid_id=javascript_regex(ID_PATTERN))


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Serving:
    """Options of the command line alone: where to listen, and the access log."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every IPv4 address), unless systemd "
                       "passes the sockets", parse=any_text, metavar="ADDRESS")
    port: int = option(8080, "port to listen on (0: any free one, printed at the start), unless systemd "
                       "passes the sockets", parse=port_number, metavar="PORT")
    no_access_log: bool = option(False, "don't log every request (the access log is in the combined format)",
                                 parse=switch, shown="logged")
    workers: int = option(1, "processes serving the port together, one per core (needs --redis, where the "
                          "counters they share live)", parse=positive_int, metavar="N")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, checked_setting(field, getattr(self, field.name)))


SETTING_NAMES = {field.name for field in dataclasses.fields(Settings)}
OPTIONS = (*dataclasses.fields(Serving), *(field for field in dataclasses.fields(Settings) if field.metadata["help"]))


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def variable_of(field: dataclasses.Field) -> str:
    return "LIVECOUNTER_" + flag_of(field)[2:].replace("-", "_").upper()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, each option defaulting to its LIVECOUNTER_* variable, then to its field's
    default. A variable's value that its option wouldn't take stops the start, naming the variable."""
    parser = OneLineErrors(
        prog="livecounter",
        description="Counters with live updates over Server-Sent Events. Every option can also be "
                    "set with the LIVECOUNTER_* variable named beside it (the option wins); on/off "
                    f"variables take {', '.join(SWITCH_ON)} for on, {', '.join(SWITCH_OFF[:-1])} for off. "
                    "LIVECOUNTER_ADMIN_TOKEN (no option: it would show in ps) allows PUT and DELETE.")
    parser.add_argument("--version", action="version", version=f"livecounter {__version__}")
    from_environment = {}
    for field in OPTIONS:
        if (text := os.environ.get(variable_of(field))) is not None:
            try:
                from_environment[field.name] = checked_setting(
                    field, text.split() if isinstance(field.default, tuple) else text)
            except ValueError as error:
                parser.error(f"{variable_of(field)}: {str(error).partition(': ')[2]}")
        add_option(parser, field)
    args = parser.parse_args(argv)
    for field in OPTIONS:  # what the command line left unset comes from the variable, or the default
        if getattr(args, field.name) is None:
            setattr(args, field.name, from_environment.get(field.name, field.default))
        elif isinstance(field.default, tuple):
            setattr(args, field.name, tuple(getattr(args, field.name)))
    return args


class OneLineErrors(argparse.ArgumentParser):
    """A command line whose errors are one line, naming the option or variable: what a service's log
    shows (the usage is --help's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def add_option(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """An option whose default (None here) parse_args fills in from the variable or the field."""
    variable = variable_of(field)
    shown = field.metadata["shown"]
    if isinstance(field.default, bool):
        kind: dict[str, Any] = {"action": "store_const", "const": True}
        shown = shown or "off"
    else:
        kind = {"type": checked(field.metadata["parse"]), "metavar": field.metadata["metavar"]}
        if isinstance(field.default, tuple):
            kind["action"] = "append"
    parser.add_argument(flag_of(field), dest=field.name, default=None, **kind,
                        help=f"{field.metadata['help']} (default: {shown or field.default}; variable {variable})")


def checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    """parse, its ValueError shown by argparse as the option's error."""
    def parse_option(text: str) -> object:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse_option.__name__ = parse.__name__.replace("_", " ")
    return parse_option


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def warn_of_unsafe_settings(args: argparse.Namespace, sockets: Sequence[socket.socket]) -> None:
    """Say at the start what a combination of settings lets clients do."""
    hosts = [sock.getsockname()[0] for sock in sockets if sock.family != socket.AF_UNIX] if sockets else [args.host]
    if args.trust_proxy and not all(host in LOOPBACK_HOSTS or _is_loopback(host) for host in hosts):
        log.warning("--trust-proxy while listening on %s: anyone who reaches livecounter directly can name "
                    "any address in X-Forwarded-For and pass --post-rate and --max-listeners-per-ip; listen "
                    "on 127.0.0.1 behind the proxy", ", ".join(hosts))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_open_file_limit() -> None:
    """Every listener is an open socket: take the hard limit, not the 1,024 many systems start with."""
    soft_limit, hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit != hard_limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard_limit, hard_limit))


FIRST_PASSED_DESCRIPTOR = 3  # SD_LISTEN_FDS_START: systemd passes its sockets from descriptor 3 on


def passed_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process (socket activation, as sd_listen_fds(3)
    reads them), or none. Its variables are removed whoever they were for, as sd_listen_fds(1) does,
    so that no child takes them for its own. ValueError if a descriptor is no listening stream socket."""
    pid, count = (os.environ.pop(name, "") for name in ("LISTEN_PID", "LISTEN_FDS"))
    os.environ.pop("LISTEN_FDNAMES", None)  # names for the sockets: livecounter serves them all alike
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []  # none passed, or passed to a parent that didn't take them (the pid is its own)
    sockets = []
    for descriptor in range(FIRST_PASSED_DESCRIPTOR, FIRST_PASSED_DESCRIPTOR + int(count)):
        try:
            sock = socket.socket(fileno=descriptor)  # family and type come from the descriptor
        except OSError as error:
            raise ValueError(f"descriptor {descriptor} from systemd: {error.strerror or error}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"descriptor {descriptor} from systemd is not a listening stream socket "
                             "(the socket unit needs ListenStream= and Accept=no)")
        sock.setblocking(False)  # the event loop accepts on it
        sock.set_inheritable(False)  # close-on-exec, as sd_listen_fds(3) sets it
        sockets.append(sock)
    return sockets


STOP_ASKED_EARLY: list[int] = []  # SIGTERM or SIGINT that came before serve() took them over


def main(argv: list[str] | None = None) -> int:
    for signal_number in (signal.SIGINT, signal.SIGTERM):  # a stop asked while starting still saves
        signal.signal(signal_number, lambda number, frame: STOP_ASKED_EARLY.append(number))
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_file_limit()
    # A crowd of streams opening at once (a restart's reconnect storm) keeps thousands of requests in
    # flight: the collector's young generations promoted them, so full collections of the whole heap
    # (~100 ms each on 2 shared cores) came every ~2,000 streams: a third of the storm's CPU. A young
    # generation ten times the default makes them rare (bench/README.md, row 8); garbage cycles just
    # wait a little longer.
    gc.set_threshold(7000, 10, 10)
    try:
        sockets = passed_sockets()
    except ValueError as error:
        print(f"livecounter: {error}", file=sys.stderr)
        return 2
    if args.workers > 1:
        if not args.redis:
            print("livecounter: --workers needs --redis: the processes keep their counters there, together",
                  file=sys.stderr)
            return 2
        return supervise(args, sys.argv[1:] if argv is None else argv, sockets)
    warn_of_unsafe_settings(args, sockets)
    try:
        app = create_app(**{field.name: getattr(args, field.name) for field in OPTIONS if field.name in SETTING_NAMES},
                         admin_token=os.environ.get("LIVECOUNTER_ADMIN_TOKEN") or None)
    except (DataFileError, ValueError) as error:
        print(f"livecounter: {error}", file=sys.stderr)
        return 2
    access_log = None if args.no_access_log else logging.getLogger("aiohttp.access")
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(serve(app, args.host, args.port, access_log, sockets))
    finally:
        if left_running := asyncio.all_tasks(loop):  # whatever a handler left behind
            for task in left_running:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left_running, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# --workers N: a supervisor process holds the listening sockets (its own, or systemd's) and starts N
# workers, each a whole livecounter on the counters they share in Redis, given the sockets as systemd
# gives them (descriptor 3 on, LISTEN_PID, LISTEN_FDS). One socket for all: a connection waiting in
# it goes to whichever worker accepts first, and none is lost when a worker dies. A worker that
# dies is started again; SIGTERM or SIGINT stops them all (each stops as one process does).

# After a restart every browser's EventSource reconnects at once: with aiohttp's 128 connections
# queued in the listening socket, the rest wait a SYN retransmit (1 s, then 3 s, ...) each. The
# kernel caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 4096

WORKER = "LIVECOUNTER_WORKER"  # set in a worker's environment: it says nothing at the start
WORKER_RESTART_DELAY = 1.0  # seconds before a worker that died is started again


def supervise(args: argparse.Namespace, argv: list[str], sockets: list[socket.socket]) -> int:
    if not sockets:
        try:
            sockets = [socket.create_server((args.host, args.port), backlog=LISTEN_BACKLOG,
                                            family=socket.AF_INET6 if ":" in args.host else socket.AF_INET)]
        except OSError as error:
            print(f"livecounter: cannot listen on {args.host}:{args.port}: {error.strerror or error}", file=sys.stderr)
            return 1
    command = [sys.executable, os.path.abspath(__file__), *argv, "--workers", "1"]
    workers = {start_worker(command, sockets): number for number in range(args.workers)}
    first = set(workers)  # a worker of these that ends with status 2 could not start: nor can the others
    stopping = False

    def stop(signal_number: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            log.warning("%s: already stopping (the workers save and exit); ignored", signal.Signals(signal_number).name)
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, stop)
    print(f"livecounter serving {' '.join(map(socket_url, sockets))} with {args.workers} workers "
          "(Ctrl+C to stop)", flush=True)
    worst = 0
    while workers:
        pid, status = os.wait()
        if pid not in workers:
            continue
        number = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:  # one still starting when the stop came dies of its SIGTERM: it had nothing to do
            worst = max(worst, 0 if code == -signal.SIGTERM else code if code >= 0 else 1)
            continue
        if pid in first and code == 2:  # its start was refused (it said why): a setting, or Redis
            log.error("worker %d could not start (above); stopping", number)
            worst = 2
            stop(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) ended with %s; starting another in %g s", number, pid,
                  f"status {code}" if code >= 0 else signal.Signals(-code).name, WORKER_RESTART_DELAY)
        time.sleep(WORKER_RESTART_DELAY)
        if not stopping:
            workers[start_worker(command, sockets)] = number
    return worst


def start_worker(command: list[str], sockets: list[socket.socket]) -> int:
    """A worker process given the listening sockets as systemd passes them; its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: the sockets at descriptor 3 on, then livecounter anew
        moved = [os.dup(sock.fileno()) for sock in sockets]  # out of the way of descriptors 3 on
        for number, descriptor in enumerate(moved):
            os.dup2(descriptor, FIRST_PASSED_DESCRIPTOR + number, inheritable=True)
        die_with_parent()
        os.execve(command[0], command, {**os.environ, WORKER: "1", "LISTEN_PID": str(os.getpid()),
                                        "LISTEN_FDS": str(len(sockets))})
    finally:
        os._exit(127)  # the exec failed


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent (the supervisor) dies, even by kill -9."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def serve(app: web.Application, host: str, port: int, access_log: logging.Logger | None,
                sockets: Sequence[socket.socket] = ()) -> int:
    """Serve on host and port, or on the sockets systemd passed, until SIGINT or SIGTERM, then stop
    cleanly: end the streams, let the requests in progress finish (5 s at most), save. A second
    signal doesn't cut that short (aiohttp's run_app would cancel the stop, final save included): it
    is logged and ignored."""
    runner = web.AppRunner(app, access_log=access_log, access_log_class=AccessLogger, shutdown_timeout=5)
    try:
        await runner.setup()  # with --redis: Redis answers, and its counters are loaded
    except (ValueError, DataFileError) as error:
        print(f"livecounter: {error}", file=sys.stderr)
        await runner.cleanup()
        return 2
    if sockets:
        # Socket activation: systemd keeps listening while no livecounter runs, so a restart refuses
        # no connection: they wait for the next process. (aiohttp listens on it again, with its
        # own backlog unless told: 128, in place of the socket unit's.)
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        urls = [socket_url(sock) for sock in sockets]
    else:
        try:
            site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
            await site.start()
        except OSError as error:  # the port is taken, or the address is not this machine's
            print(f"livecounter: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
            await runner.cleanup()
            return 1
        urls = [serving_url(*address[:2]) for address in runner.addresses]  # with the port --port 0 got
    stopping = asyncio.Event()

    def on_signal(signal_number: int) -> None:
        if stopping.is_set():
            log.warning("%s: already stopping (saving, then exiting); ignored", signal.Signals(signal_number).name)
        stopping.set()

    for signal_number in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signal_number, on_signal, signal_number)
    if STOP_ASKED_EARLY:  # a signal while it started (a supervisor's stop): stop as soon as it serves
        stopping.set()
    if WORKER not in os.environ:  # a worker's supervisor says where they serve
        print(f"livecounter serving {' '.join(urls)} (Ctrl+C to stop)", flush=True)
    await stopping.wait()
    await stop_accepting(runner)
    await runner.cleanup()
    journal = app[JOURNAL]  # None with --redis: nothing of its own to save
    return 0 if journal is None or journal.save_error is None else 1  # the final save failed: systemd sees it


ARRIVAL_GRACE = 0.1  # seconds for the requests of connections just accepted to arrive, when stopping


async def stop_accepting(runner: web.AppRunner) -> None:
    """Take no more connections, then give those just taken a moment to send their requests. aiohttp's
    shutdown waits for the requests in progress but closes every other connection, and one accepted
    just before the signal usually has its request still unread: a POST lost with no answer. The
    connections not taken wait in the listening socket if systemd holds it (socket activation) for
    the next livecounter; otherwise closing it refuses them."""
    for site in list(runner.sites):
        await site.stop()
    await asyncio.sleep(ARRIVAL_GRACE)


def serving_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def socket_url(sock: socket.socket) -> str:
    """Where a listening socket serves, as the start-up line shows it (a UNIX socket as nginx writes it)."""
    if sock.family == socket.AF_UNIX:
        return f"http://unix:{sock.getsockname()}:/"
    host, port = sock.getsockname()[:2]
    return serving_url(host, port)


if __name__ == "__main__":
    sys.exit(main())
