"""livecounter behind a real, private Varnish (Debian's package, 7.1) running the shipped
deploy/varnish/livecounter.vcl, and the whole chain browsers -> Pushpin -> Varnish -> livecounter.

livecounter runs with --purge-url pointing at the Varnish: its reads and GRIP hold answers are
cacheable, and every change PURGEs the counter's URL. How many requests reach livecounter is read
from its access log. Without varnishd these tests are skipped on a developer's machine and fail
under CI=true (`.ci/run` installs it).
"""

import asyncio
import contextlib
import ctypes
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

from tests.helpers import SSE, Server, frame, free_port, read_frame, read_retry, read_until_value, wait_until
from tests.test_pushpin import SIG_KEY, Pushpin

ROOT = Path(__file__).resolve().parent.parent
VCL = ROOT / "deploy" / "varnish" / "livecounter.vcl"
PUSHPIN_ROUTES = ROOT / "deploy" / "pushpin" / "routes.varnish"
JSON = {"Accept": "application/json"}


def need_varnishd():
    if shutil.which("varnishd") is None and not Path("/usr/sbin/varnishd").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("varnishd is missing: .ci/run installs it with apt-get")
        pytest.skip("needs Debian's varnish: apt-get install varnish")


class Varnish:
    """A private varnishd in the foreground running the shipped VCL, its backend livecounter's port."""

    def __init__(self, directory: Path, origin_port: int, params: dict[str, str] | None = None) -> None:
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.port, self.admin_port = free_port(), free_port()
        shipped = VCL.read_text()
        vcl = shipped.replace('.port = "8080";', f'.port = "{origin_port}";')
        assert vcl != shipped, "the shipped VCL's backend is no longer 127.0.0.1:8080"
        self.vcl = directory / "livecounter.vcl"
        self.vcl.write_text(vcl)
        self.params = params or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.purge_url = f"{self.url}/"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> "Varnish":
        varnishd = shutil.which("varnishd") or "/usr/sbin/varnishd"
        # -j none: no jail. Run as root, varnishd would switch to its own users, which can't read
        # pytest's temp dirs (mode 0700).
        params = [arg for name, value in self.params.items() for arg in ("-p", f"{name}={value}")]
        with open(self.directory / "varnishd.out", "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                varnishd, "-F", "-j", "none", "-a", f"127.0.0.1:{self.port}", "-f", str(self.vcl),
                "-n", str(self.directory / "work"), "-s", "malloc,32m", "-T", f"127.0.0.1:{self.admin_port}",
                *params, stdout=out, stderr=out, start_new_session=True, preexec_fn=die_with_parent)
        await asyncio.wait_for(self._ready(), 20)
        return self

    async def _ready(self) -> None:
        """Up when Varnish answers a PURGE (from here: the VCL answers it without asking the backend,
        which, refused, Varnish would not try again for backend_remote_error_holddown, 0.25 s)."""
        while True:
            if self.process.returncode is not None:
                raise AssertionError("varnishd exited: " + (self.directory / "varnishd.out").read_text())
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PURGE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if (await asyncio.wait_for(reader.read(9), 2)).startswith(b"HTTP/1.1 "):
                        return
                except (OSError, asyncio.TimeoutError):  # 3.10: not the builtin TimeoutError
                    pass
                finally:
                    writer.close()
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)  # the manager stops its child, then exits
        await asyncio.wait_for(self.process.wait(), 20)

        async def port_closed() -> None:
            while port_open(self.port):
                await asyncio.sleep(0.05)
        await asyncio.wait_for(port_closed(), 10)

    async def stop_or_kill(self) -> None:
        """Whatever the way out: SIGTERM, and if that fails SIGKILL to the manager's process group
        (its child, the cache, is in it)."""
        if self.process is None or self.process.returncode is not None:
            return
        try:
            await self.stop()
        except (asyncio.TimeoutError, ProcessLookupError):  # 3.10: not the builtin TimeoutError
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await asyncio.wait_for(self.process.wait(), 10)


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, however it dies (prctl
    PR_SET_PDEATHSIG), so that not even a killed pytest leaves a varnishd behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.asynccontextmanager
