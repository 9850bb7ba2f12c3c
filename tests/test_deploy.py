"""deploy/'s systemd units, and socket activation as they use it.

Socket activation is run for real: a test holds a listening socket and starts `python livecounter.py`
with it as systemd does (descriptor 3, LISTEN_PID, LISTEN_FDS), restarts included; and through
`systemd-socket-activate`. The units are checked with `systemd-analyze` (verify, and an offline
security rating), and livecounter runs under their system call filters (tests/systemd_sandbox.py).
PID 1 is not systemd here, so no unit is started.

systemd-analyze and systemd-socket-activate come with Debian's systemd package: without them these
tests are skipped on a developer's machine and fail under CI=true.
"""

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

import livecounter
from tests.helpers import SSE, Server, free_port, handshakes_while_frozen, read_until_value

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MAX_EXPOSURE = 2.5  # of systemd-analyze security's 0-10 (the service was 8.5 before its sandbox)


def systemd_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing: .ci/run installs Debian's systemd package")
        pytest.skip(f"needs {name}: apt-get install systemd")
    return path


def seccomp_filters(pid) -> int:
    return int(re.search(r"^Seccomp_filters:\s*(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


def listening_socket() -> socket.socket:
    """A listening socket, as a socket unit's: bound, listening, and held here through restarts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


@pytest.fixture
def processes():
    """The processes a test starts: killed at its end if still running, so a failed test leaves none."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


class ActivatedServer(Server):
    """`python livecounter.py` started as systemd starts a socket-activated service: the listening
    socket as descriptor 3, LISTEN_PID its own pid (sh sets $$, then execs: the pid stays) and
    LISTEN_FDS=1."""

    def __init__(self, processes: list, listening: socket.socket, data_file, *args, wrapper=()):
        super().__init__(data_file, *args)
        self.processes = processes
        self.listening = listening
        self.port = listening.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *wrapper, *self.command]

    async def launch(self):
        with open(self.log, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, *self.args, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=log,
                preexec_fn=functools.partial(os.dup2, self.listening.fileno(), 3), pass_fds=(3,))
        self.processes.append(self.process)

    async def start(self):
        await self.launch()
        line = await asyncio.wait_for(self.process.stdout.readline(), 10)
        assert f"serving {self.url}/ " in line.decode(), (line, self.log.read_text())
        return self


# --- socket activation -------------------------------------------------------------------------------

async def test_a_restart_on_a_passed_socket_refuses_nothing_and_loses_nothing(data_file, processes):
    listening = listening_socket()
    loop = asyncio.get_running_loop()
    acknowledged, failures, waited = 0, [], 0
    up_again = None  # when the second livecounter serves

    async def post_until(deadline):
        nonlocal acknowledged, waited
        # A connection per POST, as page views from many browsers: an idle keep-alive connection
        # that the stopping server closes is a different matter (clients retry those themselves).
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            while loop.time() < deadline:
                sent_before_the_second = up_again is None
                try:
                    async with session.post(f"{server.url}/counters/1/") as response:
                        if response.status != 200:
                            failures.append(f"{response.status} {await response.text()}")
                            continue
                        acknowledged += 1
                        waited += sent_before_the_second and up_again is not None  # the second answered
                except aiohttp.ClientError as error:
                    failures.append(repr(error))

    ignored_port = str(free_port())  # the passed socket is where it serves
    server = await ActivatedServer(processes, listening, data_file, "--port", ignored_port).start()
    posting = [asyncio.create_task(post_until(loop.time() + 2.5)) for _ in range(4)]
    await asyncio.sleep(0.5)
    assert await server.stop() == 0
    server = await ActivatedServer(processes, listening, data_file).start()
    up_again = loop.time()
    await asyncio.gather(*posting)
    assert await server.stop() == 0
    listening.close()
    assert failures == []
    assert waited > 0  # POSTs that no livecounter took when sent waited in the backlog for the next
    assert json.loads(data_file.read_text())["1"] == acknowledged


@pytest.mark.parametrize("socket_from", ["systemd", "its own"])
async def test_a_crowd_arriving_at_once_waits_in_the_listening_socket(data_file, processes, socket_from):
    """After a restart every browser reconnects at once: 600 connections opened while livecounter
    doesn't accept (stopped) are all queued by the listening socket, the socket unit's (Backlog=4096)
    or its own, not left to SYN retransmits (1 s, 3 s, ...): aiohttp listens again with 128 unless told."""
    if socket_from == "systemd":
        server = await ActivatedServer(processes, listening_socket(), data_file).start()
    else:
        server = await Server(data_file).start()
    assert await asyncio.to_thread(handshakes_while_frozen, [server.process.pid], server.port) == 600
    assert await server.stop() == 0


async def test_it_serves_through_systemd_socket_activate(data_file, processes):
    program = systemd_program("systemd-socket-activate")
    port = free_port()
    log = data_file.with_suffix(".log")
    with open(log, "ab") as log_file:
        # It listens, and at the first connection execs livecounter in its place with the socket.
        process = await asyncio.create_subprocess_exec(
            program, "--listen", f"127.0.0.1:{port}", "--fdname", "http",
            sys.executable, str(ROOT / "livecounter.py"), "--data", str(data_file),
            stdout=asyncio.subprocess.PIPE, stderr=log_file)
    processes.append(process)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(100):  # until systemd-socket-activate listens
            try:
                response = await session.post(f"http://127.0.0.1:{port}/counters/1/")
                break
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.05)
        assert (response.status, await response.text()) == (200, "1\n"), log.read_text()
    line = await asyncio.wait_for(process.stdout.readline(), 10)
    assert f"serving http://127.0.0.1:{port}/ " in line.decode()
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0
    assert json.loads(data_file.read_text())["1"] == 1


