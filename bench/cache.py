"""What the cache buys: new viewers through Pushpin, with Varnish in the chain and without, side by side.

    python bench/cache.py [N]          # N new viewers a round, each way (default 1000)

Two chains run at once, each with its own livecounter (uvloop, --grip-url, --grip-key, its access log
on) and its own private Pushpin built from deploy/pushpin/ (the one tests/test_pushpin.py runs):

    (a) browsers -> Pushpin -> livecounter                 (deploy/pushpin/routes)
    (b) browsers -> Pushpin -> Varnish -> livecounter      (deploy/pushpin/routes.varnish; a private
        varnishd running deploy/varnish/livecounter.vcl, as tests/test_varnish.py does, and
        livecounter with --purge-url)

Each round, in alternating order (a b, b a, a b), N new viewers of one counter arrive through each
chain's Pushpin: GET /counters/1/ with Accept: text/event-stream, at most 50 opening at any moment
(a private Pushpin answers 502 to about a hundred at once; a refused viewer tries again after 0.2 s,
as EventSource does). Measured: new streams per second (N / the time from the first connection until
every stream had its first value), and per 1,000 viewers the requests that reached livecounter
(counted exactly from its access log: hold answers, and Pushpin's next-link fetches, ?after=, in the
1.5 s after the last stream opened) and the CPU seconds of livecounter, of Varnish and of Pushpin
(/proc, as bench/run.py reads it), over the same span. Then one POST to the counter, straight to
livecounter, and the time until every viewer has the new value. The viewers close before the next
chain's turn; a warm-up round of 50 viewers each way comes first and is not counted.

The viewers run in this process (one asyncio loop), on the same cores as the servers. Prints each
round's figures (stderr), then a Markdown table of the medians (the rounds' range beside them) and
the cached chain's over the direct one's: the ratio of the medians and, pair by pair, the range of
the rounds' ratios. Needs pushpin and varnish (apt-get install pushpin varnish) and uvloop; loopback
only, about 40 s at N = 1000.
"""

import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import run  # noqa: E402  (bench/run.py)
from pushpin import processes_of  # noqa: E402  (bench/pushpin.py)

WINDOW = 50  # viewers opening at once, at most
SETTLE = 1.5  # seconds after the last stream opened: Pushpin fetches a channel's next link ~1.1 s after
ROUNDS = 3
PATH = "/counters/1/"
REQUEST_LINE = re.compile(r'\] "([A-Z]+) (\S+) HTTP/1\.[01]"')
VALUE = re.compile(rb"data: (\d+)\n")
NEXT_LINK = re.compile(r"\?(.*&)?after=")  # livecounter's Grip-Link: /counters/?after=last for every stream


class Viewer(asyncio.Protocol):
    """One browser's EventSource, as little as it takes: the status, then the last "data: N" line."""

    def __init__(self, crowd: "Crowd") -> None:
        self.crowd = crowd
        self.transport: asyncio.Transport | None = None
        self.status: bool | None = None  # 200 or not, once the status line is in
        self.value = -1
        self.counted = False  # has the value a "wait" waits for
        self.tail = b""  # a frame may be split between reads

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.crowd.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.tail + data
        self.tail = buffer[-256:]
        if self.status is None:
            if len(buffer) < 12:
                return
            self.status = buffer.startswith(b"HTTP/1.1 200")
            if not self.status:  # refused (a proxy's 502 under a burst): closed, tried again
                self.transport.close()
                return
        if values := VALUE.findall(buffer):
            first = self.value < 0
            self.value = int(values[-1])
            self.crowd.heard(self, first)

    def connection_lost(self, exc) -> None:
        if self.value < 0:
            self.crowd.refused()
        else:
            self.crowd.lost += 1