async def behind_varnish(tmp_path, data_file, *args, params=None, env=None):
    """livecounter (python livecounter.py --purge-url <the Varnish> and args, env added to its
    environment) behind a private Varnish running the shipped VCL: (origin, varnish). No varnishd
    outlives its test."""
    need_varnishd()
    origin = Server(data_file, env=env)
    varnish = Varnish(tmp_path / "varnish", origin.port, params)
    try:
        origin.args += ["--purge-url", varnish.purge_url, *args]
        await origin.start()
        await varnish.start()
        yield origin, varnish
        if origin.process.returncode is None:
            await origin.stop()
    finally:
        await varnish.stop_or_kill()


def origin_requests(origin: Server, path: str) -> int:
    """How many GET/HEAD requests for path (with any query string) livecounter's access log shows.
    aiohttp logs a request when its answer is sent: the caller waits a moment before an upper bound."""
    pattern = rf'"(?:GET|HEAD) {re.escape(path)}(?:\?[^ "]*)? HTTP/1\.[01]"'
    return len(re.findall(pattern, origin.log.read_text()))


async def settled_requests(origin: Server, path: str) -> int:
    await asyncio.sleep(0.3)  # the access log lines of answers just sent
    return origin_requests(origin, path)


def grip_sig(key=SIG_KEY) -> str:
    """A Grip-Sig as Pushpin signs it (HS256, iss pushpin, an expiry)."""
    return jwt.encode({"iss": "pushpin", "exp": int(time.time()) + 3600}, key, algorithm="HS256")


async def read_value(session, url, headers=None) -> bytes:
    async with session.get(url, headers=headers) as response:
        assert response.status == 200, (response.status, await response.text())
        return await response.read()


async def fresh_within(session, url, expected: bytes, headers=None, seconds=0.5) -> float:
    """Read url through the cache until it answers expected; the seconds it took, at most seconds."""
    started = time.monotonic()
    while (body := await read_value(session, url, headers)) != expected:
        assert time.monotonic() - started < seconds, f"{url} still {body!r}, not {expected!r}, after {seconds} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def setup(tmp_path, data_file):
    async with behind_varnish(tmp_path, data_file) as running:
        yield running


async def test_100_reads_through_varnish_reach_livecounter_at_most_twice(setup):
    origin, varnish = setup
    url = f"{varnish.url}/counters/2/"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(url) as first:
            assert await first.read() == b"0\n"
            assert {"public", "s-maxage=600"} <= set(first.headers["Cache-Control"].split(", "))
            assert "accept" in first.headers["Vary"].lower()
        # The cache key is the URL: another Host (livecounter purges with its own), a browser's
        # cookies or an Authorization header don't make another copy or a pass.
        variety = [{}, {"Host": "counter.example"}, {"Cookie": "session=1"}, {"Authorization": "Bearer x"},
                   {"Accept": "text/plain, */*"}]
        bodies = await asyncio.gather(*(read_value(session, url, variety[n % len(variety)]) for n in range(49)))
        for n in range(50):
            bodies.append(await read_value(session, url, variety[n % len(variety)]))
        assert bodies == [b"0\n"] * 99
        async with session.get(url) as last:
            assert int(last.headers["Age"]) >= 0 and len(last.headers["X-Varnish"].split()) == 2  # a hit
    assert 1 <= await settled_requests(origin, "/counters/2/") <= 2