def test_sockets_passed_to_another_process_are_left_alone_and_the_variables_removed(monkeypatch):
    # LISTEN_PID names the process the sockets are for: a parent that didn't take them, not this one.
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "http")
    assert livecounter.passed_sockets() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)  # no child inherits them


async def test_a_passed_descriptor_that_is_not_listening_stops_the_server_with_one_clear_line(data_file, processes):
    not_listening = socket.socket()  # as a socket unit with Accept=yes would pass: not listening
    server = ActivatedServer(processes, not_listening, data_file)
    await server.launch()
    await asyncio.wait_for(server.process.communicate(), 10)
    assert server.process.returncode == 2
    lines = server.log.read_text().splitlines()
    assert lines == ["livecounter: descriptor 3 from systemd is not a listening stream socket "
                     "(the socket unit needs ListenStream= and Accept=no)"]
    not_listening.close()


# --- the units -----------------------------------------------------------------------------------------

def test_the_units_pass_systemd_analyze_verify(tmp_path):
    program = systemd_program("systemd-analyze")
    # verify checks that ExecStart's program exists: the units as installed in /opt/livecounter, with
    # this checkout and its Python in its place.
    service = (DEPLOY / "livecounter.service").read_text()
    service = service.replace("/opt/livecounter/venv/bin/python", sys.executable)
    (tmp_path / "livecounter.service").write_text(service.replace("/opt/livecounter", str(ROOT)))
    shutil.copy(DEPLOY / "livecounter.socket", tmp_path)
    result = subprocess.run([program, "verify", tmp_path / "livecounter.service", tmp_path / "livecounter.socket"],
                            capture_output=True, text=True, timeout=60)
    # verify also exits 0 on settings it ignores (a typo, a bad value): those are printed, so nothing may be.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_service_is_sandboxed():
    program = systemd_program("systemd-analyze")
    result = subprocess.run([program, "security", "--offline=true", DEPLOY / "livecounter.service"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    exposure = re.search(r"Overall exposure level for livecounter\.service: (\d+\.\d+)", result.stdout)
    assert exposure, result.stdout
    assert float(exposure.group(1)) <= MAX_EXPOSURE, "\n".join(
        line for line in result.stdout.splitlines() if line.startswith("✗"))


@pytest.mark.parametrize("mode", [[], ["--durable"]], ids=["write-behind", "durable"])
async def test_it_works_under_the_services_system_call_filters(data_file, processes, mode):
    # SystemCallFilter=, MemoryDenyWriteExecute=, RestrictAddressFamilies=, UMask= as systemd 252
    # applies them, on a passed socket: streams, increments, saves and the final save on SIGTERM.
    systemd_program("systemd-analyze")  # the sandbox expands the filter's groups with it
    sandbox = (sys.executable, str(ROOT / "tests" / "systemd_sandbox.py"), str(DEPLOY / "livecounter.service"),
               "--")
    listening = listening_socket()
    server = await ActivatedServer(processes, listening, data_file, "--save-interval", "0.1", *mode,
                                   wrapper=sandbox).start()
    assert seccomp_filters(server.process.pid) == seccomp_filters("self") + 3  # applied (a container adds its own)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        stream = await session.get(f"{server.url}/counters/2/", headers=SSE)
        for _ in range(20):
            assert (await session.post(f"{server.url}/counters/2/")).status == 200
        assert (await read_until_value(stream, 20))[-1] == 20
        assert "livecounter_increments_total 20" in await (await session.get(f"{server.url}/metrics")).text()
        stream.close()
    assert await server.stop() == 0
    listening.close()
    assert json.loads(data_file.read_text())["2"] == 20
