"""The shipped nginx site (deploy/nginx-livecounter.conf) in front of `python livecounter.py`, run by a
real nginx with only its ports and paths changed, and the README's page-view snippet in Chromium on
a page from another origin.

Without nginx these tests are skipped on a developer's machine and fail under CI=true (`.ci/run`
installs nginx-light). Without chromium the browser test does the same (see test_browser.py).
"""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import SSE, Server, frame, free_port, metric, read_frame, read_until_value, wait_until
from tests.test_browser import browser, open_page, other_origin, readme_snippet, shows, uncaught  # noqa: F401 (fixtures)
from tests.test_pushpin import SIG_KEY, Pushpin, needs_pushpin

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
ALLOW_ORIGIN = "Access-Control-Allow-Origin"


class Nginx:
    """A private nginx in a temp dir serving the shipped site, on a port of its own, in front of
    livecounter on `upstream_port`; with tls, its HTTPS (HTTP/2) server too, on `tls_port`, with a
    self-signed certificate for 127.0.0.1 made here."""

    def __init__(self, directory: Path, upstream_port: int, tls: bool = False) -> None:
        directory.mkdir(exist_ok=True)
        self.directory = directory
        self.port, self.tls_port = free_port(), free_port() if tls else None
        self.url = f"http://127.0.0.1:{self.port}/"
        self.tls_url = f"https://127.0.0.1:{self.tls_port}/"
        site = (ROOT / "deploy" / "nginx-livecounter.conf").read_text()
        for shipped, here in (("listen 80;", f"listen 127.0.0.1:{self.port};"),
                              ("listen [::]:80;", ""),
                              ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};"),
                              *self.tls_lines(tls)):
            assert site.count(shipped) == 1, f"the shipped site no longer says {shipped!r}: adapt this test"
            site = site.replace(shipped, here)
        if not tls:  # the HTTPS lines (the shipped ones, or certbot's) go: plain HTTP only
            site = re.sub(r"^\s*(listen .*\b(ssl|443)\b.*|ssl_\w+ .*|include .*letsencrypt.*|http2 .*)\n", "",
                          site, flags=re.M)
        (directory / "site.conf").write_text(site)
        temp_paths = "\n".join(f"    {kind}_temp_path {directory / kind};"
                               for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (directory / "nginx.conf").write_text(f"""
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {directory / "access.log"};
{temp_paths}
    include {directory / "site.conf"};
}}
""")
        self.process: asyncio.subprocess.Process | None = None

    def tls_lines(self, tls: bool) -> list[tuple[str, str]]:
        """What the shipped HTTPS lines become here, a certificate made for them."""
        if not tls:
            return []
        certificate, key = self.directory / "cert.pem", self.directory / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(certificate)], check=True, capture_output=True)
        return [("listen 443 ssl http2;", f"listen 127.0.0.1:{self.tls_port} ssl http2;"),
                ("listen [::]:443 ssl http2;", ""),
                ("ssl_certificate /etc/letsencrypt/live/counter.example.com/fullchain.pem;",
                 f"ssl_certificate {certificate};"),
                ("ssl_certificate_key /etc/letsencrypt/live/counter.example.com/privkey.pem;",
                 f"ssl_certificate_key {key};")]

    async def start(self) -> "Nginx":
        with open(self.directory / "nginx.out", "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                NGINX, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"),
                "-g", "daemon off;", stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while not port_open(self.port) or (self.tls_port and not port_open(self.tls_port)):
            assert self.process.returncode is None, (self.directory / "nginx.out").read_text()
            assert time.monotonic() < deadline, "nginx did not start listening"
            await asyncio.sleep(0.05)
        return self

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)  # fast shutdown: open streams don't hold it up
        await asyncio.wait_for(self.process.wait(), 10)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def behind_nginx(tmp_path, data_file, request):
    """`python livecounter.py` behind the shipped nginx site: (livecounter, nginx). Parametrized
    (indirect) with {"tls": True} the site's HTTPS server runs too; with {"counters": {...}} the data
    file holds those counters."""
    if NGINX is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing: .ci/run installs it with apt-get")
        pytest.skip("needs Debian's nginx: apt-get install nginx-light")
    setup = getattr(request, "param", {})
    if "counters" in setup:
        data_file.write_text(json.dumps(setup["counters"]))
    livecounter = await Server(data_file).start()
    nginx = Nginx(tmp_path / "nginx", livecounter.port, tls=setup.get("tls", False))
    try:
        await nginx.start()
        yield livecounter, nginx
    finally:
        if livecounter.process.returncode is None:
            await livecounter.stop()
        if nginx.process is not None and nginx.process.returncode is None:
            await nginx.stop()


