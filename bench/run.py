"""Benchmarks: livecounter side by side with its floor (a bare aiohttp handler) and nginx+nchan.

    python bench/run.py            # the full table, also written into bench/README.md: ~12 minutes on 2 cores
    python bench/run.py --quick    # a short smoke run that proves the harness works (prints only)

Every server runs in its own process and is driven from others (wrk, bench/listeners.py), all on
loopback. Each figure is the median of several runs; each ratio is taken pair by pair within one
run (both sides measured back to back), then its median is reported. It installs nothing: it says
what is missing and how to install it. Timings here are never test assertions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
LISTENERS_PER_PROCESS = 5000  # a process holds ~19,900 sockets here; two share the receiving work


# --- what the harness needs ----------------------------------------------------------------------

def missing_tools() -> list[str]:
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk (apt-get install wrk)")
    if shutil.which("valgrind") is None:
        missing.append("valgrind (apt-get install valgrind)")
    if shutil.which("nginx") is None or not NCHAN_MODULE.exists():
        missing.append("nginx with nchan (apt-get install nginx-light libnginx-mod-nchan)")
    if shutil.which("pushpin") is None:
        missing.append("pushpin (apt-get install pushpin)")
    if shutil.which("redis-server") is None:
        missing.append("redis-server (apt-get install redis-server)")
    for module, package in (("aiohttp", "aiohttp"), ("uvloop", "uvloop"), ("redis", "redis[hiredis]")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} (pip install {package})")
    return missing


# --- processes ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server under test, in its own process; `cpu_pid` is the process that does the work."""

    def __init__(self, name: str, command: list[str], port: int, ready: str, workdir: Path,
                 post_path: str, stream_path: str) -> None:
        self.name, self.port = name, port
        self.post_path, self.stream_path = post_path, stream_path
        self.log = open(workdir / (re.sub(r"[^A-Za-z0-9.-]+", "_", name)[:100] + ".log"), "ab")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log,
                                        start_new_session=True, cwd=workdir)
        self.started = time.monotonic()
        for line in self.process.stdout:
            if ready in line.decode():
                break
        else:
            raise RuntimeError(f"{name} did not start; see {self.log.name}")
        self.ready_after = time.monotonic() - self.started
        self.cpu_pid = self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def livecounter(loop: str, workdir: Path, *args: str, data: Path | None = None,
                under: tuple[str, ...] = (), port: int | None = None, setup: str = "") -> Server:
    """python livecounter.py, on uvloop (as the command line picks it) or asyncio's own loop; `under`
    is a command it runs under (valgrind); `setup`, Python run before main() (with livecounter imported)."""
    port = port or free_port()
    if data is None:  # every server starts from the shipped counters, all at 0
        data = workdir / f"counters-{port}.json"
        shutil.copy(ROOT / "counters.json", data)
    argv = ["--port", str(port), "--data", str(data), "--no-access-log",
            "--max-listeners-per-ip", "100000", *args]
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import livecounter; "
            + ("livecounter.uvloop = None; " if loop == "asyncio" else "") + (f"{setup}; " if setup else "")
            + f"sys.exit(livecounter.main({argv!r}))")
    return Server(f"livecounter {loop} {' '.join(args)}".strip(), [*under, PYTHON, "-c", code], port,
                  "livecounter serving", workdir, "/counters/1/", "/counters/1/")


def floor(loop: str, workdir: Path, under: tuple[str, ...] = ()) -> Server:
    port = free_port()
    return Server(f"floor {loop}", [*under, PYTHON, str(BENCH / "floor.py"), str(port), loop], port, "serving",
                  workdir, "/counters/1/", "/counters/1/")


NGINX_CONF = """load_module {module};
worker_processes 1;
worker_rlimit_nofile 19500;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/pub/(\\w+)$ {{ nchan_publisher; nchan_channel_id $1; nchan_message_buffer_length 1; }}
        location ~ ^/sub/(\\w+)$ {{ nchan_subscriber eventsource; nchan_channel_id $1; }}
        location = /ready {{ return 200 "serving\\n"; }}
    }}
}}
"""


def nchan(workdir: Path) -> Server:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(module=NCHAN_MODULE, dir=workdir, port=port))
    command = ["sh", "-c", f"nginx -c {conf} & "
               f"until curl -sf http://127.0.0.1:{port}/ready; do sleep 0.05; done; wait"]
    server = Server("nginx+nchan", command, port, "serving", workdir, "/pub/1", "/sub/1")
    master = int((workdir / "nginx.pid").read_text())
    server.cpu_pid = int(subprocess.check_output(["pgrep", "-P", str(master)]).split()[0])  # the worker
    return server


# --- measurements ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of pid, in nanosecond resolution (schedstat), as seconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


def rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def wrk_command(url: str, seconds: float, script: Path = BENCH / "post.lua", connections: int = 50) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]


def wrk(url: str, seconds: float, body: str | None = None, connections: int = 50,
        spread: tuple[str, int] | None = None) -> tuple[float, int]:
    """POSTs with wrk: requests per second, and errors (socket errors plus non-2xx answers). spread:
    (prefix, count), POSTs to counters prefix0 .. prefix<count-1> drawn at random (post_many.lua)."""
    script, environment = BENCH / "post.lua", None
    if body is not None:
        script = Path(tempfile.mkstemp(suffix=".lua")[1])
        script.write_text(f'wrk.method = "POST"\nwrk.body = "{body}"\n')
    if spread is not None:
        script = BENCH / "post_many.lua"
        environment = {**os.environ, "PREFIX": spread[0], "COUNT": str(spread[1])}
    output = subprocess.run(wrk_command(url, seconds, script, connections),
                            capture_output=True, text=True, check=True, env=environment).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return rate, errors + (int(non2xx.group(1)) if non2xx else 0)


def post(url: str, body: bytes = b"") -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=30) as answer:
        return answer.read()