async def test_after_each_post_a_read_through_varnish_is_fresh_within_half_a_second(setup):
    origin, varnish = setup
    url = f"{varnish.url}/counters/3/"
    slowest = 0.0
    async with aiohttp.ClientSession() as session:
        for value in range(1, 11):
            assert await read_value(session, url) == b"%d\n" % (value - 1)  # cached now
            via = origin.url if value % 2 else varnish.url  # straight to livecounter, or through Varnish
            async with session.post(f"{via}/counters/3/") as response:
                assert await response.text() == f"{value}\n"
            slowest = max(slowest, await fresh_within(session, url, b"%d\n" % value))
        # /counters/3 is /counters/3/ to livecounter, and to the cache: purged with it.
        assert await read_value(session, f"{varnish.url}/counters/3") == b"10\n"
        await session.post(f"{origin.url}/counters/3/")
        await fresh_within(session, f"{varnish.url}/counters/3", b"11\n")
    # Between the POSTs the reads were hits: one origin request per change, and the first.
    assert await settled_requests(origin, "/counters/3/") <= 12 + 1
    print(f"slowest read-after-POST through Varnish: {slowest * 1000:.0f} ms")


async def test_reads_racing_posts_end_on_the_final_value(setup):
    # Varnish's PURGE (and a ban alike) skips an object still being fetched: a read that livecounter
    # answered just before a change, and that Varnish stores just after the change's PURGE, stays
    # in the cache, stale until the next change or s-maxage (seen with Varnish 7.1 and a backend that
    # answers 1 s late). livecounter must purge again once such a fetch has landed. Readers keep
    # missing while POSTs run: at the end, the cache holds the final value within 2 s, and keeps it.
    origin, varnish = setup
    url = f"{varnish.url}/counters/2/"
    posting = True
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def read_while_posting(accept):
            while posting:
                await read_value(session, url, accept)
        readers = [asyncio.create_task(read_while_posting(accept)) for accept in (None, JSON) * 12]
        try:
            for _ in range(100):
                await session.post(f"{origin.url}/counters/2/")
                await asyncio.sleep(random.uniform(0, 0.01))
        finally:
            posting = False
            await asyncio.gather(*readers)
        await fresh_within(session, url, b"100\n", seconds=2)
        await fresh_within(session, url, b'{"id": "2", "value": 100}', JSON, seconds=2)
        await asyncio.sleep(1)
        assert await read_value(session, url) == b"100\n"
        assert await read_value(session, url, JSON) == b'{"id": "2", "value": 100}'


async def test_json_and_plain_reads_are_separate_variants_and_both_purged(setup):
    origin, varnish = setup
    url = f"{varnish.url}/counters/5/"
    plain = b"0\n"
    async with aiohttp.ClientSession() as session:
        assert json.loads(await read_value(session, url, JSON)) == {"id": "5", "value": 0}
        assert await read_value(session, url) == plain
        # Spellings of Accept that livecounter answers alike share a variant: JSON, or plain text.
        for accept in ("application/json", "APPLICATION/JSON", "text/html, application/json;q=0.9",
                       "image/png,application/json ; q=0.5, text/plain"):
            assert json.loads(await read_value(session, url, {"Accept": accept})) == {"id": "5", "value": 0}
        for accept in ("text/plain", "text/html,application/xhtml+xml,*/*;q=0.8", "*/*", "text/plain, application/json",
                       "application/jsonx", ""):
            assert await read_value(session, url, {"Accept": accept}) == plain, accept
        assert await settled_requests(origin, "/counters/5/") == 2
        await session.post(f"{origin.url}/counters/5/")
        await fresh_within(session, url, b'{"id": "5", "value": 1}', JSON)
        await fresh_within(session, url, b"1\n")
    assert await settled_requests(origin, "/counters/5/") == 4


ADMIN_TOKEN = "admin-token-for-the-test"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def derived_reads(counter_id: str, value: int | None) -> dict[str, tuple[int, bytes | None]]:
    """What each path derived from a counter answers while the counter has value (None: it doesn't
    exist, a 404 whatever the body) and nobody watches it: (status, the whole body of a text answer,
    or what an SVG badge holds)."""
    paths = (f"/counters/{counter_id}/", f"/counters/{counter_id}/watchers/", f"/counters/{counter_id}/badge.svg",
             f"/counters/{counter_id}/watchers/badge.svg")
    if value is None:
        return dict.fromkeys(paths, (404, None))
    return {f"/counters/{counter_id}/": (200, b"%d\n" % value),
            f"/counters/{counter_id}/watchers/": (200, b"0\n"),
            f"/counters/{counter_id}/badge.svg": (200, b'aria-label="views: %d"' % value),
            f"/counters/{counter_id}/watchers/badge.svg": (200, b'aria-label="watching: 0"')}


