"""The shipped nginx site (deploy/nginx-livecounter.conf) in front of `python livecounter.py`, run by a
real nginx with only its ports and paths changed, and the README's page-view snippet in Chromium on
a page from another origin.

Without nginx these tests are skipped on a developer's machine and fail under CI=true (`.ci/run`
installs nginx-light). Without chromium the browser test does the same (see test_browser.py).
"""

import asyncio
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from test_browser import browser, open_page, other_origin, readme_snippet, shows, uncaught  # noqa: F401 (fixtures)
from conftest import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
ALLOW_ORIGIN = "Access-Control-Allow-Origin"


class Nginx:
    """A private nginx in a temp dir serving the shipped site, on a port of its own, in front of
    livecounter on `upstream_port`."""

    def __init__(self, directory: Path, upstream_port: int) -> None:
        directory.mkdir(exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        site = (ROOT / "deploy" / "nginx-livecounter.conf").read_text()
        for shipped, here in (("listen 80;", f"listen 127.0.0.1:{self.port};"),
                              ("listen [::]:80;", ""),
                              ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")):
            assert site.count(shipped) == 1, f"the shipped site no longer says {shipped!r}: adapt this test"
            site = site.replace(shipped, here)
        # Should the site get TLS (certbot's lines), it is served in plain HTTP here.
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

    async def start(self) -> "Nginx":
        with open(self.directory / "nginx.out", "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                NGINX, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"),
                "-g", "daemon off;", stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while not port_open(self.port):
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
async def behind_nginx(tmp_path, data_file):
    """`python livecounter.py` behind the shipped nginx site: (livecounter, nginx)."""
    if NGINX is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing: .ci/run installs it with apt-get")
        pytest.skip("needs Debian's nginx: apt-get install nginx-light")
    livecounter = await Server(data_file).start()
    nginx = Nginx(tmp_path / "nginx", livecounter.port)
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