async def stream_answer(port: int) -> bytes:
    """What an event-stream request gets (up to the end of the headers, or the connection's end)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /counters/1/ HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except asyncio.IncompleteReadError as closed:
        return closed.partial
    finally:
        writer.close()


async def test_nginx_error_answers_carry_the_cors_header_once(behind_nginx):
    livecounter, nginx = behind_nginx
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{nginx.url}counters/1/")  # livecounter's answer, passed through
        assert (response.status, response.headers.getall(ALLOW_ORIGIN)) == (200, ["*"])
        response = await session.get(f"{nginx.url}counters/nope/")  # livecounter's own error
        assert (response.status, response.headers.getall(ALLOW_ORIGIN)) == (404, ["*"])
        response = await session.post(f"{nginx.url}counters/1/", data=b"x" * 2048)  # nginx's 413
        assert (response.status, response.headers.getall(ALLOW_ORIGIN)) == (413, ["*"])


async def test_the_readme_snippet_behind_nginx_follows_a_restart_by_itself(behind_nginx, browser, other_origin):
    livecounter, nginx = behind_nginx
    snippet = (readme_snippet()
               .replace("https://code.jquery.com/jquery-3.7.1.min.js", "/jquery.min.js")
               .replace("https://counter.example.com/", nginx.url))
    blog = await other_origin(f"<!doctype html><title>blog</title><body>{snippet}</body>")
    errors = []
    page = await open_page(browser, blog, errors)
    await shows(page, "#views", "1")

    stopped = time.monotonic()
    assert await livecounter.stop() == 0
    async with aiohttp.ClientSession() as session:  # while livecounter is down
        response = await session.get(f"{nginx.url}counters/1/")
        assert (response.status, response.headers.getall(ALLOW_ORIGIN)) == (502, ["*"])
    assert await stream_answer(nginx.port) == b""  # dropped, not answered: EventSource retries
    await asyncio.sleep(6 - (time.monotonic() - stopped))
    await livecounter.start()  # the same port and data file

    async with aiohttp.ClientSession() as session:
        assert await (await session.post(f"{nginx.url}counters/1/")).text() == "2\n"
    await shows(page, "#views", "2", timeout=15_000)  # the page found the new process by itself
    assert uncaught(errors) == []


# --- HTTPS with HTTP/2: no six-connection limit ----------------------------------------------------

@pytest.mark.parametrize("behind_nginx", [{"tls": True}], ids=["https"], indirect=True)
async def test_the_https_server_serves_streams_over_http2(behind_nginx):
    livecounter, nginx = behind_nginx
    curl = await asyncio.create_subprocess_exec(
        "curl", "--http2", "--insecure", "--silent", "--no-buffer", "--max-time", "2",
        "--header", "Accept: text/event-stream", "--write-out", "\nhttp_version=%{http_version}\n",
        f"{nginx.tls_url}counters/1/", stdout=asyncio.subprocess.PIPE)
    out, _ = await curl.communicate()  # curl gives up after 2 s: the stream stays open
    assert b"event: message\ndata: 0\n\n" in out, out
    assert out.endswith(b"\nhttp_version=2\n"), out


MANY = {f"c{i:03d}": 0 for i in range(800)}  # eight streams of 100 counters


@pytest.mark.parametrize("behind_nginx", [{"tls": True, "counters": MANY}], ids=["https"], indirect=True)
async def test_a_page_of_eight_streams_is_live_over_http2(behind_nginx, browser, other_origin):
    # Over HTTP/1.1 two of the eight would wait for a connection, 200 counters blank, for ever.
    livecounter, nginx = behind_nginx
    spans = "".join(f'<span data-livecounter="{name}">…</span> ' for name in MANY)
    blog = await other_origin(f"""<!doctype html><title>blog</title><body><p>{spans}</p>
        <script src="{nginx.tls_url}embed.js"></script></body>""")
    context = await browser.new_context(ignore_https_errors=True)  # the test's self-signed certificate
    errors = []
    page = await open_page(context, blog, errors)
    await shows(page, "[data-livecounter]", "0", timeout=15_000)
    async with aiohttp.ClientSession() as session:
        assert await metric(session, livecounter.url, "listeners") == 8
        await session.post(f"{nginx.url}counters/c799/")
        await session.post(f"{nginx.url}counters/c000/")
    await shows(page, "[data-livecounter='c799']", "1")
    await shows(page, "[data-livecounter='c000']", "1")
    await page.wait_for_function("[...document.querySelectorAll('[data-livecounter]')]"
                                 ".every((element) => element.dataset.livecounterState === 'live')")
    await context.close()
    assert errors == []

    def streams_logged():  # nginx logs a request when it ends: the streams, now that the tabs closed
        log = (nginx.directory / "access.log").read_text()
        return re.findall(r'"GET /counters/\?ids=\S+ (HTTP/[\d.]+)"', log) if '"GET /embed.js HTTP/2.0"' in log else []
    assert await wait_until(lambda: len(streams_logged()) >= 8) and set(streams_logged()) == {"HTTP/2.0"}


# --- the site in front of Pushpin ---------------------------------------------------------------------

async def test_in_front_of_pushpin_streams_are_held_there_and_livecounter_sees_each_client(tmp_path, data_file):
    """The documented variant with Pushpin (README, "Scaling out"): the site's upstream is Pushpin's
    port (7999 shipped) instead of livecounter's, so nginx keeps TLS and HTTP/2, and Pushpin, from the
    shipped config, passes nginx's X-Forwarded-For on as it came: appending its own peer (nginx, at
    127.0.0.1) would make every client 127.0.0.1 to --trust-proxy, one --post-rate budget for all.
    While livecounter is down, Pushpin's 502 becomes nginx's: an event stream is dropped unanswered."""
    if NGINX is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing: .ci/run installs it with apt-get")
        pytest.skip("needs Debian's nginx: apt-get install nginx-light")
    needs_pushpin()
    livecounter = Server(data_file, "--trust-proxy", "--post-rate", "1")
    (tmp_path / "pushpin").mkdir()
    pushpin = Pushpin(tmp_path / "pushpin", livecounter.port)
    nginx = Nginx(tmp_path / "nginx", pushpin.http_port, tls=True)
    try:
        await pushpin.start()
        livecounter.args += ["--grip-url", pushpin.grip_url, "--grip-key", SIG_KEY]
        await livecounter.start()
        await nginx.start()
        async with aiohttp.ClientSession() as session:
            listener = await session.get(f"{nginx.url}counters/3/", headers=SSE)
            assert listener.status == 200 and "Grip-Hold" not in listener.headers
            assert await read_frame(listener) == frame(0)
            assert await metric(session, livecounter.url, "listeners") == 0  # Pushpin holds it
            # Three clients at addresses of their own: a view a second each (bursts of two), all taken.
            for value, address in enumerate(("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.4"), 1):
                client = aiohttp.TCPConnector(local_addr=(address, 0))
                async with aiohttp.ClientSession(connector=client) as browser:
                    async with browser.post(f"{nginx.url}counters/3/") as response:
                        assert (response.status, await response.text()) == (200, f"{value}\n"), address
            assert (await read_until_value(listener, 4))[-1] == 4
        posts = [line.split(" INFO aiohttp.access: ")[1].split(" ")[0]
                 for line in livecounter.log.read_text().splitlines() if '"POST /counters/3/ ' in line]
        assert posts == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.4"]

        curl = await asyncio.create_subprocess_exec(  # HTTPS and HTTP/2 from nginx, the stream from Pushpin
            "curl", "--http2", "--insecure", "--silent", "--no-buffer", "--max-time", "2",
            "--header", "Accept: text/event-stream", "--write-out", "\nhttp_version=%{http_version}\n",
            f"{nginx.tls_url}counters/3/", stdout=asyncio.subprocess.PIPE)
        out, _ = await curl.communicate()
        assert b"event: message\ndata: 4\n\n" in out and out.endswith(b"\nhttp_version=2\n"), out

        assert await livecounter.stop() == 0
        assert await stream_answer(nginx.port) == b""  # dropped, not Pushpin's 502: EventSource retries
        async with aiohttp.ClientSession() as session:
            response = await session.get(f"{nginx.url}counters/3/")
            assert (response.status, response.headers.getall(ALLOW_ORIGIN)) == (502, ["*"])
    finally:
        if getattr(livecounter, "process", None) is not None and livecounter.process.returncode is None:
            await livecounter.stop()
        if nginx.process is not None and nginx.process.returncode is None:
            await nginx.stop()
        if pushpin.process is not None and pushpin.process.returncode is None:
            await pushpin.stop()
        pushpin.kill()