async def read_through(session, url) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


def shows(path: str, answer: tuple[int, bytes], wanted: tuple[int, bytes | None]) -> bool:
    """Whether answer (status, body) is what derived_reads says path answers."""
    (status, body), (wanted_status, wanted_body) = answer, wanted
    if status != wanted_status or wanted_body is None:
        return status == wanted_status
    return wanted_body in body if path.endswith(".svg") else body == wanted_body


async def all_read_within(session, base_url, expected: dict[str, tuple[int, bytes | None]], since: float,
                          seconds=1.0) -> None:
    """Read each path through the cache until it answers what expected says, every one within
    seconds of since (time.monotonic(): when the change was answered); else name those still stale."""
    stale = dict.fromkeys(expected)
    while True:
        for path in list(stale):
            stale[path] = await read_through(session, base_url + path)
            if shows(path, stale[path], expected[path]):
                del stale[path]
        if not stale:
            return
        assert time.monotonic() - since < seconds, f"{seconds} s after the change, still stale: " + "; ".join(
            f"{path} answers {status} {body[:40]!r}, not {expected[path]}" for path, (status, body) in stale.items())
        await asyncio.sleep(0.01)


async def test_every_path_of_a_counter_is_fresh_within_a_second_of_its_creation_change_and_deletion(
        tmp_path, data_file):
    # An error a cache kept (a 404 the counter's creation doesn't purge) would answer for Varnish's
    # default TTL, 120 s: the value, its watcher count and both badges must all follow the counter.
    async with behind_varnish(tmp_path, data_file, env={"LIVECOUNTER_ADMIN_TOKEN": ADMIN_TOKEN}) as (origin, varnish):
        async with aiohttp.ClientSession() as session:
            for path, wanted in derived_reads("new", None).items():
                for _ in range(2):  # the second read would be a hit, had the first been stored
                    assert shows(path, await read_through(session, varnish.url + path), wanted), path

            async def change(method, **kwargs):
                async with session.request(method, f"{origin.url}/counters/new/", headers=ADMIN, **kwargs) as response:
                    assert response.status == (204 if method == "DELETE" else 200), await response.text()
                return time.monotonic()

            made = await change("PUT", json={"value": 7})
            await all_read_within(session, varnish.url, derived_reads("new", 7), made)

            incremented = await change("POST")
            value_reads = derived_reads("new", 8)
            await all_read_within(session, varnish.url, {path: value_reads[path] for path in
                                                         ("/counters/new/", "/counters/new/badge.svg")}, incremented)

            deleted = await change("DELETE")
            await all_read_within(session, varnish.url, derived_reads("new", None), deleted)
            for path, wanted in derived_reads("new", None).items():  # twice more each, as before it was made
                for _ in range(2):
                    assert shows(path, await read_through(session, varnish.url + path), wanted), path

            made_again = await change("PUT", json={"value": 3})
            await all_read_within(session, varnish.url, derived_reads("new", 3), made_again)


async def test_a_read_of_an_id_auto_create_would_make_is_fresh_within_a_second_of_its_creation(
        tmp_path, data_file):
    async with behind_varnish(tmp_path, data_file, "--auto-create") as (origin, varnish):
        url = f"{varnish.url}/counters/anon/"
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # the second read would be a hit, had the first been stored
                assert await read_value(session, url) == b"0\n"
            async with session.post(f"{origin.url}/counters/anon/") as response:
                assert await response.text() == "1\n"  # made, and counted
            await fresh_within(session, url, b"1\n", seconds=1.0)


