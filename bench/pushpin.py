"""What Pushpin costs: listeners through a private Pushpin against direct ones, side by side.

    python bench/pushpin.py [N]        # N listeners each way (default 1000)

livecounter (uvloop, with --grip-url) behind a private Pushpin built from deploy/pushpin/ (the
same one tests/test_pushpin.py runs). N listeners connect straight to livecounter, then N through
Pushpin; for each, ten single increments: time until the last listener has the value, server CPU
per change (livecounter's, and all of Pushpin's processes'), and RSS per listener. Needs pushpin
(apt-get install pushpin) besides what bench/run.py needs. Through Pushpin, connect in waves: a
private Pushpin answers 502 to about a hundred first requests at once.
"""

import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import run  # noqa: E402  (bench/run.py)
from tests.test_pushpin import Pushpin  # noqa: E402


def processes_of(directory: Path, exclude: int) -> list[int]:
    """Pushpin's processes: the ones started with this instance's files."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) != exclude and str(directory).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


async def main(count: int) -> None:
    if shutil.which("pushpin") is None or run.missing_tools():
        print("bench/pushpin.py needs pushpin (apt-get install pushpin) and what bench/run.py needs",
              file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="livecounter-pushpin-") as directory:
        workdir = Path(directory)
        port = run.free_port()
        (workdir / "pushpin").mkdir()
        pushpin = await Pushpin(workdir / "pushpin", port).start()
        data = workdir / "counters.json"
        shutil.copy(run.ROOT / "counters.json", data)
        server = run.Server("livecounter", [run.PYTHON, str(run.ROOT / "livecounter.py"), "--port", str(port),
                                            "--data", str(data), "--no-access-log", "--max-listeners-per-ip",
                                            "100000", "--grip-url", pushpin.grip_url],
                            port, "livecounter serving", workdir, "/counters/1/", "/counters/1/")
        try:
            pushpin_pids = processes_of(workdir / "pushpin", exclude=server.process.pid)
            value, rows = 0, []
            for label, listen_port, wave in (("direct", port, 100), ("through Pushpin", pushpin.http_port, 20)):
                target = type("Target", (), {"port": listen_port, "stream_path": "/counters/1/"})
                rss = (run.rss_kib(server.cpu_pid), sum(map(run.rss_kib, pushpin_pids)))
                listeners = run.Listeners(target, count, wave=wave)
                time.sleep(1)
                rss = ((run.rss_kib(server.cpu_pid) - rss[0]) / count,
                       (sum(map(run.rss_kib, pushpin_pids)) - rss[1]) / count)
                delivery, origin_cpu, proxy_cpu = [], [], []
                for _ in range(10):
                    value += 1
                    before = (run.cpu_seconds(server.cpu_pid), sum(map(run.cpu_seconds, pushpin_pids)))
                    sent = time.monotonic()
                    run.post(server.url("/counters/1/"))
                    delivery.append(listeners.all_have(value) - sent)
                    origin_cpu.append(run.cpu_seconds(server.cpu_pid) - before[0])
                    proxy_cpu.append(sum(map(run.cpu_seconds, pushpin_pids)) - before[1])
                    time.sleep(0.05 + 4 * max(origin_cpu[-1], proxy_cpu[-1]))
                listeners.close()
                rows.append(f"| {label} | {1000 * statistics.median(delivery):.0f} ms | "
                            f"{1000 * statistics.median(origin_cpu):.1f} ms | {1000 * statistics.median(proxy_cpu):.1f} ms | "
                            f"{rss[0]:.1f} KiB | {rss[1]:.1f} KiB |")
        finally:
            server.stop()
            await pushpin.stop()
            pushpin.kill()
    print(f"{count:,} listeners, one change at a time, on {run.machine()}:\n")
    print("| listeners | time to the last | livecounter CPU per change | Pushpin CPU per change "
          "| livecounter RSS per listener | Pushpin RSS per listener |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


async def race(workdir: Path, rounds: int, streams: int = 150, posters: int = 8, seconds: float = 3.0) -> dict:
    """9: the race of tests/test_pushpin.py as a figure, with livecounter's defaults (uvloop) behind a
    private Pushpin from the shipped config: `streams` streams open through Pushpin (10 every 0.2 s)
    while `posters` clients POST to one counter as fast as they can; how many streams have the
    final value 2 s after the last POST, and how long until all of them do (15 s at most)."""
    import aiohttp
    from tests.test_pushpin import SIG_KEY
    runs: dict[str, list[float]] = {}
    for round_ in range(rounds):
        directory = workdir / f"race-{round_}"
        (directory / "pushpin").mkdir(parents=True)
        port = run.free_port()
        pushpin = await Pushpin(directory / "pushpin", port).start()
        server = run.livecounter("uvloop", directory, "--grip-url", pushpin.grip_url, "--grip-key", SIG_KEY, port=port)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                final, posting, latest = 0, True, {}

                async def post() -> None:
                    nonlocal final
                    while posting:
                        async with session.post(server.url("/counters/3/")) as response:
                            final = max(final, int(await response.text()))

                async def follow(number: int) -> None:
                    async with session.get(f"{pushpin.url}/counters/3/", headers={"Accept": "text/event-stream"}) as response:
                        while block := await response.content.readuntil(b"\n\n"):
                            if b"data: " in block:
                                latest[number] = int(block.rpartition(b"data: ")[2])
                posts = [asyncio.create_task(post()) for _ in range(posters)]
                readers = []
                for wave in range(streams // 10):
                    readers += [asyncio.create_task(follow(wave * 10 + n)) for n in range(10)]
                    await asyncio.sleep(seconds / (streams // 10))
                posting = False
                await asyncio.gather(*posts)
                stopped = time.monotonic()
                await asyncio.sleep(2)
                runs.setdefault("current at 2 s", []).append(sum(value == final for value in latest.values()))
                while time.monotonic() - stopped < 15 and not (len(latest) == streams and set(latest.values()) == {final}):
                    await asyncio.sleep(0.05)
                runs.setdefault("all current after", []).append(time.monotonic() - stopped)
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
        finally:
            server.stop()
            await pushpin.stop()
            pushpin.kill()
    return {"streams": streams, "current at 2 s": min(runs["current at 2 s"]),
            "all current after": max(runs["all current after"])}


async def calm_latency(workdir: Path, streams: int, changes: int) -> dict:
    """9b: a calm counter's change, a change every 0.1–0.3 s, to `streams` streams held by a private
    Pushpin and as many held by livecounter itself: the time from each POST until the last stream of
    each kind had its value (medians and the slowest)."""
    directory = workdir / "calm"
    (directory / "pushpin").mkdir(parents=True)
    port = run.free_port()
    pushpin = await Pushpin(directory / "pushpin", port).start()
    server = run.livecounter("uvloop", directory, "--grip-url", pushpin.grip_url, port=port)
    try:
        held = run.Listeners(type("Target", (), {"port": pushpin.http_port, "stream_path": "/counters/2/"}),
                             streams, wave=20)
        direct = run.Listeners(type("Target", (), {"port": port, "stream_path": "/counters/2/"}), streams)
        time.sleep(1.5)  # past the hints and next-link fetches of the streams' arrival
        times: dict[str, list[float]] = {"through Pushpin": [], "direct": []}
        for value in range(1, changes + 1):
            time.sleep(random.uniform(0.1, 0.3))
            held.expect(value)
            direct.expect(value)
            time.sleep(0.01)  # the listener processes read the command before the change comes
            sent = time.monotonic()
            run.post(server.url("/counters/2/"))
            times["through Pushpin"].append(held.reached(value) - sent)
            times["direct"].append(direct.reached(value) - sent)
        held.close()
        direct.close()
    finally:
        server.stop()
        await pushpin.stop()
        pushpin.kill()
    return {"streams": streams} | {f"{kind} median ms": 1000 * statistics.median(values) for kind, values in times.items()} \
        | {f"{kind} max ms": 1000 * max(values) for kind, values in times.items()}


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
