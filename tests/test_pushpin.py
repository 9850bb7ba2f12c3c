"""livecounter as a GRIP origin behind a real, private Pushpin (Debian's package).

Without pushpin installed these tests are skipped on a developer's machine and fail under CI=true
(`.ci/run` installs it). See ../shared/notes/pushpin.md for what a private instance needs.
"""

import asyncio
import configparser
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import web

from tests.helpers import (SSE, Server, frame, free_port, metric, open_fds, read_frame, read_retry, read_until_value, retry_of,
                      retry_read, wait_until)

ROOT = Path(__file__).resolve().parent.parent
SIG_KEY = "a-sig-key-of-32-bytes-or-more-for-hs256"
PUSHPIN_INTERNAL_CONF = Path("/usr/lib/pushpin/internal.conf")  # Debian's {libdir}/internal.conf


class Pushpin:
    """A private Pushpin in a temp dir: its own ports, run dir, logs, zurl and routes.

    With `zurl` (a directory), the shipped layout instead: the config as shipped but for its ports and
    directories, so the runner starts no zurl, and the proxy reaches the origin through a zurl running
    as a service of its own (`Zurl`), as under Debian's packaging, with its sockets in that directory
    rather than /var/run/zurl. Without it, the runner starts a zurl of its own (services=), and the
    proxy talks to that one."""

    def __init__(self, directory: Path, origin_port: int, handler: dict[str, str] | None = None,
                 zurl: Path | None = None) -> None:
        self.directory = directory
        self.http_port = free_port()
        offset = random.randrange(10_000, 27_000)  # below the ephemeral ports (32768+)
        self.publish_port = 5561 + offset
        config = configparser.ConfigParser(interpolation=None, strict=False)
        config.optionxform = str
        config.read(ROOT / "deploy" / "pushpin" / "pushpin.conf")  # the sample the README recommends
        (directory / "run").mkdir(exist_ok=True)
        (directory / "log").mkdir(exist_ok=True)
        (directory / "routes").write_text(f"* 127.0.0.1:{origin_port}\n")
        config["global"].update(rundir=str(directory / "run"), port_offset=str(offset))
        # The shipped http_port may name an address (127.0.0.1:7999): only the port changes.
        http_port = re.sub(r"[0-9]+$", str(self.http_port), config["runner"]["http_port"])
        config["runner"].update(http_port=http_port, logdir=str(directory / "log"))
        config["proxy"].update(routesfile=str(directory / "routes"))
        if zurl is None:
            config["runner"].update(log_level=os.environ.get("PUSHPIN_LOG_LEVEL", "2"),
                                    services="condure,zurl,pushpin-proxy,pushpin-handler")
            config["proxy"].update(
                sig_key=SIG_KEY,
                zurl_out_specs="ipc://{rundir}/{ipc_prefix}zurl-in",
                zurl_out_stream_specs="ipc://{rundir}/{ipc_prefix}zurl-in-stream",
                zurl_in_specs="ipc://{rundir}/{ipc_prefix}zurl-out")
        else:
            # Pushpin's defaults for these (its internal.conf) name Debian's zurl service's sockets.
            internal = configparser.ConfigParser(interpolation=None, strict=False)
            internal.read(PUSHPIN_INTERNAL_CONF)
            for spec in ("zurl_out_specs", "zurl_out_stream_specs", "zurl_in_specs"):
                default = internal["proxy"][spec]
                assert default.startswith("ipc:///var/run/zurl/"), f"Pushpin's {spec} is {default} now: adapt"
                config["proxy"][spec] = default.replace("/var/run/zurl/", f"{zurl}/")
        self.sig_key = config["proxy"]["sig_key"]
        config["handler"].update(handler or {})
        self.config_file = directory / "pushpin.conf"
        with open(self.config_file, "w") as file:
            config.write(file)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grip_url = f"http://127.0.0.1:{self.publish_port}/"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, through_proxy: bool = True) -> "Pushpin":
        """Up once its ports take connections and, unless through_proxy is false, requests get answers
        through its proxy."""
        with open(self.directory / "pushpin.out", "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                "pushpin", "--config", str(self.config_file), stdout=out, stderr=out,
                start_new_session=True)
        await asyncio.wait_for(self._ports_open(), 20)  # asyncio.timeout() is Python 3.11+
        if through_proxy:
            await self.ready()
        return self

    async def _ports_open(self) -> None:
        for port in (self.http_port, self.publish_port):
            while not port_open(port):
                await asyncio.sleep(0.1)

    async def ready(self) -> None:
        await asyncio.wait_for(self._ready(), 20)

    async def _ready(self) -> None:
        await self._ports_open()
        # Open ports are not enough: for a while condure answers "503 Accept service
        # unavailable" on some connections (its workers join the proxy one by one), and a
        # request that reaches the proxy before zurl is up hangs (both seen after a restart).
        # Ready: ten answers in a row, each on a new connection, that came through the proxy
        # (a 502 while the origin is down counts).
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1),
                                         connector=aiohttp.TCPConnector(force_close=True)) as session:
            in_a_row = 0
            while in_a_row < 10:
                try:
                    async with session.get(f"{self.url}/healthz") as response:
                        through_proxy = "Accept service unavailable" not in await response.text()
                except (asyncio.TimeoutError, aiohttp.ClientError):  # 3.10: not the builtin TimeoutError
                    through_proxy = False
                in_a_row = in_a_row + 1 if through_proxy else 0
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """SIGTERM: the runner stops the services it started (each runs in a process group of its own)."""
        self.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.process.wait(), 20)

        async def ports_closed() -> None:
            while port_open(self.http_port) or port_open(self.publish_port):
                await asyncio.sleep(0.1)
        await asyncio.wait_for(ports_closed(), 10)

    def kill(self) -> None:
        """The last resort: every process started with this instance's files."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if str(self.directory).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Zurl:
    """zurl as Debian's zurl package runs it, a service of its own (/etc/init.d/zurl: `zurl
    --config=/etc/zurl.conf --logfile=/var/log/zurl.log`), but for its sockets: /etc/zurl.conf's
    ipc paths in `directory` instead of /var/run/zurl."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self.directory = directory
        config = Path("/etc/zurl.conf").read_text()
        assert "ipc:///var/run/zurl/zurl-in" in config, "Debian's /etc/zurl.conf changed: adapt this test"
        self.config_file = directory / "zurl.conf"
        self.config_file.write_text(config.replace("ipc:///var/run/zurl/", f"ipc://{directory}/"))
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> "Zurl":
        with open(self.directory / "zurl.out", "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                "zurl", f"--config={self.config_file}", f"--logfile={self.directory / 'zurl.log'}",
                stdout=out, stderr=out, start_new_session=True)

        async def bound() -> None:  # its sockets are files once bound
            while not all((self.directory / name).exists() for name in ("zurl-in", "zurl-in-stream", "zurl-out")):
                await asyncio.sleep(0.05)
        await asyncio.wait_for(bound(), 10)
        return self

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 10)


def needs_pushpin() -> None:
    if shutil.which("pushpin") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pushpin is missing: .ci/run installs it with apt-get")
        pytest.skip("needs Debian's pushpin: apt-get install pushpin")


@contextlib.asynccontextmanager
async def behind_pushpin(tmp_path, data_file, *args, env=None, handler=None):
    """livecounter (python livecounter.py, with args and env) behind a private Pushpin whose
    [handler] settings handler overrides: (origin, pushpin)."""
    needs_pushpin()
    origin = Server(data_file, env=env)
    pushpin = Pushpin(tmp_path, origin.port, handler)
    try:
        await pushpin.start()
        origin.args += ["--grip-url", pushpin.grip_url, "--grip-key", SIG_KEY, "--save-interval", "0.1", *args]
        await origin.start()
        yield origin, pushpin
        if origin.process.returncode is None:
            await origin.stop()
    finally:  # whatever failed, no Pushpin outlives its test
        if pushpin.process is not None and pushpin.process.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):  # 3.10: not the builtin TimeoutError
                await pushpin.stop()
        pushpin.kill()


@pytest.fixture
async def setup(tmp_path, data_file):
    """livecounter behind a private Pushpin from the shipped config: (origin, pushpin)."""
    async with behind_pushpin(tmp_path, data_file) as running:
        yield running


async def test_listeners_through_pushpin_get_the_first_value_and_every_change(setup):
    origin, pushpin = setup
    async with aiohttp.ClientSession() as session:
        listener = await session.get(f"{pushpin.url}/counters/2/", headers=SSE)
        assert listener.status == 200
        assert listener.headers["Content-Type"].startswith("text/event-stream")
        assert "Grip-Hold" not in listener.headers  # Pushpin consumes the instructions
        assert await read_frame(listener) == frame(0)
        for value in (1, 2, 3):
            await session.post(f"{origin.url}/counters/2/")
            assert await read_until_value(listener, value) == [value]

        multi = await session.get(f"{pushpin.url}/counters/?ids=2,5", headers=SSE)
        assert await read_frame(multi) == b'event: counter\ndata: {"id": "2", "value": 3}\n\n'
        assert await read_frame(multi) == b'event: counter\ndata: {"id": "5", "value": 0}\n\n'
        await session.post(f"{origin.url}/counters/5/")
        assert await read_frame(multi) == b'event: counter\ndata: {"id": "5", "value": 1}\n\n'
        metrics = await (await session.get(f"{origin.url}/metrics")).text()
        assert "livecounter_listeners 0\n" in metrics  # livecounter holds none of them
        assert "livecounter_grip_publishing_failing 0\n" in metrics


async def test_the_shipped_config_proxies_through_zurl_running_as_a_service_of_its_own(tmp_path, data_file):
    """deploy/pushpin/pushpin.conf, like Debian's, has Pushpin's runner start condure and Pushpin's
    proxy and handler, not zurl: Debian's zurl package runs zurl as a service of its own, and the proxy
    sends every request for the origin through its sockets (/var/run/zurl/zurl-in). Run by hand
    without that service, a request through Pushpin gets no answer (Pushpin 1.36 answers 502 after
    60 s); with zurl started as the service would start it, a stream works. Only ports and
    directories differ from the shipped files (the sig_key too is the shipped placeholder)."""
    needs_pushpin()
    origin = Server(data_file)
    pushpin = Pushpin(tmp_path, origin.port, zurl=tmp_path / "zurl")
    zurl = Zurl(tmp_path / "zurl")
    try:
        await pushpin.start(through_proxy=False)
        origin.args += ["--grip-url", pushpin.grip_url, "--grip-key", pushpin.sig_key]
        await origin.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            with pytest.raises(asyncio.TimeoutError):  # 3.10: not the builtin TimeoutError
                await session.get(f"{pushpin.url}/counters/2/", headers=SSE)

        await zurl.start()
        await pushpin.ready()
        async with aiohttp.ClientSession() as session:
            listener = await session.get(f"{pushpin.url}/counters/2/", headers=SSE)
            assert listener.status == 200 and "Grip-Hold" not in listener.headers  # held by Pushpin
            assert await read_frame(listener) == frame(0)
            assert await (await session.post(f"{pushpin.url}/counters/2/")).text() == "1\n"
            assert await read_until_value(listener, 1) == [1]
            assert await metric(session, origin.url, "listeners") == 0
    finally:
        if getattr(origin, "process", None) is not None and origin.process.returncode is None:
            await origin.stop()
        if pushpin.process is not None and pushpin.process.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await pushpin.stop()
        pushpin.kill()
        await zurl.stop()


async def test_hundreds_of_listeners_through_pushpin_cost_livecounter_no_sockets(setup):
    origin, pushpin = setup
    before = open_fds(origin.process)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        listeners = []
        for _ in range(6):  # in waves: a private Pushpin answers 502 to ~100 requests at once
            listeners += await asyncio.gather(*(session.get(f"{pushpin.url}/counters/4/", headers=SSE)
                                                for _ in range(50)))
        for listener in listeners:
            assert await read_frame(listener) == frame(0)  # after its retry field (read_frame checks it)
        # Each client got a retry drawn for it: Pushpin forwards each request, and shares no answer.
        assert len({retry_read[listener] for listener in listeners}) > 100
        # Pushpin's zurl keeps a pool of idle keep-alive connections to the origin; nothing per listener.
        assert open_fds(origin.process) < before + 50
        await session.post(f"{origin.url}/counters/4/")
        for listener in listeners:
            assert await read_until_value(listener, 1) == [1]


async def test_direct_and_proxied_listeners_coexist_and_every_post_reaches_all(setup):
    origin, pushpin = setup
    async with aiohttp.ClientSession() as session:
        direct = await session.get(f"{origin.url}/counters/6/", headers=SSE)
        proxied = await session.get(f"{pushpin.url}/counters/6/", headers=SSE)
        for listener in (direct, proxied):
            assert await read_frame(listener) == frame(0)
        assert await (await session.post(f"{origin.url}/counters/6/")).text() == "1\n"  # straight
        assert await (await session.post(f"{pushpin.url}/counters/6/")).text() == "2\n"  # through
        for listener in (direct, proxied):
            assert (await read_until_value(listener, 2))[-1] == 2


async def test_with_pushpin_down_posts_keep_their_speed_and_listeners_catch_up_after(setup):
    origin, pushpin = setup
    await pushpin.stop()
    async with aiohttp.ClientSession() as session:
        direct = await session.get(f"{origin.url}/counters/7/", headers=SSE)
        await read_frame(direct)
        slowest = 0.0
        for _ in range(200):
            started = time.monotonic()
            assert (await session.post(f"{origin.url}/counters/7/")).status == 200
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.5, "a POST waited on the unreachable Pushpin"
        assert (await read_until_value(direct, 200))[-1] == 200  # direct listeners unaffected

        async def reports_failure():
            response = await session.get(f"{origin.url}/healthz")
            return response.status == 503 and "publishing to" in await response.text()
        await wait_until(reports_failure, timeout=10)

        await pushpin.start()

        async def healthy():
            return (await session.get(f"{origin.url}/healthz")).status == 200
        await wait_until(healthy, timeout=20)  # the queued latest value got through
        proxied = await session.get(f"{pushpin.url}/counters/7/", headers=SSE)
        assert await read_frame(proxied) == frame(200)
        await session.post(f"{origin.url}/counters/7/")
        assert await read_until_value(proxied, 201) == [201]
    log = origin.log.read_text()
    assert log.count("publishing to") <= 3 and "works again" in log, "failures are logged once per outage"


async def test_a_forged_grip_sig_is_not_honoured(setup):
    origin, pushpin = setup
    forged = jwt.encode({"iss": "pushpin", "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256")
    expired = jwt.encode({"iss": "pushpin", "exp": int(time.time()) - 60}, SIG_KEY, algorithm="HS256")
    genuine = jwt.encode({"iss": "pushpin", "exp": int(time.time()) + 60}, SIG_KEY, algorithm="HS256")
    async with aiohttp.ClientSession() as session:
        for value, signature in enumerate((forged, expired, "garbage")):
            response = await session.get(f"{origin.url}/counters/1/", headers={**SSE, "Grip-Sig": signature})
            assert "Grip-Hold" not in response.headers  # served as a direct listener: a live stream
            assert await read_frame(response) == frame(value)
            await session.post(f"{origin.url}/counters/1/")
            assert await read_until_value(response, value + 1) == [value + 1]
            response.close()
        response = await session.get(f"{origin.url}/counters/1/", headers={**SSE, "Grip-Sig": genuine})
        assert response.headers["Grip-Hold"] == "stream"
        # With the id of the last publish handed to Pushpin (ids count every channel's publishes) and
        # the next link.
        assert re.fullmatch(r"counter-1; prev-id=[0-9a-f]+\.[0-9]+", response.headers["Grip-Channel"])
        assert response.headers["Grip-Link"] == "</counters/?after=last>; rel=next; timeout=30"
        assert response.headers["Grip-Keep-Alive"] == ":\\n\\n; format=cstring; timeout=15"
        retry, first = (await response.read()).split(b"\n", 1)
        retry_of(retry + b"\n")
        assert first == frame(3)  # the retry field and the first frame, then the response ends


async def test_deleting_a_counter_ends_its_streams_on_pushpin(setup, data_file):
    origin, pushpin = setup
    await origin.stop()
    origin.env["LIVECOUNTER_ADMIN_TOKEN"] = "admin"
    await origin.start()
    async with aiohttp.ClientSession() as session:
        proxied = await session.get(f"{pushpin.url}/counters/8/", headers=SSE)
        assert await read_frame(proxied) == frame(0)
        response = await session.delete(f"{origin.url}/counters/8/", headers={"Authorization": "Bearer admin"})
        assert response.status == 204
        assert await asyncio.wait_for(proxied.content.read(), 10) == b""  # Pushpin closed it
    await origin.stop()
    assert "8" not in json.loads(data_file.read_text())


async def test_a_pushpin_that_answers_garbage_fails_alone(tmp_path, data_file, aiohttp_server):
    # Two publish targets: a real Pushpin, and an endpoint answering 500 with bytes that aren't UTF-8.
    # The bad one is an outage of its own (logged once, retried); the real one keeps getting every change.
    needs_pushpin()
    bad_answers = 0

    async def garbage(request):
        nonlocal bad_answers
        bad_answers += 1
        return web.Response(status=500, body=b"\xff\xfe\xfa not utf-8")
    bad = web.Application()
    bad.router.add_post("/publish/", garbage)
    bad_server = await aiohttp_server(bad, host="127.0.0.1")
    origin = Server(data_file)
    pushpin = Pushpin(tmp_path, origin.port)
    try:
        await pushpin.start()
        origin.args += ["--grip-url", f"http://127.0.0.1:{bad_server.port}/", "--grip-url", pushpin.grip_url,
                        "--grip-key", SIG_KEY]
        await origin.start()
        async with aiohttp.ClientSession() as session:
            proxied = await session.get(f"{pushpin.url}/counters/4/", headers=SSE)
            assert await read_frame(proxied) == frame(0)
            for value in (1, 2, 3):
                await session.post(f"{origin.url}/counters/4/")
                assert (await read_until_value(proxied, value, timeout=10))[-1] == value
            health = await session.get(f"{origin.url}/healthz")
            assert health.status == 503
            reason = await health.text()
            assert f"127.0.0.1:{bad_server.port}" in reason and pushpin.grip_url not in reason
            metrics = await (await session.get(f"{origin.url}/metrics")).text()
            assert re.search(r"^livecounter_grip_publishes_total [1-9]", metrics, re.M)
        await wait_until(lambda: bad_answers >= 3, timeout=10)  # retried
        assert await origin.stop() == 0
        log = origin.log.read_text()
        assert log.count(f"publishing to http://127.0.0.1:{bad_server.port}") == 1  # once per outage
        assert "Traceback" not in log
    finally:
        if getattr(origin, "process", None) is not None and origin.process.returncode is None:
            origin.process.kill()
        if pushpin.process is not None and pushpin.process.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await pushpin.stop()
        pushpin.kill()


async def test_publishing_is_paced_to_pushpins_message_rate_and_every_listener_ends_current(tmp_path, data_file):
    # Pushpin 1.36 queues one delivery per publish item and subscribed connection, sends them at
    # message_rate a second and drops any past message_hwm queued, answering 200 all the same
    # (handler/engine.cpp, ratelimiter.cpp). Here a Pushpin that delivers 200 a second and queues
    # 1,000 (the shipped config: 2,500 and 25,000), 300 counters each watched by a single-counter
    # stream and by one of three multi streams (a change: 2 deliveries), and POSTs at ~600 changes
    # a second for 4 s: six times what it delivers. livecounter paced to 200 items a second sends
    # nothing Pushpin drops, and every listener ends on its counter's final value.
    rate, seconds, post_rate = 200, 4.0, 600
    counters = [f"paced-{n}" for n in range(300)]
    data_file.write_text(json.dumps(dict.fromkeys(counters, 0)))
    # The variable, not the option: livecounter before pacing ignores it, and fails on what matters.
    async with behind_pushpin(tmp_path, data_file, env={"LIVECOUNTER_GRIP_MESSAGE_RATE": str(rate)},
                              handler={"message_rate": str(rate), "message_hwm": str(5 * rate)}) as (origin, pushpin):
        seen = {}  # (the stream's path, counter) -> the latest value it had

        async def follow(response, path):
            await read_retry(response)
            while frame_ := await response.content.readuntil(b"\n\n"):
                if frame_.startswith(b"event: message\n"):
                    seen[path, path.split("/")[2]] = int(frame_.split(b"data: ")[1])
                elif frame_.startswith(b"event: counter\n"):
                    event = json.loads(frame_.split(b"data: ")[1])
                    seen[path, event["id"]] = event["value"]

        paths = [f"/counters/{counter}/" for counter in counters] + [
            "/counters/?ids=" + ",".join(counters[start:start + 100]) for start in range(0, 300, 100)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            readers = []
            for start in range(0, len(paths), 50):  # in waves: a private Pushpin answers 502 to ~100 at once
                for path, response in zip(paths[start:start + 50], await asyncio.gather(
                        *(session.get(pushpin.url + path, headers=SSE) for path in paths[start:start + 50]))):
                    assert response.status == 200, (path, response.status)
                    readers.append(asyncio.create_task(follow(response, path)))
            try:
                await wait_until(lambda: len(seen) == 600, timeout=20, message="every stream's first frames")
                finals = dict.fromkeys(counters, 0)

                async def post(worker, workers=12):
                    started = loop.time()
                    for n in itertools.count():
                        when = started + (n * workers + worker) / post_rate
                        if when > started + seconds:
                            return
                        await asyncio.sleep(max(0.0, when - loop.time()))
                        counter = random.choice(counters)
                        async with session.post(f"{origin.url}/counters/{counter}/") as response:
                            finals[counter] = max(finals[counter], int(await response.text()))
                loop = asyncio.get_running_loop()
                started = loop.time()
                await asyncio.gather(*(post(worker) for worker in range(12)))
                stopped = loop.time()
                changes = sum(finals.values())
                assert changes / (stopped - started) > rate, "POSTs too slow to overload this Pushpin"

                def stale():
                    return {key: value for key, value in seen.items() if value != finals[key[1]]}
                # 300 changes waiting, 2 items each at 200 a second: 3 s, and ~1 s of Pushpin's queue (5.2 s seen).
                with contextlib.suppress(AssertionError):
                    await wait_until(lambda: not stale(), timeout=10)
                assert not stale(), f"{len(stale())} of {len(seen)} listeners on old values 10 s after the POSTs"
                assert await metric(session, origin.url, "grip_unpublished_counters") == 0
                assert await metric(session, origin.url, "grip_publishing_failing") == 0
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
    handler_log = (pushpin.directory / "log" / "pushpin-handler.log").read_text()
    assert "dropping message" not in handler_log
    assert "exceeded publish hwm" not in handler_log


async def test_a_multi_stream_url_up_to_condures_4096_byte_uri_goes_through_pushpin(tmp_path, data_file):
    # Pushpin 1.36's HTTP server, condure 1.9.1, copies "http://" + Host + path into a fixed buffer of
    # URI_SIZE_MAX = 4096 bytes (src/connection.rs, make_zhttp_request): a request whose URI is longer
    # is dropped, the connection closed without a byte (its log says, at debug level only, "process
    # error: WriteZero"). No setting raises it: client_buffer_size (--buffer-size, 8192) only bounds
    # the whole request head. Through Pushpin a stream of the server's 100 ids therefore fits when
    # they are ~39 characters long; of ids of 64 characters 62 fit, 63 don't.
    async def stream(path):
        """What Pushpin answers a raw stream request, up to every id's first frame (5 s at most)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", pushpin.http_port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        received = b""

        async def read():
            nonlocal received
            while received.count(b"event: counter\n") < path.count(",") + 1 and (data := await reader.read(65536)):
                received += data
        with contextlib.suppress(asyncio.TimeoutError):  # 3.10: not the builtin TimeoutError
            await asyncio.wait_for(read(), 5)
        writer.close()
        return received

    def uri_length(path):
        return len(f"http://{host}{path}")

    def multi(count, length, longer=0):
        """A multi stream's path: count ids of length characters, the first `longer` of them one more."""
        return "/counters/?ids=" + ",".join(f"{n:03d}".ljust(length + (n < longer), "x") for n in range(count))

    # --auto-create: unknown ids read as 0, so the ids can be made to measure once the port is known.
    async with behind_pushpin(tmp_path, data_file, "--auto-create") as (origin, pushpin):
        host = f"127.0.0.1:{pushpin.http_port}"  # what aiohttp sends too
        # The server's 100 ids, 39 or 40 characters: a URI of exactly 4,096 bytes.
        at_cap = multi(100, 39, 4096 - uri_length(multi(100, 39)))
        assert uri_length(at_cap) == 4096
        answer = await stream(at_cap)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.count(b"event: counter\n") == 100, answer[:200]
        assert (await stream(multi(62, 64))).count(b"event: counter\n") == 62  # 4,060 bytes
        # One byte over the cap, and 63 ids of 64 characters (4,125 bytes): no answer at all.
        for path in (at_cap + "x", multi(63, 64)):
            assert uri_length(path) > 4096
            assert await stream(path) == b"", f"condure took a {uri_length(path)}-byte URI: its limit changed"
        # The stream at the cap is held, subscribed to its 100 channels.
        async with aiohttp.ClientSession() as session:
            held = await session.get(pushpin.url + at_cap, headers=SSE)
            assert [(await read_frame(held)).count(b'"value": 0}') for _ in range(100)] == [1] * 100
            last = at_cap.rsplit(",", 1)[1]
            await session.post(f"{origin.url}/counters/{last}/")
            assert await read_frame(held) == b'event: counter\ndata: {"id": "%s", "value": 1}\n\n' % last.encode()


# --- who's watching through Pushpin: its stats socket ------------------------------------------------

@contextlib.asynccontextmanager
async def with_stats(tmp_path, data_file, handler=None):
    """livecounter behind a private Pushpin, reading its stats socket (Debian's stats_spec, an ipc path
    in the run dir): (origin, pushpin, session)."""
    stats = f"ipc://{tmp_path}/run/pushpin-stats"
    async with behind_pushpin(tmp_path, data_file, "--grip-stats", stats, handler=handler) as (origin, pushpin):
        async with aiohttp.ClientSession() as session:
            yield origin, pushpin, session


async def watchers(session, origin, counter_id="2"):
    return int(await (await session.get(f"{origin.url}/counters/{counter_id}/watchers/")).text())


async def test_streams_held_by_pushpin_count_as_watchers(tmp_path, data_file):
    async with with_stats(tmp_path, data_file) as (origin, pushpin, session):
        # The count's own stream, held by Pushpin too (it doesn't count: it watches the count).
        counts = await session.get(f"{pushpin.url}/counters/2/watchers/", headers=SSE)
        assert await read_frame(counts) == frame(0)
        proxied = await session.get(f"{pushpin.url}/counters/2/", headers=SSE)
        await read_frame(proxied)
        assert await read_until_value(counts, 1, timeout=5) == [1]  # Pushpin reported it; published back
        multi = await session.get(f"{pushpin.url}/counters/?ids=2,3&watchers=1", headers=SSE)
        assert await read_frame(multi) == b'event: counter\ndata: {"id": "2", "value": 0}\n\n'
        assert await read_frame(multi) == b'event: counter\ndata: {"id": "3", "value": 0}\n\n'
        assert await read_frame(multi) == b'event: watchers\ndata: {"id": "2", "watchers": 2}\n\n'  # itself
        assert await read_frame(multi) == b'event: watchers\ndata: {"id": "3", "watchers": 1}\n\n'
        direct = await session.get(f"{origin.url}/counters/2/", headers=SSE)  # held by livecounter: added
        await read_frame(direct)
        assert (await read_until_value(counts, 3, timeout=5))[-1] == 3  # 2 and 3 may come as one
        assert await asyncio.wait_for(multi.content.readuntil(b'"watchers": 3}\n\n'), 5)
        assert await watchers(session, origin, "3") == 1

        proxied.close()
        multi.close()
        direct.close()
        # Pushpin says at once when a channel's last subscriber leaves ("unavailable").
        assert (await read_until_value(counts, 0, timeout=5))[-1] == 0
        assert await watchers(session, origin, "3") == 0
        assert "livecounter_listeners 0\n" in await (await session.get(f"{origin.url}/metrics")).text()


async def test_a_pushpin_gone_silent_stops_counting_after_its_ttl(tmp_path, data_file):
    async with with_stats(tmp_path, data_file, handler={"stats_subscription_ttl": "3"}) as (origin, pushpin, session):
        proxied = await session.get(f"{pushpin.url}/counters/5/", headers=SSE)
        await read_frame(proxied)
        await wait_until(lambda: _is(watchers(session, origin, "5"), 1), message="Pushpin's report came")
        handlers = [pid for pid in filter(str.isdigit, os.listdir("/proc"))
                    if str(tmp_path).encode() in (command := Path(f"/proc/{pid}/cmdline").read_bytes())
                    and b"pushpin-handler" in command]
        assert handlers
        for pid in handlers:  # hung: no goodbye, its reports just stop
            os.kill(int(pid), signal.SIGSTOP)
        try:
            proxied.close()
            started = time.monotonic()
            await wait_until(lambda: _is(watchers(session, origin, "5"), 0), timeout=8,
                             message="a silent Pushpin's subscribers are forgotten after the ttl")
            assert time.monotonic() - started > 1  # not at once: a report holds for its ttl
        finally:
            for pid in handlers:
                os.kill(int(pid), signal.SIGCONT)


async def _is(awaitable, expected):
    return await awaitable == expected



async def test_a_stop_publishes_the_last_changes_to_the_streams_pushpin_keeps(tmp_path, data_file):
    """Pushpin holds its streams through livecounter's restart: the changes just before a stop must
    reach them, not wait for the next change after the restart. Paced to two changes a second, five
    changes are still waiting when SIGTERM comes."""
    async with behind_pushpin(tmp_path, data_file, "--grip-message-rate", "4") as (origin, pushpin):
        async with aiohttp.ClientSession() as session:
            # A process's first publish of a counter has no prev-id, so that Pushpin doesn't wait for
            # the previous process's ids: streams answered before it ask their next link, which needs
            # livecounter running. So each counter has been published once before the streams open.
            for counter_id in "12345":
                await session.post(f"{origin.url}/counters/{counter_id}/")
            await asyncio.sleep(3)
            listeners = [await session.get(f"{pushpin.url}/counters/{counter_id}/", headers=SSE)
                         for counter_id in "12345"]
            for listener in listeners:
                assert await read_frame(listener) == frame(1)
            # Pushpin asks each channel's next link ~1.1 s after its first subscription: let it.
            await asyncio.sleep(1.5)
            for counter_id in "12345":
                await session.post(f"{origin.url}/counters/{counter_id}/")
            assert await origin.stop() == 0
            for listener in listeners:
                assert await read_until_value(listener, 2, timeout=3) == [2]


async def test_streams_opened_while_posts_run_all_end_on_the_final_value(tmp_path, data_file):
    """The race GRIP's ids close: a change published between livecounter's answer to a new stream and
    Pushpin's subscribing it. 8 clients POST to one counter for 3 s while 150 streams open through
    Pushpin; within the next link's timeout (here 1 s) and a second, every stream has the final value.
    (Without ids, none of them had the final value 6 s after the last POST.)"""
    async with behind_pushpin(tmp_path, data_file, "--grip-link-timeout", "1") as running:
        await _streams_opened_while_posts_run(*running)


async def test_streams_of_a_hot_counter_are_current_2_s_after_its_last_post_with_the_defaults(tmp_path, data_file):
    """The same race with the default --grip-link-timeout (30 s): a hot counter's publishes go at its
    pace (a rest after each while it keeps changing), so Pushpin delivers each to every stream before
    the next, and none is lost or dropped: every stream is current 2 s after the last POST. (On
    6b9bdae, publishing every change as fast as Pushpin took them, 45 of 150 were.)"""
    async with behind_pushpin(tmp_path, data_file) as running:
        await _streams_opened_while_posts_run(*running)


async def _streams_opened_while_posts_run(origin, pushpin):
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        final = 0
        posting = True

        async def post():
            nonlocal final
            while posting:
                async with session.post(f"{origin.url}/counters/3/") as response:
                    final = max(final, int(await response.text()))
        posters = [asyncio.create_task(post()) for _ in range(8)]
        latest = {}

        async def follow(number):
            response = await session.get(f"{pushpin.url}/counters/3/", headers=SSE)
            assert response.status == 200
            await read_retry(response)
            while frame_ := await response.content.readuntil(b"\n\n"):
                if frame_.startswith(b"event: message\n"):
                    latest[number] = int(frame_.split(b"data: ")[1])
        readers = []
        for wave in range(15):  # 10 streams every 0.2 s: a private Pushpin answers 502 to ~100 at once
            readers += [asyncio.create_task(follow(wave * 10 + n)) for n in range(10)]
            await asyncio.sleep(0.2)
        posting = False
        await asyncio.gather(*posters)
        try:
            await wait_until(lambda: len(latest) == 150 and set(latest.values()) == {final}, timeout=2,
                             message="every stream on the final value 2 s after the last POST")
        finally:
            for reader in readers:
                reader.cancel()
