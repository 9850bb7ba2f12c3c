"""kill -9 at random moments while clients increment concurrently, many cycles, in both modes."""

import asyncio
import contextlib
import json
import random
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ZEROS, Server, saved_values, wait_until

ROOT = Path(__file__).resolve().parent.parent
CYCLES = 12
CLIENTS = 8


@pytest.mark.parametrize("mode", [[], ["--durable"]], ids=["write-behind", "durable"])
async def test_the_data_file_survives_kill_9_and_durable_keeps_every_acknowledged_increment(tmp_path, mode):
    data_file = tmp_path / "counters.json"
    data_file.write_text(json.dumps(ZEROS))
    sent = acknowledged = 0
    for cycle in range(CYCLES):
        server = await Server(data_file, "--save-interval", "0.01", *mode).start()

        async def increment_until_killed(session):
            nonlocal sent, acknowledged
            try:
                while True:
                    sent += 1  # counted before it leaves: it may be applied even if never answered
                    response = await session.post(f"{server.url}/counters/1/")
                    acknowledged += response.status == 200
            except aiohttp.ClientError:
                pass

        async with aiohttp.ClientSession() as session:
            clients = [asyncio.create_task(increment_until_killed(session)) for _ in range(CLIENTS)]
            await asyncio.sleep(random.uniform(0.1, 0.5))
            await server.stop(signal.SIGKILL)
            await asyncio.gather(*clients)

        json.loads(data_file.read_text())  # the data file is whole, valid JSON
        counters = saved_values(data_file)  # what the next start takes from it and its journal
        assert set(counters) == {str(i) for i in range(1, 10)}, cycle
        assert counters["1"] <= sent, cycle
        if mode:
            assert counters["1"] >= acknowledged, f"cycle {cycle}: acknowledged increments were lost"
    assert acknowledged > CYCLES * CLIENTS


@pytest.mark.parametrize("mode", [[], ["--durable"]], ids=["write-behind", "durable"])
async def test_kill_9_while_a_stop_compacts_the_journal_loses_nothing_acknowledged(tmp_path, mode):
    """A stop folds the journal into the data file: with 200,000 counters that takes a moment, and a
    kill -9 lands in it (or just before, or after) at a random instant, cycle after cycle. The data
    file is always whole, and the next start (data file, then the journal set aside, then the new
    journal) has every increment acknowledged before the stop."""
    data_file = tmp_path / "counters.json"
    data_file.write_text(json.dumps({f"c{i}": 0 for i in range(200_000)}))
    compacting = tmp_path / "counters.json.journal.compacting"
    expected = hit_compaction = 0
    for cycle in range(6):
        server = await Server(data_file, "--save-interval", "0.05", *mode).start()
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                expected += (await session.post(f"{server.url}/counters/c1/")).status == 200
        await asyncio.sleep(0.1 if mode else 0.2)  # write-behind: the last save is within the interval
        server.process.send_signal(signal.SIGTERM)
        if cycle % 2:  # at a random instant of the stop
            await asyncio.sleep(random.uniform(0, 0.6))
        else:  # once the journal is set aside: the data file is being written (for ~0.1 s)
            deadline = time.monotonic() + 10
            while not compacting.exists() and server.process.returncode is None and time.monotonic() < deadline:
                await asyncio.sleep(0.002)  # wait_until's 50 ms would miss much of it
            await asyncio.sleep(random.uniform(0, 0.02))
            hit_compaction += compacting.exists()
        if server.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # unless the stop was done
                server.process.kill()
        await asyncio.wait_for(server.process.communicate(), 10)
        json.loads(data_file.read_text())  # whole, valid JSON
        assert saved_values(data_file)["c1"] == expected, f"cycle {cycle}: {sorted(p.name for p in tmp_path.iterdir())}"
    assert hit_compaction, "no kill landed while the data file was being written"


async def test_a_torn_journal_record_is_dropped_at_the_start_and_appends_follow_whole_ones(tmp_path):
    """What a crash in mid-append leaves: the start drops the torn record (nothing acknowledged was in
    it), says so, cuts it off, and the next saves append after the last whole record."""
    data_file = tmp_path / "counters.json"
    data_file.write_text(json.dumps(ZEROS))
    journal = tmp_path / "counters.json.journal"
    journal.write_bytes(b'{"1": 5}\n{"2": 3, "1": 6}\n{"1": 7, "3"')
    server = await Server(data_file, "--save-interval", "0.05").start()
    async with aiohttp.ClientSession() as session:
        assert await (await session.get(f"{server.url}/counters/1/")).text() == "6\n"
        assert await (await session.post(f"{server.url}/counters/3/")).text() == "1\n"
        await asyncio.sleep(0.3)
    assert journal.read_bytes() == b'{"1": 5}\n{"2": 3, "1": 6}\n{"3": 1}\n'
    await server.stop(signal.SIGKILL)
    assert saved_values(data_file) == {**ZEROS, "1": 6, "2": 3, "3": 1}
    assert "dropped a torn last record (12 bytes" in server.log.read_text()


async def test_a_journal_broken_before_its_last_record_stops_the_start_with_one_line(tmp_path):
    data_file = tmp_path / "counters.json"
    data_file.write_text(json.dumps(ZEROS))
    (tmp_path / "counters.json.journal").write_bytes(b'{"1": 5}\n{"1": \n{"1": 7}\n')
    server = Server(data_file)
    process = await asyncio.create_subprocess_exec(*server.command, *server.args, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    [line] = stderr.decode().splitlines()
    assert line.startswith(f"livecounter: {tmp_path / 'counters.json.journal'}: line 2 is no record")