class Listeners:
    """count streams held by bench/listeners.py processes. With storm, every process opens all of its
    streams at once, the processes together; storm_seconds is then the time from their start until
    the last stream had its first value."""

    def __init__(self, server: Server, count: int, path: str | None = None, wave: int = 100,
                 storm: bool = False) -> None:
        self.count = count
        sizes = [min(LISTENERS_PER_PROCESS, count - start) for start in range(0, count, LISTENERS_PER_PROCESS)]
        self.processes = [
            subprocess.Popen([PYTHON, str(BENCH / "listeners.py"), "127.0.0.1", str(server.port),
                              path or server.stream_path, str(size), "storm" if storm else str(wave)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for size in sizes]
        if storm:
            if any(process.stdout.readline().strip() != "set" for process in self.processes):
                raise RuntimeError("listeners did not start")
            for process in self.processes:  # together, once every process is running
                process.stdin.write("go\n")
                process.stdin.flush()
        answers = [process.stdout.readline().split() for process in self.processes]
        if any(answer[:1] != ["ready"] for answer in answers):
            raise RuntimeError(f"listeners did not connect: {answers}")
        if storm:
            self.storm_started = min(float(answer[1]) for answer in answers)
            self.storm_seconds = max(float(answer[2]) for answer in answers) - self.storm_started

    def frames(self) -> int:
        """How many "data: " lines the streams received so far, all together."""
        for process in self.processes:
            process.stdin.write("frames\n")
            process.stdin.flush()
        return sum(int(process.stdout.readline().split()[1]) for process in self.processes)

    def all_have(self, value: int) -> float:
        """The monotonic time at which the last stream had value (or a later one)."""
        self.expect(value)
        return self.reached(value)

    def expect(self, value: int) -> None:
        """Have the streams watch for value (before the change is made: then the time each had it is
        the time its bytes arrived, not the time it was asked); reached() says when they all did."""
        for process in self.processes:
            process.stdin.write(f"wait {value}\n")
            process.stdin.flush()

    def reached(self, value: int) -> float:
        answers = [process.stdout.readline().split() for process in self.processes]
        if any(answer[0] != "time" for answer in answers):
            raise RuntimeError(f"listeners missed {value}: {answers}")
        return max(float(answer[1]) for answer in answers)

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write("close\n")
                process.stdin.flush()
        for process in self.processes:
            process.wait(60)


def settle() -> None:
    time.sleep(0.5)  # let the servers' accept backlog and sweeps quiet down between phases


# --- workloads ---------------------------------------------------------------------------------

def in_turn(names: list[str], burst: int) -> list[str]:
    """The order in which wrk visits the servers (or counters) of a comparison: reversed every other
    burst, so that the machine's drift doesn't favour whichever goes first."""
    return names if burst % 2 else names[::-1]


@contextlib.contextmanager
def warmed_up(servers: dict[str, Server]):
    """Servers started side by side, each warmed up by a second of wrk (connections, caches, a first
    save); stopped when done."""
    try:
        for server in servers.values():
            wrk(server.url(server.post_path), 1)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def medians_and_spreads(runs: dict[str, list[float]]) -> dict:
    """Each figure's median, and for each ratio the range of its pairs as "spread <name>"."""
    return {name: statistics.median(values) for name, values in runs.items()} | {
        f"spread {name}": (min(values), max(values)) for name, values in runs.items() if name.startswith("ratio")}


def increments(workdir: Path, seconds: float, sessions: int, rounds: int) -> dict:
    """1 and 2: wrk POSTs to one counter, livecounter against the floor, durable against default.

    The servers of a comparison run side by side and wrk visits them in turn for short bursts, in an
    order that alternates: the two rates of a pair are seconds apart, so the machine's drift (other
    tenants) mostly cancels in their ratio. Each session starts the servers anew.
    """
    runs: dict[str, list[float]] = {}
    for session in range(sessions):
        for loop in ("asyncio", "uvloop"):
            with warmed_up({f"floor {loop}": floor(loop, workdir),
                            f"livecounter {loop}": livecounter(loop, workdir),
                            f"livecounter {loop} --durable": livecounter(loop, workdir, "--durable")}) as servers:
                for burst in range(rounds):
                    rates = {name: wrk(servers[name].url(servers[name].post_path), seconds)[0]
                             for name in in_turn(list(servers), session + burst)}
                    for name, rate in rates.items():
                        runs.setdefault(name, []).append(rate)
                    runs.setdefault(f"ratio livecounter/floor {loop}", []).append(
                        rates[f"livecounter {loop}"] / rates[f"floor {loop}"])
                    runs.setdefault(f"ratio durable/default {loop}", []).append(
                        rates[f"livecounter {loop} --durable"] / rates[f"livecounter {loop}"])
        server = nchan(workdir)
        try:
            for _ in range(rounds):
                runs.setdefault("nginx+nchan publish", []).append(wrk(server.url("/pub/1"), seconds, body="1")[0])
        finally:
            server.stop()
    return medians_and_spreads(runs)


DURABLE_CONNECTIONS = (10, 50, 200)


def durable_by_connections(workdir: Path, seconds: float, rounds: int) -> dict:
    """2, explained: group commit answers a change once the save after it is on disk, so its rate is
    wrk's connections ÷ the time a change waits, about two save cycles (one in progress when it
    arrives, then its own). Default and --durable side by side (uvloop), as in increments(), at several
    connection counts; the durable server's saves per burst give the POSTs per save and a save's cycle.
    """
    runs: dict[str, list[float]] = {}
    with warmed_up({"default": livecounter("uvloop", workdir),
                    "durable": livecounter("uvloop", workdir, "--durable")}) as servers:
        durable = servers["durable"]
        for connections in DURABLE_CONNECTIONS:
            for burst in range(rounds):
                saves_before = _saves(durable)  # it saves only while its own burst brings changes
                rates = {name: wrk(servers[name].url(servers[name].post_path), seconds, connections=connections)[0]
                         for name in in_turn(list(servers), burst)}
                saves = _saves(durable) - saves_before
                runs.setdefault(f"posts per save {connections}", []).append(rates["durable"] * seconds / saves)
                runs.setdefault(f"save cycle ms {connections}", []).append(1000 * seconds / saves)
                runs.setdefault(f"ratio {connections}", []).append(rates["durable"] / rates["default"])
    return medians_and_spreads(runs) | {"save alone ms": save_alone_ms(workdir)}


def save_alone_ms(workdir: Path) -> float:
    """A durable save on this disk with nothing else running: one line appended to a journal, and its
    fdatasync (what Journal._append does): the least a group commit can wait."""
    descriptor = os.open(workdir / "alone.journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    times = []
    try:
        for value in range(200):
            started = time.perf_counter()
            os.write(descriptor, b'{"1": %d}\n' % value)
            os.fdatasync(descriptor)
            times.append(time.perf_counter() - started)
    finally:
        os.close(descriptor)
    return 1000 * statistics.median(times)


def instructions_per_post(workdir: Path, posts: int) -> dict:
    """1 without the noise: user-space instructions per POST, which callgrind counts exactly whatever
    else the machine does, for the floor and livecounter (uvloop). Each server runs twice under
    valgrind, the runs differing by `posts` POSTs (one connection, one after another): the difference
    leaves start-up and shutdown out. The kernel's share of a POST (the same for both, about a
    quarter of the server's CPU here) is not counted: it brings the ratio of whole POSTs closer to 1.
    """
    def instructions(name: str, start: Callable[[tuple[str, ...]], Server], count: int) -> int:
        out = workdir / f"callgrind-{name}-{count}.out"
        server = start(("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"))
        try:
            posts_one_by_one(server, count)
        finally:
            server.stop()
        return int(re.search(r"^totals: (\d+)", out.read_text(), re.M).group(1))

    results = {}
    for name, start in (("floor", lambda under: floor("uvloop", workdir, under)),
                        ("livecounter", lambda under: livecounter("uvloop", workdir, under=under))):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two valgrinds: one per core
            few, more = pool.map(lambda count: instructions(name, start, count), (10, 10 + posts))
        results[name] = (more - few) / posts
    return results | {"ratio": results["floor"] / results["livecounter"]}


def posts_one_by_one(server: Server, count: int) -> None:
    """count POSTs on one keep-alive connection, each sent once the answer to the last is in."""
    request = f"POST {server.post_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock, sock.makefile("rb") as answers:
        for _ in range(count):
            sock.sendall(request)
            length = 0
            while (line := answers.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answers.read(length)


def cpu_per_post(workdir: Path, seconds: float, rounds: int) -> dict:
    """1, seen as cost: server CPU per POST, livecounter and the floor loaded at the same time (one wrk
    each), so both see the same machine in the same seconds; floor's cost / livecounter's."""
    runs: dict[str, list[float]] = {}
    for loop in ("asyncio", "uvloop"):
        with warmed_up({"floor": floor(loop, workdir), "livecounter": livecounter(loop, workdir)}) as servers:
            for _ in range(rounds):
                cpu_before = {name: cpu_seconds(server.cpu_pid) for name, server in servers.items()}
                loads = {name: subprocess.Popen(wrk_command(server.url(server.post_path), seconds),
                                                stdout=subprocess.PIPE, text=True)
                         for name, server in servers.items()}
                posts = {name: int(re.search(r"(\d+) requests in", load.communicate()[0]).group(1))
                         for name, load in loads.items()}
                micros = {name: 1e6 * (cpu_seconds(server.cpu_pid) - cpu_before[name]) / posts[name]
                          for name, server in servers.items()}
                runs.setdefault(f"floor {loop}", []).append(micros["floor"])
                runs.setdefault(f"livecounter {loop}", []).append(micros["livecounter"])
                runs.setdefault(f"ratio {loop}", []).append(micros["floor"] / micros["livecounter"])
    return medians_and_spreads(runs)


def broadcast_and_memory(workdir: Path, count: int, repeats: int) -> dict:
    """3 and 4: one increment to `count` idle listeners: server CPU, time to the last, RSS each."""
    results = {}
    for name, start in (("livecounter uvloop", lambda: livecounter("uvloop", workdir)),
                        ("livecounter asyncio", lambda: livecounter("asyncio", workdir)),
                        ("floor uvloop", lambda: floor("uvloop", workdir)),
                        ("nginx+nchan", lambda: nchan(workdir))):
        server = start()
        try:
            settle()
            rss_before = rss_kib(server.cpu_pid)
            listeners = Listeners(server, count)
            settle()
            rss_after = rss_kib(server.cpu_pid)
            cpu, delivery = [], []
            for value in range(1, repeats + 1 if "floor" not in name else 0):  # the floor can't broadcast
                cpu_before = cpu_seconds(server.cpu_pid)
                sent = time.monotonic()
                post(server.url(server.post_path), str(value).encode() if "nchan" in name else b"")
                delivery.append(listeners.all_have(value) - sent)
                cpu.append(cpu_seconds(server.cpu_pid) - cpu_before)
                time.sleep(0.05 + 6 * cpu[-1])  # past livecounter's rest after a broadcast (5× its time)
            listeners.close()
            results[name] = {"cpu_ms": 1000 * statistics.median(cpu or [0]),
                             "delivery_ms": 1000 * statistics.median(delivery or [0]),
                             "kib_per_listener": (rss_after - rss_before) / count}
        finally:
            server.stop()
    return results


def hot_counter(workdir: Path, count: int, seconds: float, rounds: int) -> dict:
    """5: wrk POSTs to a counter with `count` listeners, against POSTs to one that nobody watches.

    One server holds the listeners; wrk visits the watched counter and an unwatched one in turn for
    short bursts, in alternating order, so each pair of rates is seconds apart on the same process.
    After each burst on the watched counter: how long until every listener had its final value.
    """
    results = {}
    for name, start, hot_path, cold_path in (
            ("livecounter uvloop", lambda: livecounter("uvloop", workdir), "/counters/1/", "/counters/2/"),
            ("nginx+nchan", lambda: nchan(workdir), "/pub/1", "/pub/2")):
        server = start()
        try:
            body = "1" if "nchan" in name else None
            listeners = Listeners(server, count)
            runs: dict[str, list[float]] = {}
            for burst in range(rounds):
                rates = {}
                for which in in_turn(["hot", "cold"], burst):
                    path = hot_path if which == "hot" else cold_path
                    frames_before = listeners.frames() if which == "hot" else 0
                    rates[which], _ = wrk(server.url(path), seconds, body=body)
                    if which == "hot":  # the values a listener saw a second
                        runs.setdefault("fresh_per_second", []).append(
                            (listeners.frames() - frames_before) / count / seconds)
                    if which == "hot" and "livecounter" in name:  # nchan's messages all say 1: no final value
                        stopped = time.monotonic()
                        final = int(urllib.request.urlopen(server.url(hot_path), timeout=30).read())
                        runs.setdefault("final_after_ms", []).append(
                            1000 * max(0.0, listeners.all_have(final) - stopped))
                runs.setdefault("with_listeners", []).append(rates["hot"])
                runs.setdefault("alone", []).append(rates["cold"])
                runs.setdefault("ratio", []).append(rates["hot"] / rates["cold"])
            listeners.close()
            results[name] = medians_and_spreads(runs)
            if "final_after_ms" in runs:
                results[name]["final_after_ms"] = max(runs["final_after_ms"])  # the worst round
        finally:
            server.stop()
    return results


def calm_changes(workdir: Path, count: int, changes: int) -> dict:
    """3c: a change every 0.1-0.3 s (a counter that is not hot), each to `count` idle listeners:
    livecounter (uvloop) and nginx+nchan side by side, each change posted to both in alternating
    order, the time until the last listener had it and the server's CPU for it (medians)."""
    servers = {"livecounter uvloop": livecounter("uvloop", workdir), "nginx+nchan": nchan(workdir)}
    try:
        listeners = {name: Listeners(server, count) for name, server in servers.items()}
        settle()
        runs: dict[str, list[float]] = {}
        for value in range(1, changes + 1):
            time.sleep(random.uniform(0.1, 0.3))
            for name in in_turn(list(servers), value):
                server = servers[name]
                listeners[name].expect(value)
                time.sleep(0.01)  # the listener processes read the command before the change comes
                cpu_before = cpu_seconds(server.cpu_pid)
                sent = time.monotonic()
                post(server.url(server.post_path), str(value).encode() if "nchan" in name else b"")
                runs.setdefault(f"{name} delivery_ms", []).append(1000 * (listeners[name].reached(value) - sent))
                runs.setdefault(f"{name} cpu_ms", []).append(1000 * (cpu_seconds(server.cpu_pid) - cpu_before))
            runs.setdefault("ratio", []).append(runs["livecounter uvloop delivery_ms"][-1] / runs["nginx+nchan delivery_ms"][-1])
        for each in listeners.values():
            each.close()
        return medians_and_spreads(runs)
    finally:
        for server in servers.values():
            server.stop()


def many_counters_hot_and_calm(workdir: Path, counters: int, per_counter: int, seconds: float, rounds: int,
                               changes: int) -> dict:
    """5b: `counters` counters with `per_counter` listeners each on one livecounter (uvloop): the pace
    is per counter, the event loop shared. Calm: a change every 0.1-0.3 s to one of them drawn at
    random, the time until its last listener had it. Hot: wrk POSTs to the watched counters (one
    drawn at random per POST) against POSTs to as many unwatched ones, in alternating bursts; the
    values a listener saw a second, and after each burst the time until every listener of every
    counter had its final value."""
    data = workdir / "many-watched.json"
    data.write_text(json.dumps({f"{prefix}{n}": 0 for prefix in ("w", "u") for n in range(counters)}))
    # Above the default, which keeps a tenth of the open-file limit for other work: 19,000 of 20,000 here.
    server = livecounter("uvloop", workdir, "--max-listeners", str(counters * per_counter), data=data)
    try:
        listeners = [Listeners(server, per_counter, path=f"/counters/w{n}/") for n in range(counters)]
        settle()
        values = [0] * counters
        runs: dict[str, list[float]] = {}
        for _ in range(changes):
            time.sleep(random.uniform(0.1, 0.3))
            n = random.randrange(counters)
            values[n] += 1
            listeners[n].expect(values[n])
            time.sleep(0.01)  # the listener process reads the command before the change comes
            sent = time.monotonic()
            post(server.url(f"/counters/w{n}/"))
            runs.setdefault("calm delivery_ms", []).append(1000 * (listeners[n].reached(values[n]) - sent))
        for burst in range(rounds):
            rates = {}
            for which in in_turn(["hot", "cold"], burst):
                frames_before = sum(each.frames() for each in listeners) if which == "hot" else 0
                rates[which], _ = wrk(server.url("/"), seconds, spread=("w" if which == "hot" else "u", counters))
                if which == "hot":
                    stopped = time.monotonic()
                    runs.setdefault("fresh_per_second", []).append(
                        (sum(each.frames() for each in listeners) - frames_before) / (counters * per_counter) / seconds)
                    finals = [int(urllib.request.urlopen(server.url(f"/counters/w{n}/"), timeout=30).read())
                              for n in range(counters)]
                    runs.setdefault("final_after_ms", []).append(
                        1000 * max(0.0, max(each.all_have(final) for each, final in zip(listeners, finals)) - stopped))
            runs.setdefault("with_listeners", []).append(rates["hot"])
            runs.setdefault("alone", []).append(rates["cold"])
            runs.setdefault("ratio", []).append(rates["hot"] / rates["cold"])
        for each in listeners:
            each.close()
        results = medians_and_spreads(runs)
        results["final_after_ms"] = max(runs["final_after_ms"])
        return results
    finally:
        server.stop()


SAVE_LOAD = (200, 10)  # POSTs a second in all, from this many clients: a busy site's page views


def paced_load(server: Server, seconds: float, counters: int) -> dict:
    """bench/load.py against server for `seconds`: POSTs at SAVE_LOAD to random counters c0..c<n-1>,
    /healthz every 20 ms; the median POST, the POSTs answered a second, the server's share of a core,
    and the slowest /healthz (p99 and max: how long the event loop stalled)."""
    cpu_before, started = cpu_seconds(server.cpu_pid), time.monotonic()
    output = subprocess.run([PYTHON, str(BENCH / "load.py"), str(server.port), str(seconds), str(SAVE_LOAD[0]),
                             str(SAVE_LOAD[1]), str(counters)], capture_output=True, text=True, check=True).stdout
    cpu = (cpu_seconds(server.cpu_pid) - cpu_before) / (time.monotonic() - started)
    result = json.loads(output)
    probes = sorted(result["probes"])
    return {"post_p50_ms": statistics.median(result["posts"] or [math.inf]), "answered": result["answered"] / seconds,
            "cpu": cpu, "healthz_p99_ms": probes[int(0.99 * (len(probes) - 1))], "healthz_max_ms": probes[-1]}


def saves_cost(workdir: Path, sizes: list[int], seconds: float, rounds: int) -> dict:
    """10: what saves cost as the counters grow: servers with each number of counters, in the default
    mode and --durable, side by side (all running, the load visiting each in turn, the order
    alternating), under the same paced load (paced_load). And how long a start with the most takes."""
    servers = {}
    for size in sizes:
        counters = json.dumps({f"c{n}": 0 for n in range(size)})
        for mode in ("default", "durable"):
            data = workdir / f"saves-{size}-{mode}.json"
            data.write_text(counters)
            servers[(size, mode)] = livecounter("uvloop", workdir, *(["--durable"] if mode == "durable" else []),
                                                data=data)
    try:
        runs: dict[str, list[float]] = {}
        for burst in range(rounds):
            for size, mode in in_turn(list(servers), burst):
                for name, value in paced_load(servers[(size, mode)], seconds, size).items():
                    runs.setdefault(f"{size} {mode} {name}", []).append(value)
        results = {name: statistics.median(values) for name, values in runs.items()}
        results["start_s"] = max(server.ready_after for (size, _), server in servers.items() if size == max(sizes))
        return results
    finally:
        for server in servers.values():
            server.stop()


def compaction_stall(workdir: Path, size: int, seconds: float) -> dict:
    """10b: the journal folded into the data file after every save (a compaction that bench makes due
    each time, where the server waits until the journal outgrows the data file), at `size` counters,
    under the paced load: the slowest /healthz, and how many compactions ran meanwhile."""
    data = workdir / f"compacting-{size}.json"
    data.write_text(json.dumps({f"c{n}": 0 for n in range(size)}))
    server = livecounter("uvloop", workdir, data=data, setup="livecounter.Journal.compaction_due = lambda self: True")
    try:
        before = _metric(server, "compactions_total")
        result = paced_load(server, seconds, size)
        return result | {"compactions": _metric(server, "compactions_total") - before}
    finally:
        server.stop()


class RedisServer:
    """A private redis-server for the Redis rows (appendfsync everysec, its default: always made no
    difference measurable here, ../shared/notes/measured.md)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        directory = workdir / f"redis-{self.port}"
        directory.mkdir()
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                         str(directory), "--save", "", "--appendonly", "yes"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"redis://127.0.0.1:{self.port}/"
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is pid: a supervisor's workers."""
    found = []
    for child in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if int(Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(child))
    return found


def redis_posts(workdir: Path, seconds: float, rounds: int) -> dict:
    """11: POSTs a second (wrk -c50 to one counter, uvloop): the file store against Redis with one
    process and with --workers 2, side by side, visited in turn in alternating order; and Redis's
    own CPU per POST, which says how many writes a second one primary carries."""
    redis = RedisServer(workdir)
    servers = {"file store": livecounter("uvloop", workdir),
               "Redis": livecounter("uvloop", workdir, "--redis", redis.url),
               "Redis, 2 workers": livecounter("uvloop", workdir, "--redis", redis.url, "--workers", "2")}
    try:
        with warmed_up(servers):
            runs: dict[str, list[float]] = {}
            for burst in range(rounds):
                rates = {}
                for name in in_turn(list(servers), burst):
                    redis_cpu = cpu_seconds(redis.process.pid)
                    rates[name] = wrk(servers[name].url(servers[name].post_path), seconds)[0]
                    if name != "file store":
                        runs.setdefault(f"Redis µs a POST, {name}", []).append(
                            1e6 * (cpu_seconds(redis.process.pid) - redis_cpu) / (rates[name] * seconds))
                for name, rate in rates.items():
                    runs.setdefault(name, []).append(rate)
                    runs.setdefault(f"ratio {name}", []).append(rate / rates["file store"])
            return medians_and_spreads(runs)
    finally:
        redis.stop()


def redis_storm_and_broadcast(workdir: Path, count: int, rounds: int) -> dict:
    """11b and 11c, with --workers 2 on Redis: a reconnect storm of `count` streams against
    nginx+nchan (as row 8), and one change to `count` idle listeners spread over the two workers:
    each worker's CPU for it, against one process holding them all."""
    redis = RedisServer(workdir)
    servers = {"workers": livecounter("uvloop", workdir, "--redis", redis.url, "--workers", "2"),
               "nginx+nchan": nchan(workdir)}
    one = livecounter("uvloop", workdir, "--redis", redis.url)
    try:
        post(servers["nginx+nchan"].url("/pub/1"), b"1")
        runs: dict[str, list[float]] = {}
        for burst in range(rounds):
            seconds = {}
            for name in in_turn(list(servers), burst):
                listeners = Listeners(servers[name], count, storm=True)
                seconds[name] = listeners.storm_seconds
                listeners.close()
                time.sleep(2)  # every worker lets go of its streams (/metrics answers for one worker)
            runs.setdefault("storm workers", []).append(seconds["workers"])
            runs.setdefault("storm nchan", []).append(seconds["nginx+nchan"])
            runs.setdefault("ratio", []).append(seconds["workers"] / seconds["nginx+nchan"])
        workers = children_of(servers["workers"].process.pid)
        for name, server, pids in (("2 workers", servers["workers"], workers), ("1 process", one, [one.cpu_pid])):
            listeners = Listeners(server, count)
            settle()
            value = int(urllib.request.urlopen(server.url("/counters/1/"), timeout=30).read())
            for _ in range(10):
                before = [cpu_seconds(pid) for pid in pids]
                value += 1
                listeners.expect(value)
                time.sleep(0.01)
                post(server.url("/counters/1/"))
                listeners.reached(value)
                time.sleep(0.2)  # the change reached every process and its listeners: their CPU is spent
                spent = [cpu_seconds(pid) - was for pid, was in zip(pids, before)]
                runs.setdefault(f"{name} busiest ms", []).append(1000 * max(spent))
                runs.setdefault(f"{name} total ms", []).append(1000 * sum(spent))
                time.sleep(0.3)
            listeners.close()
            time.sleep(1)
        return medians_and_spreads(runs)
    finally:
        for server in [*servers.values(), one]:
            server.stop()
        redis.stop()


def pushpin_rows(workdir: Path, quick: bool) -> dict:
    """9 and 9b, through a private Pushpin (bench/pushpin.py)."""
    import asyncio

    import pushpin  # bench/pushpin.py
    race = asyncio.run(pushpin.race(workdir, 1 if quick else 3))
    calm = asyncio.run(pushpin.calm_latency(workdir, 100, 5 if quick else 20))
    return {"race": race, "calm": calm}


def reconnect_storm(workdir: Path, count: int, rounds: int) -> dict:
    """8: `count` streams opened at once, as the browsers a restart cut off come back together (those
    whose retry delays coincide), until every one has its first value: livecounter (uvloop) and
    nginx+nchan side by side, visited in alternating order; a round is a pair, its ratio
    livecounter's time / nchan's. The streams come from the listener processes (5,000 each), which
    share the two cores with the server: their own work is in both times."""
    servers = {"livecounter uvloop": livecounter("uvloop", workdir), "nginx+nchan": nchan(workdir)}
    try:
        post(servers["nginx+nchan"].url("/pub/1"), b"1")  # a new subscriber gets the channel's last message
        runs: dict[str, list[float]] = {}
        for burst in range(rounds):
            seconds = {}
            for name in in_turn(list(servers), burst):
                listeners = Listeners(servers[name], count, storm=True)
                seconds[name] = listeners.storm_seconds
                listeners.close()
                _all_closed(servers[name])
            for name, value in seconds.items():
                runs.setdefault(name, []).append(value)
            runs.setdefault("ratio", []).append(seconds["livecounter uvloop"] / seconds["nginx+nchan"])
        return medians_and_spreads(runs)
    finally:
        for server in servers.values():
            server.stop()


def storm_with_presence(workdir: Path, count: int, watchers: int, rounds: int) -> dict:
    """8b: the storm of row 8 on livecounter alone, with `watchers` streams of counter 1's watcher
    count open and without, in alternating order: the time until every stream has its first value,
    the server's CPU for the storm, and with watchers, the frames they got in all and the time from
    the storm's start until every one of them shows the exact count."""
    server = livecounter("uvloop", workdir)
    runs: dict[str, list[float]] = {}
    try:
        for burst in range(rounds):
            for with_watchers in in_turn([True, False], burst):
                counts = Listeners(server, watchers, path="/counters/1/watchers/") if with_watchers else None
                frames_before = counts.frames() if counts else 0
                cpu = cpu_seconds(server.cpu_pid)
                listeners = Listeners(server, count, storm=True)
                exact_at = counts.all_have(count) if counts else 0.0
                cpu = cpu_seconds(server.cpu_pid) - cpu
                name = "with" if with_watchers else "without"
                runs.setdefault(f"{name} seconds", []).append(listeners.storm_seconds)
                runs.setdefault(f"{name} cpu", []).append(cpu)
                if counts:
                    runs.setdefault("frames per watcher", []).append((counts.frames() - frames_before) / watchers)
                    runs.setdefault("exact after", []).append(exact_at - listeners.storm_started)
                    counts.close()
                listeners.close()
                _all_closed(server)
            runs.setdefault("ratio", []).append(runs["with seconds"][-1] / runs["without seconds"][-1])
        return medians_and_spreads(runs)
    finally:
        server.stop()


def _all_closed(server: Server) -> None:
    """Wait until the server has let go of the streams just closed (livecounter says so; nchan gets a
    second), then settle."""
    deadline = time.monotonic() + 30
    while "livecounter" in server.name and time.monotonic() < deadline:
        if re.search(r"^livecounter_listeners 0$", _metrics(server), re.M):
            break
        time.sleep(0.1)
    else:
        time.sleep(1)
    settle()


def scale(workdir: Path, count: int, seconds: float) -> dict:
    """6: `count` listeners and `seconds` of maximum POST rate: errors, and RSS along the way."""
    server = livecounter("uvloop", workdir)
    try:
        listeners = Listeners(server, count)
        samples: list[int] = []
        sampling = threading.Event()

        def sample_rss() -> None:
            while not sampling.wait(1):
                samples.append(rss_kib(server.cpu_pid))
        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        rate, errors = wrk(server.url(server.post_path), seconds)
        sampling.set()
        sampler.join()
        final = int(urllib.request.urlopen(server.url("/counters/1/"), timeout=30).read())
        listeners.all_have(final)
        listeners.close()
        warm = samples[len(samples) // 3:]  # after warm-up: the first third
        return {"rate": rate, "errors": errors, "rss_mib_start": warm[0] / 1024, "rss_mib_end": warm[-1] / 1024,
                "rss_growth": (warm[-1] - warm[0]) / warm[0]}
    finally:
        server.stop()


def many_counters(workdir: Path, counters: int, seconds: float) -> dict:
    """7: start-up with `counters` counters, and the event loop's longest stall while saves run."""
    data = workdir / "many.json"
    data.write_text(json.dumps({f"c{i}": i for i in range(counters)}))
    server = livecounter("uvloop", workdir, "--save-interval", "0.2", data=data)
    try:
        probe = server.url("/healthz")
        stalls, saves_before = [], _saves(server)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            post(server.url("/counters/c1/"))  # keeps a save due every interval
            started = time.monotonic()
            urllib.request.urlopen(probe, timeout=30).read()
            stalls.append(time.monotonic() - started)
            time.sleep(0.005)
        return {"start_s": server.ready_after, "max_stall_ms": 1000 * max(stalls),
                "saves": _saves(server) - saves_before,
                "save_ms": 1000 * float(re.search(r"^livecounter_last_save_duration_seconds (\S+)$",
                                                  _metrics(server), re.M).group(1))}
    finally:
        server.stop()


def _metrics(server: Server) -> str:
    return urllib.request.urlopen(server.url("/metrics"), timeout=30).read().decode()


def _saves(server: Server) -> int:
    return int(_metric(server, "saves_total"))


def _metric(server: Server, name: str) -> float:
    return float(re.search(rf"^livecounter_{name} (\S+)$", _metrics(server), re.M).group(1))


# --- the table ---------------------------------------------------------------------------------
#
# A full run writes its table into bench/README.md, between these two lines (and prints it); a
# quick run only prints. Each row with a target says whether it is met, judged on the figures as
# the row shows them (rounded as printed).

README = BENCH / "README.md"
TABLE_START = "<!-- bench/run.py: table start (a full run rewrites everything up to the end marker) -->"
TABLE_END = "<!-- bench/run.py: table end -->"


def machine() -> str:
    cpu = re.search(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024 // 1024
    return (f"{os.cpu_count()} cores ({cpu.group(1).strip() if cpu else platform.machine()}), {memory} GiB, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def software() -> str:
    """The versions the servers under test ran on (they run on this Python, with these packages)."""
    import aiohttp
    import uvloop
    return f"aiohttp {aiohttp.__version__}, uvloop {uvloop.__version__}"


def spread(results: dict, ratio: str) -> str:
    low, high = results[f"spread {ratio}"]
    return f" (pairs: {low:.2f}–{high:.2f})"


def shown(value: float, digits: int) -> float:
    """value as the table prints it: verdicts judge what the reader sees."""
    return round(value, digits)


def report(quick: bool, inc: dict, cost: dict, instructions: dict, durable: dict, broadcasts: dict, hot: dict,
           scaled: dict, many: dict, storms: dict, storms_with_presence: dict, sizes: dict, *,
           calm: dict, many_hot: dict, saves: dict, compaction: dict, pushpin: dict, redis_posts: dict,
           redis_storm: dict,
           day: str | None = None, where: str | None = None) -> str:
    """The table in Markdown: a line naming the run and the machine, then one row per figure; a row
    with a target says "met" or "not met". day and where default to today and this machine."""
    day = day or datetime.date.today().isoformat()
    where = where or f"{machine()}, {software()}"
    heading = (f"A quick smoke run, {day}, on {where}: its figures are not meaningful." if quick
               else f"The latest full run, {day}, on {where}:")
    lines = [heading, "", "| # | measurement | result | target | verdict |", "|---|---|---|---|---|"]

    def row(number: str, what: str, result: str, target: str = "", met: bool | None = None) -> None:
        verdict = "" if met is None else "met" if met else "not met"
        lines.append(f"| {number} | {what} | {result} | {target} | {verdict} |")

    for loop in ("asyncio", "uvloop"):
        ratio = inc[f'ratio livecounter/floor {loop}']
        row("1", f"POSTs/s, {loop}: livecounter vs bare aiohttp",
            f"{inc[f'livecounter {loop}']:,.0f} vs {inc[f'floor {loop}']:,.0f}: "
            f"**{ratio:.2f}×**{spread(inc, f'ratio livecounter/floor {loop}')}",
            "≥ 0.9×", shown(ratio, 2) >= 0.9)
    for loop in ("asyncio", "uvloop"):
        ratio = cost[f'ratio {loop}']
        row("1", f"server CPU per POST, {loop}, both loaded at once: floor vs livecounter",
            f"{cost[f'floor {loop}']:.0f} µs vs {cost[f'livecounter {loop}']:.0f} µs: "
            f"**{ratio:.2f}×**{spread(cost, f'ratio {loop}')}", "≥ 0.9×", shown(ratio, 2) >= 0.9)
    row("1", "instructions per POST in user space (callgrind, uvloop, one connection): floor vs livecounter",
        f"{instructions['floor']:,.0f} vs {instructions['livecounter']:,.0f}: **{instructions['ratio']:.2f}×**",
        "≥ 0.9×", shown(instructions["ratio"], 2) >= 0.9)
    for loop in ("asyncio", "uvloop"):
        ratio = inc[f'ratio durable/default {loop}']
        row("2", f"POSTs/s, {loop}: `--durable` vs default",
            f"{inc[f'livecounter {loop} --durable']:,.0f} vs {inc[f'livecounter {loop}']:,.0f}: "
            f"**{ratio:.2f}×**{spread(inc, f'ratio durable/default {loop}')}", "≥ 0.5×", shown(ratio, 2) >= 0.5)
    row("2", "`--durable` vs default by wrk connections (uvloop): ratio, POSTs per save, save cycle",
        "; ".join(f"{connections}: **{durable[f'ratio {connections}']:.2f}×**, "
                  f"{durable[f'posts per save {connections}']:.0f}, {durable[f'save cycle ms {connections}']:.1f} ms"
                  for connections in DURABLE_CONNECTIONS)
        + f"; a save alone {durable['save alone ms']:.2f} ms", "(why 2 is where it is)")
    row("1", "publishes/s, nginx+nchan (for scale)", f"{inc['nginx+nchan publish']:,.0f}")
    nchan_results = {count: result["nginx+nchan"] for count, result in broadcasts.items()}
    for count, result in broadcasts.items():
        for name in ("livecounter uvloop", "livecounter asyncio", "nginx+nchan"):
            ratio = result[name]["cpu_ms"] / nchan_results[count]["cpu_ms"]
            target = "livecounter" in name
            row("3", f"one increment to {count:,} listeners, {name}: server CPU, time to the last",
                f"{result[name]['cpu_ms']:.0f} ms CPU (**{ratio:.2f}×** nchan), {result[name]['delivery_ms']:.0f} ms",
                "CPU ≤ 1.2× nchan" if target else "", shown(ratio, 2) <= 1.2 if target else None)
    for count, result in broadcasts.items():
        for name in ("livecounter uvloop", "livecounter asyncio", "floor uvloop", "nginx+nchan"):
            what = "the least an aiohttp stream costs" if "floor" in name else name
            kib = result[name]["kib_per_listener"]
            target = "livecounter" in name
            row("4", f"RSS per idle listener ({count:,}), {what}", f"{kib:.1f} KiB",
                "≤ 8 KB" if target else "", 1024 * shown(kib, 1) <= 8000 if target else None)
    row("3c", f"a change every 0.1–0.3 s to {sizes['calm']:,} listeners: time to the last, livecounter uvloop "
              "vs nginx+nchan; CPU per change",
        f"{calm['livecounter uvloop delivery_ms']:.0f} ms vs {calm['nginx+nchan delivery_ms']:.0f} ms: "
        f"**{calm['ratio']:.2f}×**{spread(calm, 'ratio')}; CPU {calm['livecounter uvloop cpu_ms']:.0f} ms vs "
        f"{calm['nginx+nchan cpu_ms']:.0f} ms", "time and CPU ≤ nchan's",
        shown(calm["ratio"], 2) <= 1.0 and shown(calm["livecounter uvloop cpu_ms"], 0) <= shown(calm["nginx+nchan cpu_ms"], 0))
    for name, result in hot.items():
        target = "livecounter" in name
        extra = (f"; listeners saw {result['fresh_per_second']:.1f} values a second, every one the final value at "
                 f"most {result['final_after_ms']:.0f} ms after a burst") if "final_after_ms" in result else ""
        row("5", f"hot counter, {sizes['hot']:,} listeners, {name}: POSTs/s to their counter vs to an unwatched one",
            f"{result['with_listeners']:,.0f} vs {result['alone']:,.0f}: **{result['ratio']:.2f}×**"
            f"{spread(result, 'ratio')}{extra}",
            "≥ 0.8×, ≥ 2 values a second, final value ≤ 1 s" if target else "",
            shown(result["ratio"], 2) >= 0.8 and shown(result["fresh_per_second"], 1) >= 2
            and shown(result["final_after_ms"], 0) <= 1000 if target else None)
    counters, per_counter = sizes["many_hot"]
    row("5b", f"{counters} counters × {per_counter:,} listeners (uvloop): a change every 0.1–0.3 s to one, time to "
              "its last listener; hot, POSTs/s to them vs to unwatched ones",
        f"calm {many_hot['calm delivery_ms']:.0f} ms; hot {many_hot['with_listeners']:,.0f} vs "
        f"{many_hot['alone']:,.0f}: **{many_hot['ratio']:.2f}×**{spread(many_hot, 'ratio')}, listeners saw "
        f"{many_hot['fresh_per_second']:.1f} values a second, final value after at most "
        f"{many_hot['final_after_ms']:.0f} ms", "≥ 0.8×, ≥ 2 values a second, final value ≤ 1 s",
        shown(many_hot["ratio"], 2) >= 0.8 and shown(many_hot["fresh_per_second"], 1) >= 2
        and shown(many_hot["final_after_ms"], 0) <= 1000)
    row("6", f"{sizes['scale']:,} listeners, {sizes['scale_seconds']:.0f} s of max POSTs (uvloop)",
        f"{scaled['rate']:,.0f} POSTs/s, {scaled['errors']} errors, "
        f"RSS {scaled['rss_mib_start']:.0f} → {scaled['rss_mib_end']:.0f} MiB after warm-up "
        f"({100 * scaled['rss_growth']:+.1f}%)",
        "no errors, RSS flat (grows ≤ 5%)", scaled["errors"] == 0 and shown(100 * scaled["rss_growth"], 1) <= 5)
    row("7", f"{sizes['counters']:,} counters: start-up; longest loop stall while saving",
        f"start {many['start_s']:.2f} s; {many['saves']} saves of {many['save_ms']:.0f} ms each, "
        f"longest stall {many['max_stall_ms']:.0f} ms", "start < 1 s, stall ≤ 100 ms",
        shown(many["start_s"], 2) < 1 and shown(many["max_stall_ms"], 0) <= 100)
    for count, storm in storms.items():
        row("8", f"reconnect storm: {count:,} streams opened at once, until each has its first value: "
                 "livecounter uvloop vs nginx+nchan",
            f"{storm['livecounter uvloop']:.2f} s vs {storm['nginx+nchan']:.2f} s: "
            f"**{storm['ratio']:.2f}×**{spread(storm, 'ratio')}", "≤ 1.0×", shown(storm["ratio"], 2) <= 1.0)
    race, calm_pushpin = pushpin["race"], pushpin["calm"]
    row("9", f"{race['streams']} streams through Pushpin opened while 8 clients POST to their counter as fast as they "
             "can (defaults): on the final value 2 s after the last POST",
        f"**{race['current at 2 s']} of {race['streams']}** (the worst round); all after "
        f"{race['all current after']:.1f} s", "all", race["current at 2 s"] == race["streams"])
    row("9b", f"a calm counter's change (every 0.1–0.3 s) to {calm_pushpin['streams']} streams held by Pushpin: "
              "from the POST to the last stream",
        f"median **{calm_pushpin['through Pushpin median ms']:.0f} ms**, at most "
        f"{calm_pushpin['through Pushpin max ms']:.0f} ms (held by livecounter: {calm_pushpin['direct median ms']:.0f} ms, "
        f"at most {calm_pushpin['direct max ms']:.0f} ms)", "≤ 100 ms",
        shown(calm_pushpin["through Pushpin median ms"], 0) <= 100)
    small, large = sizes["saves"]
    for mode in ("default", "durable"):
        figures = {size: {name: saves[f"{size} {mode} {name}"] for name in
                          ("post_p50_ms", "answered", "cpu", "healthz_p99_ms")} for size in (small, large)}
        within = all(figures[large][name] <= 2 * max(figures[small][name], floor_)
                     for name, floor_ in (("post_p50_ms", 1.0), ("cpu", 0.01), ("healthz_p99_ms", 2.0)))
        held = figures[large]["answered"] >= 0.97 * SAVE_LOAD[0]
        cheap = mode == "default" or shown(100 * figures[small]["cpu"], 0) <= 10
        row("10", f"{SAVE_LOAD[0]} POSTs a second from {SAVE_LOAD[1]} clients to random counters, /healthz every "
                  f"20 ms, {mode}: {small:,} vs {large:,} counters",
            "; ".join(f"{size:,}: POST p50 {figures[size]['post_p50_ms']:.1f} ms, {figures[size]['answered']:.0f} "
                      f"answered/s, CPU {100 * figures[size]['cpu']:.0f}%, /healthz p99 "
                      f"{figures[size]['healthz_p99_ms']:.1f} ms" for size in (small, large)),
            "within 2× of the smaller, the load held" + ("; CPU ≤ 10% at the smaller" if mode == "durable" else ""),
            within and held and cheap)
    row("10b", f"{large:,} counters: the journal folded into the data file after every save, under that load",
        f"{compaction['compactions']:.0f} compactions; /healthz p99 {compaction['healthz_p99_ms']:.1f} ms, "
        f"slowest {compaction['healthz_max_ms']:.0f} ms", "slowest ≤ 20 ms",
        shown(compaction["healthz_max_ms"], 0) <= 20)
    row("10c", f"{large:,} counters: start-up, until it serves", f"{saves['start_s']:.2f} s", "< 3 s",
        shown(saves["start_s"], 2) < 3)
    row("11", "POSTs/s to one counter (uvloop, wrk -c50): the file store vs Redis, one process and 2 workers",
        f"{redis_posts['file store']:,.0f} vs {redis_posts['Redis']:,.0f} (**{redis_posts['ratio Redis']:.2f}×**"
        f"{spread(redis_posts, 'ratio Redis')}) vs {redis_posts['Redis, 2 workers']:,.0f} "
        f"(**{redis_posts['ratio Redis, 2 workers']:.2f}×**{spread(redis_posts, 'ratio Redis, 2 workers')}); "
        f"Redis's CPU a POST {redis_posts['Redis µs a POST, Redis']:.0f} µs, "
        f"{redis_posts['Redis µs a POST, Redis, 2 workers']:.0f} µs with 2 workers")
    row("11b", f"reconnect storm of {sizes['redis_storm']:,} streams, Redis with 2 workers vs nginx+nchan",
        f"{redis_storm['storm workers']:.2f} s vs {redis_storm['storm nchan']:.2f} s: **{redis_storm['ratio']:.2f}×**"
        f"{spread(redis_storm, 'ratio')}", "≤ 1.0×", shown(redis_storm["ratio"], 2) <= 1.0)
    row("11c", f"one change to {sizes['redis_storm']:,} listeners on Redis: CPU of the busiest worker of 2, and of both, "
               "vs one process holding them all",
        f"{redis_storm['2 workers busiest ms']:.0f} ms ({redis_storm['2 workers total ms']:.0f} ms both) vs "
        f"{redis_storm['1 process busiest ms']:.0f} ms")
    presence = storms_with_presence
    frames_bound = 2 + 2 * presence["exact after"]  # the first count, then at most two a second
    row("8b", f"reconnect storm of {sizes['presence_storm']:,} with {sizes['presence_watchers']} streams of its "
              "watcher count (uvloop), vs the same storm without",
        f"{presence['with seconds']:.2f} s vs {presence['without seconds']:.2f} s: "
        f"**{presence['ratio']:.2f}×**{spread(presence, 'ratio')}; CPU {presence['with cpu']:.2f} vs "
        f"{presence['without cpu']:.2f} s; {presence['frames per watcher']:.0f} frames per count stream, "
        f"the count exact {presence['exact after']:.2f} s after the storm began",
        "≤ 1.1×; frames ≤ 2 + 2 a second", shown(presence["ratio"], 2) <= 1.1
        and presence["frames per watcher"] <= frames_bound)
    return "\n".join(lines)


def write_table(table: str, readme: Path) -> None:
    """Put table between the markers of readme (bench/README.md), replacing what was there; nothing
    else in the file changes. ValueError if the markers are missing or out of order."""
    text = readme.read_text(encoding="utf-8")
    start = text.find(TABLE_START)
    end = text.find(TABLE_END, start + len(TABLE_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise ValueError(f"{readme} lacks the lines {TABLE_START!r} and {TABLE_END!r} (in that order)")
    before, after = text[:start + len(TABLE_START)], text[end:]
    readme.write_text(f"{before}\n{table}\n{after}", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: small sizes, one round; prints the table, writes nothing")
    args = parser.parse_args()
    if missing := missing_tools():
        print("bench/run.py needs, and does not install:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    quick = args.quick
    sizes = {"broadcast": [500] if quick else [5000, 10000], "hot": 500 if quick else 5000,
             "scale": 1000 if quick else 10000, "scale_seconds": 3 if quick else 30,
             "counters": 10_000 if quick else 100_000, "storm": [1000] if quick else [5000, 10000],
             "presence_storm": 1000 if quick else 5000, "presence_watchers": 100,
             "calm": 500 if quick else 5000,
             # 10 counters: 1,900 listeners each is what one process holds under this machine's
             # open-file limit (20,000, hard), not the 5,000 each that issue #24 names
             "many_hot": (10, 100 if quick else 1900),
             "saves": [1_000, 10_000] if quick else [10_000, 1_000_000],
             "redis_storm": 1000 if quick else 5000}
    sessions, rounds, burst = (1, 1, 1) if quick else (3, 6, 2)
    with tempfile.TemporaryDirectory(prefix="livecounter-bench-") as directory:
        workdir = Path(directory)
        phases = []

        def phase(title: str, work):
            print(f"... {title}", file=sys.stderr, flush=True)
            started = time.monotonic()
            result = work()
            phases.append(f"{title}: {time.monotonic() - started:.0f} s")
            return result

        inc = phase("increments", lambda: increments(workdir, burst, sessions, rounds))
        cost = phase("CPU per POST", lambda: cpu_per_post(workdir, burst + 1, rounds + 2))
        instructions = phase("instructions per POST",
                             lambda: instructions_per_post(workdir, 100 if quick else 1000))
        durable = phase("durable by connections",
                        lambda: durable_by_connections(workdir, burst, rounds // 2 or 1))
        broadcasts = {count: phase(f"broadcast to {count}", lambda: broadcast_and_memory(workdir, count, 10))
                      for count in sizes["broadcast"]}
        hot = phase("hot counter", lambda: hot_counter(workdir, sizes["hot"], burst + 1, rounds))
        scaled = phase("scale", lambda: scale(workdir, sizes["scale"], sizes["scale_seconds"]))
        many = phase("many counters", lambda: many_counters(workdir, sizes["counters"], 3 if quick else 10))
        storms = {count: phase(f"reconnect storm of {count}",
                               lambda: reconnect_storm(workdir, count, 3 if quick else 5))
                  for count in sizes["storm"]}
        presence = phase("reconnect storm with watcher counts", lambda: storm_with_presence(
            workdir, sizes["presence_storm"], sizes["presence_watchers"], 3 if quick else 5))
        calm = phase("calm changes", lambda: calm_changes(workdir, sizes["calm"], 5 if quick else 20))
        many_hot = phase("many counters, hot and calm", lambda: many_counters_hot_and_calm(
            workdir, *sizes["many_hot"], burst + 1, rounds, 5 if quick else 20))
        saves = phase("what saves cost", lambda: saves_cost(workdir, sizes["saves"], 3 if quick else 10, 1 if quick else 2))
        compaction = phase("compactions under load", lambda: compaction_stall(workdir, sizes["saves"][-1], 3 if quick else 10))
        pushpin = phase("through Pushpin", lambda: pushpin_rows(workdir, quick))
        on_redis = phase("POSTs on Redis", lambda: redis_posts(workdir, burst, sessions * rounds // 2 or 1))
        redis_storm = phase("Redis workers: storm and broadcast", lambda: redis_storm_and_broadcast(
            workdir, sizes["redis_storm"], 3 if quick else 5))
    table = report(quick, inc, cost, instructions, durable, broadcasts, hot, scaled, many, storms, presence, sizes,
                   calm=calm, many_hot=many_hot, saves=saves, compaction=compaction, pushpin=pushpin,
                   redis_posts=on_redis, redis_storm=redis_storm)
    print(table)  # first: whatever happens to the file, the figures are on the screen
    print("\n(" + "; ".join(phases) + ")", file=sys.stderr)
    if quick:
        print(f"(a quick run: {README.relative_to(ROOT)} is left as it was)", file=sys.stderr)
        return 0
    try:
        write_table(table, README)
    except (OSError, ValueError) as error:
        print(f"bench/run.py: the table was not written: {error}", file=sys.stderr)
        return 1
    print(f"(the table is in {README.relative_to(ROOT)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