async def test_a_purge_from_elsewhere_is_refused(setup):
    origin, varnish = setup
    url = f"{varnish.url}/counters/6/"
    async with aiohttp.ClientSession() as session:
        assert await read_value(session, url) == b"0\n"
        await session.post(f"{origin.url}/counters/6/")  # livecounter purges: a miss next
        await fresh_within(session, url, b"1\n")
        # Another address of this machine (all of 127/8 is loopback) is not in the VCL's acl.
        elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=elsewhere) as outsider:
            async with outsider.request("PURGE", url) as response:
                assert response.status == 405
        async with session.request("PURGE", url) as response:  # from 127.0.0.1, as livecounter does
            assert response.status == 200
    assert await settled_requests(origin, "/counters/6/") == 2  # the 405 purged nothing


async def test_livecounter_behind_pushpin_and_varnish_sees_the_browsers_address(tmp_path, data_file):
    # nginx appends the browser's address to X-Forwarded-For (Pushpin passes it on), and Varnish
    # would append Pushpin's: --trust-proxy takes the last. From a proxy on this machine, the VCL leaves the header as it came.
    async with behind_varnish(tmp_path, data_file, "--trust-proxy") as (origin, varnish):
        async with aiohttp.ClientSession() as session:
            headers = {"X-Forwarded-For": "198.51.100.4, 203.0.113.7"}
            async with session.post(f"{varnish.url}/counters/9/", headers=headers) as response:
                assert await response.text() == "1\n"
            async with session.post(f"{varnish.url}/counters/9/") as response:  # a browser on this machine
                assert await response.text() == "2\n"
        await asyncio.sleep(0.3)
        posts = [line.split(" INFO aiohttp.access: ")[1].split(" ")[0]
                 for line in origin.log.read_text().splitlines() if '"POST /counters/9/ ' in line]
        assert posts == ["203.0.113.7", "127.0.0.1"]


async def test_grip_signed_streams_are_served_from_the_cache_and_fresh_after_a_change(tmp_path, data_file):
    # Nothing listens at the GRIP URL: livecounter answers held all the same (publishing fails aside).
    async with behind_varnish(tmp_path, data_file, "--grip-url", f"http://127.0.0.1:{free_port()}/",
                              "--grip-key", SIG_KEY) as (origin, varnish):
        url = f"{varnish.url}/counters/7/"

        async def held(expected_value):
            async with aiohttp.ClientSession() as session:
                async with session.get(url, headers={**SSE, "Grip-Sig": grip_sig()}) as response:
                    assert response.status == 200
                    assert response.headers["Grip-Hold"] == "stream"
                    assert response.headers["Grip-Channel"].split(";")[0] == "counter-7"
                    body = await asyncio.wait_for(response.read(), 5)  # a whole answer, not a stream
                    assert re.fullmatch(rb"retry: \d+\n" + re.escape(frame(expected_value)), body), body
                    return response.headers

        first = await held(0)
        second = await held(0)
        assert len(first["X-Varnish"].split()) == 1 and len(second["X-Varnish"].split()) == 2  # a miss, a hit
        assert await settled_requests(origin, "/counters/7/") == 1
        async with aiohttp.ClientSession() as session:
            await session.post(f"{origin.url}/counters/7/")
        started = time.monotonic()
        while True:
            try:
                await held(1)
                break
            except AssertionError:
                assert time.monotonic() - started < 0.5, "a GRIP answer still stale 0.5 s after the change"
                await asyncio.sleep(0.01)
        await held(1)
        assert await settled_requests(origin, "/counters/7/") == 2
        # A stream without Grip-Sig never gets a cached hold answer: a live stream of its own.
        async with aiohttp.ClientSession() as session:
            direct = await session.get(url, headers=SSE)
            assert "Grip-Hold" not in direct.headers
            assert await read_frame(direct) == frame(1)
            direct.close()


