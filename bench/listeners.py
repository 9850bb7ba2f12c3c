"""A process holding N Server-Sent Events streams, for the benchmarks (not for tests).

    python bench/listeners.py HOST PORT PATH N [WAVE]
    python bench/listeners.py HOST PORT PATH N storm

Opens N streams (GET PATH, Accept: text/event-stream) in waves of WAVE at once (default 100),
prints "ready" once every stream has its first frame (any block: livecounter's retry field and
first value come in one packet, nchan starts with a ": hi" comment), then takes commands on stdin,
one per line:

    wait V     print the monotonic time at which every stream had seen a value >= V ("time T")
    frames     print how many "data: " lines the streams received in all ("frames N")
    close      close every stream and exit

With "storm" (browsers reconnecting after a restart), it prints "set" once it runs, opens all N
streams at once when it reads "go" on stdin (several processes can start together), and prints
"ready T0 T1": the monotonic times of the go and of the moment the last stream had its first
value (a "data: N" line: on nchan, publish to the channel first). Then the same commands.

Works with livecounter (chunked "data: N" frames) and nginx+nchan ("data: N" EventSource frames).
A connection refused, reset or answered with an error before its first frame is retried after
0.2 s, as EventSource does. time.monotonic() is CLOCK_MONOTONIC, the same clock in every process
of the machine.
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


FIRST_VALUE = re.compile(rb"data: \d+\n")


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
        self.tracker.frames += data.count(b"data: ")
        buffer = self.tail + data
        self.tail = buffer[-TAIL:]
        if not self.opened:
            if buffer.startswith(b"HTTP/") and not buffer.startswith(b"HTTP/1.1 200"):
                self.transport.close()  # refused (a proxy's 502 under a burst): retry, as EventSource does
                return
            if FIRST_VALUE.search(buffer) if self.tracker.storm else b"\n\n" in buffer:
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
    def __init__(self, count: int, storm: bool = False) -> None:
        self.count = count
        self.storm = storm  # a stream is open once it has a value, not at its first block
        self.open = 0
        self.lost = 0
        self.frames = 0  # "data: " lines received, all streams together
        self.target: int | None = None  # the value a "wait" waits for; None while none runs
        self.reached = 0
        self.reached_at = 0.0
        self.all_open = asyncio.Event()
        self.all_open_at = 0.0
        self.all_reached = asyncio.Event()
        self.streams: list[Stream] = []
        self.reopen: Callable[[], object] = lambda: None  # opens one more stream, in place of a refused one

    def opened(self) -> None:
        self.open += 1
        if self.open == self.count:
            self.all_open_at = time.monotonic()
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


async def main(host: str, port: int, path: str, count: int, wave: int | None) -> None:
    """wave None: a storm (see above)."""
    loop = asyncio.get_running_loop()
    tracker = Tracker(count, storm=wave is None)
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n").encode()
    transports = []

    async def open_one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))  # no name lookup per connection
        except OSError:  # refused or reset under a burst: retry, as EventSource does
            sock.close()
            loop.call_later(0.2, tracker.reopen)
            return
        transport, stream = await loop.create_connection(lambda: Stream(tracker), sock=sock)
        tracker.streams.append(stream)
        transport.write(request)
        transports.append(transport)

    tracker.reopen = lambda: asyncio.ensure_future(open_one())

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    if wave is None:
        print("set", flush=True)
        if (await reader.readline()).strip() != b"go":
            return
        went = time.monotonic()
        await asyncio.gather(*(open_one() for _ in range(count)))
    else:
        for start in range(0, count, wave):  # in waves, as a crowd arrives, not all in one burst
            await asyncio.gather(*(open_one() for _ in range(min(wave, count - start))))
    await asyncio.wait_for(tracker.all_open.wait(), 120)
    print("ready" if wave is not None else f"ready {went} {tracker.all_open_at}", flush=True)
    while line := (await reader.readline()).decode().split():
        if line[0] == "wait":
            tracker.expect(int(line[1]))
            try:
                await asyncio.wait_for(tracker.all_reached.wait(), 60)
                print(f"time {tracker.reached_at}", flush=True)
            except asyncio.TimeoutError:  # 3.10: not the builtin TimeoutError
                print(f"timeout {tracker.reached}/{count} lost={tracker.lost}", flush=True)
            tracker.expect(None)
        elif line[0] == "frames":
            print(f"frames {tracker.frames}", flush=True)
        elif line[0] == "close":
            break
    for transport in transports:
        transport.close()


if __name__ == "__main__":
    host, port, path, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    wave = None if sys.argv[5:6] == ["storm"] else int(sys.argv[5]) if len(sys.argv) > 5 else 100
    (uvloop.run if uvloop else asyncio.run)(main(host, port, path, count, wave))
