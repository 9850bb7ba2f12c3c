"""Counters in Redis (--redis): real redis-server and redis-sentinel processes (Debian's packages,
7.0), private to each test (their own ports and directories), and `python livecounter.py` processes
sharing them: changes reach every process's streams, watcher counts are summed, writes survive a
Redis killed and restarted and a Sentinel failover, --workers share one port.

Without redis-server these tests skip on a developer's machine and fail under CI=true (`.ci/run`
installs it).
"""

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import HERE, SSE, Server, free_port, handshakes_while_frozen, metric, read_retry, wait_until


def need_redis(program="redis-server"):
    if shutil.which(program) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is missing: .ci/run installs it with apt-get")
        pytest.skip(f"needs Debian's {program}: apt-get install redis-server redis-sentinel")


class Redis:
    """A private redis-server in the foreground: its own port and directory, the changes it acknowledges
    on disk (appendonly, appendfsync always) unless told otherwise."""

    def __init__(self, directory: Path, *args: str, port: int | None = None, appendfsync: str = "always") -> None:
        need_redis()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
                     "--appendonly", "yes", "--appendfsync", appendfsync, "--logfile", str(directory / "redis.log"),
                     *args]
        self.url = f"redis://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None

    async def start(self) -> "Redis":
        self.process = subprocess.Popen(["redis-server", *self.args], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        await wait_until(lambda: self.answers(), timeout=10, message=f"redis-server on {self.port} answers")
        return self

    def answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up, with a password or not
        return False

    def command(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
async def redis(tmp_path):
    server = await Redis(tmp_path / "redis").start()
    yield server
    server.kill()


def livecounter(data_file, redis_url, *args, env=None):
    """python livecounter.py on the shared Redis, with the admin token "admin"."""
    return Server(data_file, "--redis", redis_url, "--no-access-log", "--max-listeners-per-ip", "10000", *args,
                  env={"LIVECOUNTER_ADMIN_TOKEN": "admin", **(env or {})})


async def follow(session, url, values):
    """Read a stream's values into the list values, until cancelled."""
    response = await session.get(url, headers=SSE)
    assert response.status == 200, await response.text()
    await read_retry(response)
    while block := await response.content.readuntil(b"\n\n"):
        if found := re.search(rb"data: (\d+)", block):
            values.append(int(found[1]))


# --- two processes, one Redis ---------------------------------------------------------------------

async def test_two_processes_share_their_counters_and_every_stream_follows(redis, data_file):
    first, second = await livecounter(data_file, redis.url).start(), await livecounter(data_file, redis.url).start()
    async with aiohttp.ClientSession() as session:
        seen = []
        reader = asyncio.create_task(follow(session, f"{second.url}/counters/2/", seen))
        await wait_until(lambda: seen == [0])
        started = time.monotonic()
        assert await (await session.post(f"{first.url}/counters/2/")).text() == "1\n"
        await wait_until(lambda: seen == [0, 1], timeout=1, message="the other process's stream has it within 1 s")
        assert time.monotonic() - started < 1
        assert await (await session.get(f"{second.url}/counters/2/")).text() == "1\n"
        put = await session.put(f"{second.url}/counters/new/", json={"value": 41}, headers={"Authorization": "Bearer admin"})
        assert (put.status, await put.text()) == (200, "41\n")
        assert await (await session.post(f"{first.url}/counters/new/")).text() == "42\n"
        assert (await session.get(f"{second.url}/counters/")).status == 200
        assert (await (await session.get(f"{second.url}/counters/")).json())["new"] == 42
        assert (await session.delete(f"{first.url}/counters/new/", headers={"Authorization": "Bearer admin"})).status == 204
        await wait_until(lambda: _status(session, f"{second.url}/counters/new/", 404))
        reader.cancel()
    assert await first.stop() == 0 and await second.stop() == 0


async def _status(session, url, status):
    return (await session.get(url)).status == status


async def test_2000_posts_over_two_processes_lose_none_and_every_stream_ends_on_the_last(redis, data_file):
    processes = [await livecounter(data_file, redis.url).start() for _ in range(2)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        streams = [[] for _ in range(10)]
        readers = [asyncio.create_task(follow(session, f"{processes[n % 2].url}/counters/5/", values))
                   for n, values in enumerate(streams)]
        await wait_until(lambda: all(values == [0] for values in streams))
        answers = []

        async def post(process, count):
            for _ in range(count):
                answers.append(int(await (await session.post(f"{process.url}/counters/5/")).text()))
        await asyncio.gather(*(post(processes[n % 2], 100) for n in range(20)))
        assert sorted(answers) == list(range(1, 2001)), "every answer a different value: none lost, none twice"
        await wait_until(lambda: all(values[-1] == 2000 for values in streams), timeout=5,
                         message="every stream on both ends on 2000")
        for values in streams:
            assert values == sorted(values), "a stream went backwards"
        for reader in readers:
            reader.cancel()
        for process in processes:
            assert await (await session.get(f"{process.url}/counters/5/")).text() == "2000\n"
    assert redis.command("HGET", "{livecounter}:values", "5") == "2000"
    for process in processes:
        assert await process.stop() == 0


async def test_a_counter_watched_on_two_processes_counts_on_both(redis, data_file):
    first, second = await livecounter(data_file, redis.url).start(), await livecounter(data_file, redis.url).start()
    async with aiohttp.ClientSession() as session:
        counts = []
        count_reader = asyncio.create_task(follow(session, f"{first.url}/counters/3/watchers/", counts))
        here, there = [], []
        readers = [asyncio.create_task(follow(session, f"{first.url}/counters/3/", here)),
                   asyncio.create_task(follow(session, f"{second.url}/counters/3/", there))]

        async def watchers(process, expected):
            return await (await session.get(f"{process.url}/counters/3/watchers/")).text() == f"{expected}\n"
        await wait_until(lambda: watchers(first, 2), timeout=3, message="both streams counted on the first")
        await wait_until(lambda: watchers(second, 2), timeout=3, message="both streams counted on the second")
        await wait_until(lambda: counts and counts[-1] == 2, timeout=3, message="a stream of the count says 2")
        second.process.kill()  # a process that dies stops counting within a few seconds
        await second.process.communicate()
        await wait_until(lambda: watchers(first, 1), timeout=6, message="the dead process's stream uncounted")
        await wait_until(lambda: counts[-1] == 1, timeout=3)
        for reader in [*readers, count_reader]:
            reader.cancel()
    assert await first.stop() == 0


async def test_counts_read_from_redis_last_only_until_their_process_would_be_silent_too_long(redis, data_file):
    """A process (a worker restarted after a kill -9, say) that reads a dead process's counts while they
    last in Redis counts them until 3.5 s after that process's last heartbeat, not 3.5 s after it read them."""
    process = await livecounter(data_file, redis.url).start()
    async with aiohttp.ClientSession() as session:
        # A process that died 3 s after its last heartbeat: its counts expire in 0.5 s (they are kept
        # for 3.5 s after each). The message r makes the live process read every count anew.
        redis.command("HSET", "{livecounter}:watchers:ghost", "3", "5")
        redis.command("PEXPIRE", "{livecounter}:watchers:ghost", "500")
        redis.command("PUBLISH", "{livecounter}:changes", "r")
        read = time.monotonic()

        async def counted(expected):
            return await (await session.get(f"{process.url}/counters/3/watchers/")).text() == f"{expected}\n"
        await asyncio.sleep(0.2)
        await wait_until(lambda: counted(0), timeout=max(0.1, read + 2.0 - time.monotonic()),
                         message="uncounted within 0.5 s and a heartbeat, not 3.5 s after it was read")
    assert await process.stop() == 0


async def test_the_data_file_seeds_an_empty_redis_once(redis, tmp_path):
    first_file = tmp_path / "first.json"
    first_file.write_text(json.dumps({"a": 5, "b": 7}))
    process = await livecounter(first_file, redis.url).start()
    async with aiohttp.ClientSession() as session:
        assert await (await session.get(f"{process.url}/counters/")).json() == {"a": 5, "b": 7}
        await session.post(f"{process.url}/counters/a/")
    await process.stop()
    assert json.loads(first_file.read_text()) == {"a": 5, "b": 7}, "with --redis the data file is only read"
    other_file = tmp_path / "other.json"
    other_file.write_text(json.dumps({"c": 1}))
    process = await livecounter(other_file, redis.url).start()
    async with aiohttp.ClientSession() as session:  # Redis had counters: the other file is not put in
        assert await (await session.get(f"{process.url}/counters/")).json() == {"a": 6, "b": 7}
    await process.stop()


async def test_auto_create_its_limit_and_the_largest_value_hold_on_redis(redis, data_file):
    first = await livecounter(data_file, redis.url, "--auto-create", "--max-counters", "10").start()
    second = await livecounter(data_file, redis.url, "--auto-create", "--max-counters", "10").start()
    async with aiohttp.ClientSession() as session:
        assert await (await session.get(f"{second.url}/counters/page/")).text() == "0\n"  # readable, not made
        assert await (await session.post(f"{first.url}/counters/page/")).text() == "1\n"  # made: the 10th
        refused = await session.post(f"{second.url}/counters/one-too-many/")
        assert (refused.status, await refused.text()) == (
            403, "counter 'one-too-many' not created: the limit of 10 counters is reached\n")
        await session.put(f"{first.url}/counters/1/", json={"value": 2**53 - 1}, headers={"Authorization": "Bearer admin"})
        assert (await session.post(f"{second.url}/counters/1/")).status == 409
        assert (await session.delete(f"{second.url}/counters/nope/", headers={"Authorization": "Bearer admin"})).status == 404
        listing = await (await session.get(f"{second.url}/counters/?limit=3")).json()
        assert list(listing) == ["1", "2", "3"]  # the order they were made: the data file's, then new ones
    assert await first.stop() == 0 and await second.stop() == 0


# --- Redis failing -------------------------------------------------------------------------------

async def test_with_redis_down_writes_are_refused_at_once_reads_go_on_and_streams_catch_up(redis, data_file):
    processes = [await livecounter(data_file, redis.url).start() for _ in range(2)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        seen = [[], []]
        readers = [asyncio.create_task(follow(session, f"{process.url}/counters/1/", values))
                   for process, values in zip(processes, seen)]
        for _ in range(5):
            await session.post(f"{processes[0].url}/counters/1/")
        await wait_until(lambda: all(values and values[-1] == 5 for values in seen))
        posting, acknowledged, refused_times = True, 0, []

        async def load(process):
            nonlocal acknowledged
            while posting:
                started = time.monotonic()
                response = await session.post(f"{process.url}/counters/1/")
                if response.status == 200:
                    acknowledged += 1
                else:
                    assert response.status == 503 and response.headers["Retry-After"].isdigit()
                    refused_times.append(time.monotonic() - started)
                    await asyncio.sleep(0.05)
        loads = [asyncio.create_task(load(process)) for process in processes]
        await asyncio.sleep(0.5)
        redis.kill()  # under load
        await wait_until(lambda: len(refused_times) > 20, timeout=10)
        assert max(refused_times) < 2, "a refusal came within 2 s"
        for process in processes:
            health = await session.get(f"{process.url}/healthz")
            assert health.status == 503 and f"Redis at {redis.url}" in await health.text()
            assert await metric(session, process.url, "redis_failing") == 1
            read = await session.get(f"{process.url}/counters/1/")  # the last value it knows
            assert read.status == 200 and int(await read.text()) >= 5
        redis.process = (await Redis(redis.directory, port=redis.port).start()).process  # the same files
        await wait_until(lambda: _all_healthy(session, processes), timeout=10, message="healthy again")
        posting = False
        await asyncio.gather(*loads)
        final = int(await (await session.post(f"{processes[1].url}/counters/1/")).text())
        assert final >= 5 + acknowledged + 1, "no acknowledged increment lost"
        await wait_until(lambda: all(values[-1] == final for values in seen), timeout=3,
                         message="the streams opened before the outage follow on")
        for values in seen:
            assert values == sorted(values)
        for reader in readers:
            reader.cancel()
    for process in processes:
        assert await process.stop() == 0


async def _all_healthy(session, processes):
    return all([(await session.get(f"{process.url}/healthz")).status == 200 for process in processes])


async def restart_empty(redis):
    """Redis killed and started again with nothing: its files gone, as a Redis without persistence."""
    redis.kill()
    for file in redis.directory.iterdir():
        if file.name != "redis.log":
            shutil.rmtree(file) if file.is_dir() else file.unlink()
    redis.process = (await Redis(redis.directory, port=redis.port).start()).process


async def listing(session, url):
    response = await session.get(f"{url}/counters/")
    return await response.json() if response.status == 200 else None


async def test_a_redis_restarted_empty_gets_the_counters_back_and_every_process_follows(redis, data_file):
    processes = [await livecounter(data_file, redis.url).start() for _ in range(2)]
    admin = {"Authorization": "Bearer admin"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(20):
            assert (await session.post(f"{processes[0].url}/counters/3/")).status == 200
        seen = []
        reader = asyncio.create_task(follow(session, f"{processes[1].url}/counters/3/", seen))
        await wait_until(lambda: seen == [20])
        await restart_empty(redis)
        await wait_until(lambda: redis.command("HGET", "{livecounter}:values", "3") == "20", timeout=5,
                         message="a running process put its counters back into Redis")
        put = await session.put(f"{processes[0].url}/counters/3/", json={"value": 5}, headers=admin)
        assert (put.status, await put.text()) == (200, "5\n"), await put.text()
        assert await (await session.post(f"{processes[1].url}/counters/3/")).text() == "6\n"
        for process in processes:
            await wait_until(lambda: _value(session, f"{process.url}/counters/3/", "6\n"), timeout=3,
                             message="each process follows the counter made anew in Redis")
        await wait_until(lambda: seen[-1:] == [6], timeout=3, message="a stream opened before the restart follows")
        reader.cancel()
        lists = [await listing(session, process.url) for process in processes]
        assert lists[0] == lists[1] == {**json.loads(data_file.read_text()), "3": 6}
    for process in processes:
        assert await process.stop() == 0
    assert "Traceback" not in processes[0].log.read_text() + processes[1].log.read_text()


async def test_a_redis_flushed_under_running_processes_gets_their_counters_back(redis, data_file):
    """FLUSHALL breaks no connection: the heartbeat sees the counters gone."""
    processes = [await livecounter(data_file, redis.url).start() for _ in range(2)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(3):
            await session.post(f"{processes[0].url}/counters/2/")
        redis.command("FLUSHALL")
        await wait_until(lambda: _status_of_post(session, f"{processes[1].url}/counters/2/", 200), timeout=5,
                         message="changes taken again within a heartbeat and a copy put back")
        for process in processes:
            await wait_until(lambda: _value(session, f"{process.url}/counters/2/", "4\n"), timeout=3,
                             message="every process on the value the copy put back, plus the POST after it")
        health = await session.get(f"{processes[0].url}/healthz")
        assert health.status == 200, await health.text()
    for process in processes:
        assert await process.stop() == 0


async def test_a_copy_going_back_into_redis_survives_redis_stalling_meanwhile(redis, tmp_path):
    import redis as redis_py
    many = tmp_path / "many.json"
    many.write_text(json.dumps({f"c{n}": n for n in range(100_000)}))
    processes = [await livecounter(many, redis.url).start() for _ in range(2)]
    client = redis_py.Redis(port=redis.port)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await restart_empty(redis)
        deadline = time.monotonic() + 10
        while not (client.get("{livecounter}:seeded") or b"").startswith(b"in progress"):
            assert time.monotonic() < deadline, "a running process puts its copy back"
            await asyncio.sleep(0.002)
        client.client_pause(1500)  # Redis stalls while the copy goes back: its commands time out
        paused = time.monotonic()
        await wait_until(lambda: _status_of_post(session, f"{processes[0].url}/counters/c3/", 200), timeout=15,
                         message="the copy is put back once Redis answers: not after the seed's key expired")
        assert time.monotonic() - paused < 15
        assert client.hlen("{livecounter}:values") == 100_000
    client.close()
    for process in processes:
        assert await process.stop() == 0


async def test_a_redis_restarted_empty_under_a_process_with_no_counters_takes_changes_again(redis, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    process = await livecounter(empty, redis.url, "--auto-create").start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await restart_empty(redis)
        await wait_until(lambda: _status_of_post(session, f"{process.url}/counters/page/", 200), timeout=5,
                         message="changes are taken again: nothing to put back is something to put back")
    assert await process.stop() == 0


async def _status_of_post(session, url, status):
    return (await session.post(url)).status == status


async def _value(session, url, text):
    response = await session.get(url)
    return response.status == 200 and await response.text() == text


async def test_a_process_started_on_a_redis_that_lost_its_counters_agrees_with_the_running_ones(redis, tmp_path):
    """Whichever fills the empty Redis first, the running process (its latest values) or the starting
    one (its data file), every process ends up with what Redis has."""
    for round_ in range(3):
        running_file, starting_file = tmp_path / f"running-{round_}.json", tmp_path / f"starting-{round_}.json"
        running_file.write_text(json.dumps({"a": 1, "b": 2}))
        starting_file.write_text(json.dumps({"c": 3}))
        running = await livecounter(running_file, redis.url).start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await session.post(f"{running.url}/counters/a/")
            await restart_empty(redis)
            await asyncio.sleep(0.3 * round_)  # the race both ways
            starting = await livecounter(starting_file, redis.url).start()

            async def agreed():
                lists = [await listing(session, process.url) for process in (running, starting)]
                in_redis = {key: int(value) for key, value in zip(
                    *[iter(redis.command("HGETALL", "{livecounter}:values").split())] * 2)}
                return lists[0] == lists[1] == in_redis != {}
            await wait_until(agreed, timeout=5, message="both processes list what Redis has")
        assert await running.stop() == 0 and await starting.stop() == 0
        redis.command("FLUSHALL")


async def test_writes_are_taken_again_within_two_seconds_of_redis_coming_back(redis, data_file):
    process = await livecounter(data_file, redis.url).start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(2):  # the heartbeat's second, not a delay grown through the outage (up to 5 s)
            redis.kill()
            await asyncio.sleep(10)
            redis.process = (await Redis(redis.directory, port=redis.port).start()).process
            back = time.monotonic()
            while (await session.post(f"{process.url}/counters/1/")).status != 200:
                assert time.monotonic() - back < 2.5, "a POST is taken within 2.5 s of Redis answering again"
                await asyncio.sleep(0.05)
    assert await process.stop() == 0
    log = process.log.read_text()
    assert "Traceback" not in log, "a Redis that is down is no bug: " + log


async def test_durable_on_a_redis_that_does_not_fsync_every_change_is_refused_at_the_start(tmp_path, data_file):
    redis = await Redis(tmp_path / "redis", appendfsync="everysec").start()
    try:
        process = livecounter(data_file, redis.url, "--durable")
        child = await asyncio.create_subprocess_exec(*process.command, *process.args, env=process.env,
                                                     stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(child.communicate(), 20)
        assert child.returncode == 2
        [line] = stderr.decode().splitlines()[-1:]
        assert "appendfsync always" in line and "appendfsync everysec" in line, line
    finally:
        redis.kill()


async def test_a_sentinel_failover_under_durable_load_loses_no_acknowledged_increment(tmp_path, data_file):
    need_redis("redis-sentinel")
    primary = await Redis(tmp_path / "primary").start()
    replica = await Redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port)).start()
    await wait_until(lambda: "master_link_status:up" in replica.command("INFO", "replication"), timeout=10)
    sentinels = [await start_sentinel(tmp_path / f"sentinel{n}", primary.port) for n in range(3)]
    try:
        url = "redis+sentinel://" + ",".join(f"127.0.0.1:{port}" for port, _ in sentinels) + "/livecounter"
        process = await livecounter(data_file, url, "--durable").start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            posting, acknowledged, last_refusal, last_success = True, 0, 0.0, 0.0

            async def load():
                nonlocal acknowledged, last_refusal, last_success
                while posting:
                    response = await session.post(f"{process.url}/counters/1/")
                    if response.status == 200:
                        acknowledged += 1
                        last_success = time.monotonic()
                    else:
                        assert response.status == 503 and "Retry-After" in response.headers
                        last_refusal = time.monotonic()
                        await asyncio.sleep(0.05)
            loads = [asyncio.create_task(load()) for _ in range(4)]
            await wait_until(lambda: acknowledged > 50, timeout=10)
            killed = time.monotonic()
            primary.kill()
            await wait_until(lambda: last_refusal > killed, timeout=10, message="refusals while it fails over")
            await wait_until(lambda: last_success > last_refusal > killed, timeout=20 - (time.monotonic() - killed),
                             message="POSTs work again within 20 s")
            posting = False
            await asyncio.gather(*loads)
            final = int(await (await session.post(f"{process.url}/counters/1/")).text())
            assert final >= acknowledged + 1, f"acknowledged increments lost: {acknowledged} acknowledged, now {final}"
        await process.stop()
    finally:
        for _, sentinel in sentinels:
            sentinel.kill()
        primary.kill()
        replica.kill()


async def test_durable_refuses_changes_while_the_primary_stops_fsyncing_each_and_while_no_replica_answers(tmp_path, data_file):
    """The primary's settings are checked every second, not only at the start (a failover makes another
    Redis the primary): with appendfsync everysec changes are refused, and stay refused, until it is
    back to always. A replica that doesn't acknowledge (frozen) gets a change refused too."""
    primary = await Redis(tmp_path / "primary").start()
    replica = await Redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port)).start()
    await wait_until(lambda: "master_link_status:up" in replica.command("INFO", "replication"), timeout=10)
    try:
        process = await livecounter(data_file, primary.url, "--durable").start()
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: _status_of(session.post(f"{process.url}/counters/1/"), 200), timeout=5)
            primary.command("CONFIG", "SET", "appendfsync", "everysec")
            refused = await wait_until(lambda: _status_of(session.post(f"{process.url}/counters/1/"), 503), timeout=3)
            assert "appendfsync always" in await refused.text()
            for _ in range(15):  # refused for as long as it lasts, not every other time
                assert (await session.post(f"{process.url}/counters/1/")).status == 503
                await asyncio.sleep(0.1)
            assert "appendfsync always" in await (await session.get(f"{process.url}/healthz")).text()
            primary.command("CONFIG", "SET", "appendfsync", "always")
            await wait_until(lambda: _status_of(session.post(f"{process.url}/counters/1/"), 200), timeout=3)
            os.kill(replica.process.pid, signal.SIGSTOP)  # connected, but acknowledging nothing
            try:
                refused = await session.post(f"{process.url}/counters/1/")
                assert refused.status == 503
                assert "no replica of Redis" in await refused.text()
            finally:
                os.kill(replica.process.pid, signal.SIGCONT)
            await wait_until(lambda: _status_of(session.post(f"{process.url}/counters/1/"), 200), timeout=3)
        assert await process.stop() == 0
    finally:
        primary.kill()
        replica.kill()


async def _status_of(request, status):
    response = await request
    return response if response.status == status else None


async def test_a_password_reaches_redis_through_the_sentinels(tmp_path, data_file):
    need_redis("redis-sentinel")
    primary = await Redis(tmp_path / "primary", "--requirepass", "s3cret:w@rd").start()
    sentinel_port, sentinel = await start_sentinel(tmp_path / "sentinel", primary.port, password="s3cret:w@rd")
    try:
        url = f"redis+sentinel://:s3cret%3Aw%40rd@127.0.0.1:{sentinel_port}/livecounter"
        process = await livecounter(data_file, url).start()
        async with aiohttp.ClientSession() as session:
            assert await (await session.post(f"{process.url}/counters/1/")).text() == "1\n"
        assert await process.stop() == 0
        assert "s3cret" not in process.log.read_text()  # never shown
    finally:
        sentinel.kill()
        primary.kill()


async def start_sentinel(directory: Path, primary_port: int, password: str | None = None):
    directory.mkdir(parents=True)
    port = free_port()
    config = directory / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile {directory / 'sentinel.log'}\n"
                      f"sentinel monitor livecounter 127.0.0.1 {primary_port} {1 if password else 2}\n"
                      + (f"sentinel auth-pass livecounter {password}\n" if password else "") +
                      "sentinel down-after-milliseconds livecounter 1000\n"
                      "sentinel failover-timeout livecounter 5000\nsentinel parallel-syncs livecounter 1\n")
    process = subprocess.Popen(["redis-sentinel", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    sentinel = Redis.__new__(Redis)
    sentinel.port, sentinel.process = port, process
    await wait_until(lambda: sentinel.answers(), timeout=10)
    return port, sentinel


# --- workers on one port ---------------------------------------------------------------------------

async def test_workers_share_one_port_and_one_killed_leaves_the_others_serving(redis, data_file):
    supervisor = await livecounter(data_file, redis.url, "--workers", "2").start()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        leaders = set()
        for _ in range(200):  # a new connection each time: the workers take turns accepting
            leaders.add(await metric(session, supervisor.url, "redis_leader"))
            if leaders == {0, 1}:
                break
            await asyncio.sleep(0.02)
        assert leaders == {0, 1}, "both workers answered (one leads)"
        answers = await asyncio.gather(*(session.post(f"{supervisor.url}/counters/4/") for _ in range(200)))
        assert sorted([int(await answer.text()) for answer in answers]) == list(range(1, 201))
        workers = worker_pids(supervisor.process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        for expected in range(201, 221):  # every POST answered meanwhile, by the other
            response = await session.post(f"{supervisor.url}/counters/4/")
            assert (response.status, await response.text()) == (200, f"{expected}\n")
        await wait_until(lambda: len(worker_pids(supervisor.process.pid)) == 2, timeout=5, message="restarted")
    assert await supervisor.stop() == 0
    assert worker_pids(supervisor.process.pid) == []


async def test_a_crowd_arriving_at_once_waits_for_the_workers(redis, data_file):
    """The supervisor's socket queues a crowd that arrives while the workers are busy (stopped here):
    600 connections opened at once all complete their handshake, none left to SYN retransmits."""
    supervisor = await livecounter(data_file, redis.url, "--workers", "2").start()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        leaders = set()
        for _ in range(200):  # until both serve (listening on the socket as they do): one leads
            leaders.add(await metric(session, supervisor.url, "redis_leader"))
            if leaders == {0, 1}:
                break
        assert leaders == {0, 1}
    assert await asyncio.to_thread(handshakes_while_frozen, worker_pids(supervisor.process.pid), supervisor.port) == 600
    assert await supervisor.stop() == 0


async def test_workers_take_a_socket_from_systemd(redis, data_file):
    with socket.create_server(("127.0.0.1", 0), backlog=100) as listening:
        port = listening.getsockname()[1]
        command = [sys.executable, str(HERE / "livecounter.py"), "--data", str(data_file), "--redis", redis.url,
                   "--workers", "2"]
        process = await asyncio.create_subprocess_exec(
            "sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *command, pass_fds=(3,),
            stdout=asyncio.subprocess.PIPE, stderr=open(data_file.with_suffix(".log"), "wb"),
            preexec_fn=lambda: os.dup2(listening.fileno(), 3))
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
            assert f"serving http://127.0.0.1:{port}/ with 2 workers" in line
            async with aiohttp.ClientSession() as session:
                assert await (await session.post(f"http://127.0.0.1:{port}/counters/6/")).text() == "1\n"
        finally:
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 15) == 0


def worker_pids(supervisor: int) -> list[int]:
    """The processes whose parent is the supervisor, living."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            if int(fields[1]) == supervisor and fields[0] != "Z":
                pids.append(int(pid))
    return pids


async def test_workers_whose_start_is_refused_stop_the_supervisor(tmp_path, data_file):
    redis = await Redis(tmp_path / "redis", appendfsync="everysec").start()
    try:
        process = livecounter(data_file, redis.url, "--durable", "--workers", "2")
        child = await asyncio.create_subprocess_exec(*process.command, *process.args, env=process.env,
                                                     stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(child.communicate(), 20)
        assert child.returncode == 2, "as one process's start, refused: not tried again and again"
        assert "appendfsync always" in stderr.decode()
    finally:
        redis.kill()


async def test_workers_need_redis(data_file):
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "livecounter.py"), "--data", str(data_file), "--workers", "2",
        stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert stderr.decode() == "livecounter: --workers needs --redis: the processes keep their counters there, together\n"


def test_without_redis_no_redis_client_is_imported(tmp_path):
    code = (f"import sys, livecounter; livecounter.create_app({str(tmp_path / 'c.json')!r}); "
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('redis', 'hiredis', 'zmq')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE).stdout == "[]\n"