async def test_a_direct_stream_through_varnish_is_live(setup):
    origin, varnish = setup
    async with aiohttp.ClientSession() as session:
        for path, value in (("/counters/8/", 0), ("/counters/8/", 1)):  # twice: nothing of the first is kept
            stream = await session.get(varnish.url + path, headers=SSE)
            assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
            assert await read_frame(stream) == frame(value)
            started = time.monotonic()
            await session.post(f"{origin.url}/counters/8/")
            assert await read_until_value(stream, value + 1, timeout=1) == [value + 1]
            print(f"a change through the piped stream after {(time.monotonic() - started) * 1000:.0f} ms")
            stream.close()
        multi = await session.get(f"{varnish.url}/counters/?ids=8,9", headers=SSE)
        assert await read_frame(multi) == b'event: counter\ndata: {"id": "8", "value": 2}\n\n'
        assert await read_frame(multi) == b'event: counter\ndata: {"id": "9", "value": 0}\n\n'
        await session.post(f"{varnish.url}/counters/9/")
        assert await read_frame(multi, timeout=1) == b'event: counter\ndata: {"id": "9", "value": 1}\n\n'
        multi.close()


async def test_a_quiet_direct_stream_outlives_varnishs_idle_timeouts(tmp_path, data_file):
    # Piped, a stream is closed after pipe_timeout (60 s) without a byte either way; livecounter's
    # keep-alive comments come sooner. Here both shortened: 1.5 s of pipe, a comment a second.
    async with behind_varnish(tmp_path, data_file, "--keepalive-interval", "0.5",
                              params={"pipe_timeout": "1.5", "send_timeout": "2", "idle_send_timeout": "1.5",
                                      "between_bytes_timeout": "1.5"}) as (origin, varnish):
        async with aiohttp.ClientSession() as session:
            stream = await session.get(f"{varnish.url}/counters/4/", headers=SSE)
            await read_retry(stream)
            assert await read_frame(stream) == frame(0)
            await asyncio.sleep(4)
            await session.post(f"{origin.url}/counters/4/")
            assert await read_until_value(stream, 1, timeout=1) == [1]


async def test_with_varnish_stopped_posts_answer_at_once_and_purges_resume_after(setup):
    origin, varnish = setup
    url = f"{varnish.url}/counters/1/"
    async with aiohttp.ClientSession() as session:
        assert await read_value(session, url) == b"0\n"
        await varnish.stop()
        slowest = 0.0
        for value in range(1, 21):
            started = time.monotonic()
            async with session.post(f"{origin.url}/counters/1/") as response:
                assert await response.text() == f"{value}\n"
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.2, f"a POST took {slowest:.2f} s: it waited on the Varnish that is down"

        async def says_why():
            async with session.get(f"{origin.url}/healthz") as response:
                return response.status == 503 and f"127.0.0.1:{varnish.port}" in await response.text()
        await wait_until(says_why, timeout=5, message="/healthz names the purge URL that fails")

        await varnish.start()  # the same port, an empty cache

        async def healthy():
            async with session.get(f"{origin.url}/healthz") as response:
                return response.status == 200
        await wait_until(healthy, timeout=7, message="/healthz 200 again within the retry backoff")
        assert await read_value(session, url) == b"20\n"  # cached again
        await session.post(f"{origin.url}/counters/1/")
        await fresh_within(session, url, b"21\n")  # purged: purges resumed
    log = origin.log.read_text()
    outage = [line for line in log.splitlines() if f"127.0.0.1:{varnish.port}" in line and '"' not in line]
    assert 1 <= len(outage) <= 3, f"an outage is logged once (and its end), not per purge: {outage}"


