"""A process holding N Server-Sent Events streams, for the benchmarks (not for tests).

    python bench/listeners.py HOST PORT PATH N [WAVE]

Opens N streams (GET PATH, Accept: text/event-stream) in waves of WAVE at once (default 100),
prints "ready" once every stream has its
first frame, then takes commands on stdin, one per line:

    wait V     print the monotonic time at which every stream had seen a value >= V ("time T")
    close      close every stream and exit

Works with livecounter (chunked "data: N" frames) and nginx+nchan ("data: N" EventSource frames).
time.monotonic() is CLOCK_MONOTONIC, the same clock in every process of the machine.
"""

import asyncio
import re
import socket
import sys
import time
from collections.abc import Callable

try:
    import uvloop
except ImportError:
    uvloop = None

LAST_VALUE = re.compile(rb"data: (\d+)\n(?!.*data: \d+\n)", re.S)
TAIL = 256  # bytes kept of what a stream received: its last whole frame is in them


class Stream(asyncio.Protocol):
    def __init__(self, tracker: "Tracker") -> None:
        self.tracker = tracker
        self.transport: asyncio.BaseTransport | None = None
        self.value = -1
        self.tail = b""  # the last bytes received: a frame may be split between reads
        self.opened = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.tail + data
        self.tail = buffer[-TAIL:]
        if not self.opened:
            if buffer.startswith(b"HTTP/") and not buffer.startswith(b"HTTP/1.1 200"):
                self.transport.close()  # refused (a proxy's 502 under a burst): retry, as EventSource does
                return
            if b"\n\n" in buffer:
                self.opened = True
                self.tracker.opened()
        # Values are read only while a "wait" runs: under a hot counter this process shares the
        # machine with the server it measures, and reading every frame took CPU from it.
        target = self.tracker.target
        if target is not None and self.value < target:
            self.read_value(buffer)
            if self.value >= target:
                self.tracker.one_reached()

    def read_value(self, buffer: bytes) -> None:
        if match := LAST_VALUE.search(buffer):
            self.value = int(match.group(1))

    def connection_lost(self, exc) -> None:
        if self.opened:
            self.tracker.lost += 1
        else:
            self.tracker.streams.remove(self)
            asyncio.get_running_loop().call_later(0.2, self.tracker.reopen)


class Tracker:
    def __init__(self, count: int) -> None:
        self.count = count
        self.open = 0
        self.lost = 0
        self.target: int | None = None  # the value a "wait" waits for; None while none runs
        self.reached = 0
        self.reached_at = 0.0
        self.all_open = asyncio.Event()
        self.all_reached = asyncio.Event()
        self.streams: list[Stream] = []
        self.reopen: Callable[[], object] = lambda: None  # opens one more stream, in place of a refused one

    def opened(self) -> None:
        self.open += 1
        if self.open == self.count:
            self.all_open.set()

    def one_reached(self) -> None:
        self.reached += 1
        if self.reached == self.count:
            self.reached_at = time.monotonic()
            self.all_reached.set()

    def expect(self, target: int | None) -> None:
        self.target = target
        self.all_reached.clear()
        self.reached = 0
        if target is not None:
            for stream in self.streams:
                stream.read_value(stream.tail)  # the latest that came while nobody waited
                if stream.value >= target:
                    self.one_reached()


async def main(host: str, port: int, path: str, count: int, wave: int) -> None:
    loop = asyncio.get_running_loop()
    tracker = Tracker(count)
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n").encode()
    transports = []

    async def open_one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))  # no name lookup per connection
        transport, stream = await loop.create_connection(lambda: Stream(tracker), sock=sock)
        tracker.streams.append(stream)
        transport.write(request)
        transports.append(transport)

    tracker.reopen = lambda: asyncio.ensure_future(open_one())

    for start in range(0, count, wave):  # in waves, as a crowd arrives, not all in one burst
        await asyncio.gather(*(open_one() for _ in range(min(wave, count - start))))
    await asyncio.wait_for(tracker.all_open.wait(), 120)
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "wait":
            tracker.expect(int(line[1]))
            try:
                await asyncio.wait_for(tracker.all_reached.wait(), 60)
                print(f"time {tracker.reached_at}", flush=True)
            except TimeoutError:
                print(f"timeout {tracker.reached}/{count} lost={tracker.lost}", flush=True)
            tracker.expect(None)
        elif line[0] == "close":
            break
    for transport in transports:
        transport.close()


if __name__ == "__main__":
    host, port, path, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    wave = int(sys.argv[5]) if len(sys.argv) > 5 else 100
    (uvloop.run if uvloop else asyncio.run)(main(host, port, path, count, wave))