class Crowd:
    """count viewers of one stream, opened WINDOW at a time: a new one as soon as one has its first value."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.request = (f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        "Accept: text/event-stream\r\nUser-Agent: bench/cache.py\r\n\r\n").encode()
        self.viewers: list[Viewer] = []
        self.to_open = count
        self.opened = 0  # viewers with their first value
        self.retries = 0
        self.lost = 0
        self.all_open = asyncio.Event()
        self.target: int | None = None
        self.reached = 0
        self.all_reached = asyncio.Event()
        self.last_at = 0.0

    def open_one(self) -> None:
        self.to_open -= 1
        asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, viewer = await loop.create_connection(lambda: Viewer(self), "127.0.0.1", self.port)
        except OSError:
            self.refused()
            return
        self.viewers.append(viewer)

    def refused(self) -> None:
        self.retries += 1
        self.to_open += 1
        asyncio.get_running_loop().call_later(0.2, self.open_one)

    def heard(self, viewer: Viewer, first: bool) -> None:
        if first:
            self.opened += 1
            if self.opened == self.count:
                self.last_at = time.monotonic()
                self.all_open.set()
            elif self.to_open > 0:
                self.open_one()
        if self.target is not None and viewer.value >= self.target and not viewer.counted:
            viewer.counted = True
            self.reached += 1
            if self.reached == self.count:
                self.last_at = time.monotonic()
                self.all_reached.set()

    async def open(self) -> float:
        """Opens every viewer; the monotonic time at which the last had its first value."""
        for _ in range(min(WINDOW, self.count)):
            self.open_one()
        await asyncio.wait_for(self.all_open.wait(), 120)
        return self.last_at

    async def all_have(self, value: int) -> float:
        """The monotonic time at which the last viewer had value (or a later one)."""
        self.target = value
        for viewer in self.viewers:
            if viewer.value >= 0:
                self.heard(viewer, False)
        await asyncio.wait_for(self.all_reached.wait(), 30)
        return self.last_at

    def close(self) -> None:
        for viewer in self.viewers:
            viewer.transport.close()


class Chain:
    """One livecounter (its access log on) behind its own Pushpin, with a Varnish between or not."""

    def __init__(self, name: str, workdir: Path, cached: bool, other: "Chain | None" = None) -> None:
        from tests.test_pushpin import Pushpin
        from tests.test_varnish import PUSHPIN_ROUTES, Varnish
        self.name, self.cached, self.value = name, cached, 0
        self.port = run.free_port()
        self.data = workdir / f"counters-{name}.json"
        shutil.copy(run.ROOT / "counters.json", self.data)
        self.directory = workdir / name
        (self.directory / "pushpin").mkdir(parents=True)
        self.varnish = Varnish(self.directory / "varnish", self.port) if cached else None
        self.pushpin = Pushpin(self.directory / "pushpin", self.varnish.port if cached else self.port)
        while other is not None and abs(self.pushpin.publish_port - other.pushpin.publish_port) < 10:
            self.pushpin = Pushpin(self.directory / "pushpin", self.varnish.port if cached else self.port)
        if cached:  # the shipped routes for this chain, pointed at this Varnish
            routes = PUSHPIN_ROUTES.read_text().replace("127.0.0.1:6081", f"127.0.0.1:{self.varnish.port}")
            (self.directory / "pushpin" / "routes").write_text(routes)
        self.server: run.Server | None = None
        self.varnish_pids: list[int] = []
        self.pushpin_pids: list[int] = []

    async def start(self, key: str) -> None:
        # livecounter first, so that nothing in front finds it refusing connections
        args = ["--grip-url", self.pushpin.grip_url, "--grip-key", key]
        if self.cached:
            args += ["--purge-url", self.varnish.purge_url]
        self.server = run.Server(
            f"livecounter {self.name}",
            [run.PYTHON, str(run.ROOT / "livecounter.py"), "--port", str(self.port), "--data", str(self.data),
             "--max-listeners-per-ip", "100000", *args],
            self.port, "livecounter serving", self.directory, PATH, PATH)
        if self.cached:
            await self.varnish.start()
            self.varnish_pids = processes_of(self.directory / "varnish", exclude=self.server.process.pid)
        await self.pushpin.start()
        self.pushpin_pids = processes_of(self.directory / "pushpin", exclude=self.server.process.pid)

    def requests(self) -> list[tuple[str, str]]:
        """Every request livecounter's access log shows so far: (method, path)."""
        return REQUEST_LINE.findall(Path(self.server.log.name).read_text())

    def cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far of livecounter, Varnish (all its processes) and Pushpin (all of them)."""
        return (run.cpu_seconds(self.server.cpu_pid), sum(map(run.cpu_seconds, self.varnish_pids)),
                sum(map(run.cpu_seconds, self.pushpin_pids)))

    async def round(self, count: int, session) -> dict:
        seen = len(self.requests())
        cpu = self.cpu()
        crowd = Crowd(self.pushpin.http_port, count)
        started = time.monotonic()
        last = await crowd.open()
        await asyncio.sleep(SETTLE)
        spent = [after - before for after, before in zip(self.cpu(), cpu)]
        requests = self.requests()[seen:]
        if any(viewer.value != self.value for viewer in crowd.viewers):
            raise RuntimeError(f"{self.name}: a viewer's first value is not {self.value}")
        self.value += 1
        sent = time.monotonic()
        async with session.post(self.server.url(PATH)) as answer:
            if await answer.text() != f"{self.value}\n":
                raise RuntimeError(f"{self.name}: the POST did not answer {self.value}")
        delivered = await crowd.all_have(self.value) - sent
        lost = crowd.lost
        crowd.close()
        await asyncio.sleep(1.5)  # Pushpin lets the streams go; livecounter's second purge passes
        per_1000 = 1000 / count
        return {"rate": count / (last - started),
                "requests": len(requests) * per_1000,
                "holds": sum(1 for method, path in requests if path == PATH) * per_1000,
                "next": sum(1 for method, path in requests if NEXT_LINK.search(path)) * per_1000,
                "others": sorted({f"{method} {path}" for method, path in requests
                                  if path != PATH and not NEXT_LINK.search(path)}),
                "origin": spent[0] * per_1000, "varnish": spent[1] * per_1000, "pushpin": spent[2] * per_1000,
                "delivered": delivered, "retries": crowd.retries, "lost": lost}

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        try:
            await self.pushpin.stop()
        finally:
            self.pushpin.kill()
            if self.varnish is not None:
                await self.varnish.stop_or_kill()


def versions() -> str:
    pushpin = subprocess.run(["pushpin", "--version"], capture_output=True, text=True).stdout.split()
    varnishd = shutil.which("varnishd") or "/usr/sbin/varnishd"
    varnish = re.search(r"varnish-([\d.]+)", subprocess.run([varnishd, "-V"], capture_output=True,
                                                              text=True).stderr)
    return (f"Pushpin {pushpin[-1] if pushpin else '?'}, Varnish {varnish.group(1) if varnish else '?'}")


def figure(values: list[float], digits: int, unit: str = "") -> str:
    shown = f"{{:,.{digits}f}}"
    middle = shown.format(statistics.median(values)) + unit
    if len(values) < 2 or shown.format(min(values)) == shown.format(max(values)):
        return middle
    return f"{middle} ({shown.format(min(values))}–{shown.format(max(values))})"


async def main(count: int) -> None:
    import aiohttp
    if shutil.which("pushpin") is None or not (shutil.which("varnishd") or Path("/usr/sbin/varnishd").exists()):
        print("bench/cache.py needs pushpin and varnish (apt-get install pushpin varnish)", file=sys.stderr)
        sys.exit(2)
    from tests.test_pushpin import SIG_KEY
    with tempfile.TemporaryDirectory(prefix="livecounter-cache-") as directory:
        workdir = Path(directory)
        direct = Chain("direct", workdir, cached=False)  # two Pushpins: ports apart (each offsets 5560-5563)
        chains = {"a": direct, "b": Chain("cached", workdir, cached=True, other=direct)}
        results: dict[str, list[dict]] = {"a": [], "b": []}
        try:
            for chain in chains.values():
                await chain.start(SIG_KEY)
            async with aiohttp.ClientSession() as session:
                for name in "ab":  # warm-up: each part's first connections, not counted
                    await chains[name].round(50, session)
                for number in range(ROUNDS):
                    for name in ("ab" if number % 2 == 0 else "ba"):
                        result = await chains[name].round(count, session)
                        results[name].append(result)
                        others = ", ".join(result["others"]) or "none"
                        print(f"round {number + 1}, ({name}) {chains[name].name}: {result['rate']:,.0f} streams/s, "
                              f"{result['requests']:.1f} origin requests ({result['holds']:.1f} hold answers, "
                              f"{result['next']:.1f} next links, others: {others}), origin CPU "
                              f"{result['origin']:.3f} s, Varnish {result['varnish']:.3f} s, Pushpin "
                              f"{result['pushpin']:.3f} s per 1,000; POST to all {1000 * result['delivered']:.0f} ms; "
                              f"{result['retries']} retries, {result['lost']} lost", file=sys.stderr, flush=True)
        finally:
            for chain in chains.values():
                await chain.stop()

    print(table(results, count))


def table(results: dict[str, list[dict]], count: int) -> str:
    """The medians of each chain's rounds (their range beside them), and the cached chain's over the
    direct one's: the ratio of the medians, and the range of the rounds' ratios, pair by pair."""
    def column(name: str, key: str) -> list[float]:
        return [result[key] for result in results[name]]

    def ratio(key: str) -> str:
        middle = statistics.median(column("b", key)) / statistics.median(column("a", key))
        pairs = [b / a for a, b in zip(column("a", key), column("b", key))]
        digits = 2 if min(middle, *pairs) >= 0.1 else 3
        return f"**{middle:.{digits}f}×** (pairs: {min(pairs):.{digits}f}–{max(pairs):.{digits}f})"

    exact = 0 if (1000 / count).is_integer() else 1  # requests per 1,000 viewers
    rows = [f"{count:,} new viewers of one counter through Pushpin, with Varnish between and without, "
            f"{len(results['a'])} rounds (median, range), on {run.machine()}, {run.software()}, {versions()}:",
            "",
            "| chain | new streams/s | origin requests per 1,000 viewers | origin CPU per 1,000 viewers "
            "| Varnish CPU per 1,000 | Pushpin CPU per 1,000 | one POST, until every viewer has it |",
            "|---|---|---|---|---|---|---|"]
    for name, label in (("a", "browsers → Pushpin → livecounter"),
                        ("b", "browsers → Pushpin → Varnish → livecounter")):
        varnish = figure(column(name, "varnish"), 2, " s") if name == "b" else "—"
        rows.append(f"| {label} | {figure(column(name, 'rate'), 0)} | {figure(column(name, 'requests'), exact)} "
                    f"| {figure(column(name, 'origin'), 3, ' s')} | {varnish} "
                    f"| {figure(column(name, 'pushpin'), 2, ' s')} "
                    f"| {figure([1000 * d for d in column(name, 'delivered')], 0, ' ms')} |")
    rows.append(f"| with the cache ÷ without | {ratio('rate')} | {ratio('requests')} | {ratio('origin')} | | "
                f"{ratio('pushpin')} | {ratio('delivered')} |")
    return "\n".join(rows)

if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        sys.exit("bench/cache.py needs uvloop (pip install uvloop)")
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