async def test_500_new_viewers_through_pushpin_and_varnish_cost_livecounter_a_handful_of_requests(
        tmp_path, data_file):
    """The whole chain: browsers -> Pushpin -> Varnish -> livecounter, Pushpin routed by the shipped
    deploy/pushpin/routes.varnish. A new viewer's stream is a GRIP hold answer from Varnish's cache."""
    need_varnishd()
    if shutil.which("pushpin") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pushpin is missing: .ci/run installs it with apt-get")
        pytest.skip("needs Debian's pushpin: apt-get install pushpin")
    origin = Server(data_file)
    varnish = Varnish(tmp_path / "varnish", origin.port)
    (tmp_path / "pushpin").mkdir()
    pushpin = Pushpin(tmp_path / "pushpin", varnish.port)
    routes = PUSHPIN_ROUTES.read_text()
    assert "* 127.0.0.1:6081\n" in routes
    (pushpin.directory / "routes").write_text(routes.replace("127.0.0.1:6081", f"127.0.0.1:{varnish.port}"))
    try:
        # Each part's ports are known before it starts: livecounter first, so that nothing in front
        # finds it refusing connections (Varnish would then not try it for a while).
        origin.args += ["--grip-url", pushpin.grip_url, "--grip-key", SIG_KEY, "--purge-url", varnish.purge_url]
        await origin.start()
        await varnish.start()
        await pushpin.start()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            viewers = []
            for _ in range(10):  # in waves: a private Pushpin answers 502 to ~100 requests at once
                viewers += await asyncio.gather(*(session.get(f"{pushpin.url}/counters/4/", headers=SSE)
                                                  for _ in range(50)))
            for viewer in viewers:
                assert viewer.status == 200
                assert await read_frame(viewer) == frame(0)
            await asyncio.sleep(1.5)  # Pushpin asks a channel's next link ~1.1 s after its first subscription
            cost = await settled_requests(origin, "/counters/4/")
            reads = len(re.findall(r'"GET /counters/4/ HTTP', origin.log.read_text()))
            assert 1 <= reads <= 2, f"{reads} of the 500 hold answers came from livecounter, not the cache"
            # The rest: Pushpin fetching the stream's next link (?after=, never cached).
            assert cost <= 5, f"500 new viewers cost livecounter {cost} requests: {reads} reads, " \
                              f"{cost - reads} next-link fetches"
            await session.post(f"{origin.url}/counters/4/")
            for viewer in viewers:  # held by Pushpin: every one gets the change
                assert await read_until_value(viewer, 1, timeout=5) == [1]
            print(f"500 new viewers through Pushpin and Varnish: {cost} requests to livecounter")
        await origin.stop()
    finally:
        if getattr(origin, "process", None) is not None and origin.process.returncode is None:
            origin.process.kill()
            await origin.process.wait()
        if pushpin.process is not None and pushpin.process.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):  # 3.10: not the builtin TimeoutError
                await pushpin.stop()
        pushpin.kill()
        await varnish.stop_or_kill()


async def test_a_read_stored_just_after_its_purge_is_purged_again(tmp_path, data_file):
    """Varnish's PURGE passes over an answer it is still fetching: a read answered before a change and
    stored after the change's purge would stay cached (600 s). Between Varnish and livecounter here, a
    proxy that holds answers back 0.5 s: a read in flight, a POST meanwhile, its purge, then the old
    answer stored. The second purge, a second after the first, takes it out."""
    need_varnishd()
    origin = Server(data_file, "--save-interval", "0.1")
    slow = True

    async def relay(reader, writer, hold):
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if hold and slow:
                    await asyncio.sleep(0.5)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def connect(client_reader, client_writer):
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", origin.port)
        await asyncio.gather(relay(client_reader, upstream_writer, False),
                             relay(upstream_reader, client_writer, True))
    proxy = await asyncio.start_server(connect, "127.0.0.1", 0)
    varnish = Varnish(tmp_path / "varnish", proxy.sockets[0].getsockname()[1])
    try:
        origin.args += ["--purge-url", varnish.purge_url]
        await origin.start()
        await varnish.start()
        async with aiohttp.ClientSession() as session:
            read = asyncio.create_task(session.get(f"{varnish.url}/counters/2/"))
            await asyncio.sleep(0.1)  # the read is at livecounter, its answer held in the proxy
            assert await (await session.post(f"{origin.url}/counters/2/")).text() == "1\n"
            assert await (await read).text() == "0\n"  # answered before the change, stored after its purge
            slow = False

            async def fresh():
                return await (await session.get(f"{varnish.url}/counters/2/")).text() == "1\n"
            await wait_until(fresh, timeout=3, message="the old answer purged again")
        await origin.stop()
    finally:
        await varnish.stop_or_kill()
        proxy.close()
