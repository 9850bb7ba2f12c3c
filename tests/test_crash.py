"""kill -9 at random moments while clients increment concurrently, many cycles, in both modes."""

import asyncio
import json
import random
import signal
from pathlib import Path

import aiohttp
import pytest

from conftest import ZEROS, Server

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

        counters = json.loads(data_file.read_text())  # valid JSON, every counter there
        assert set(counters) == {str(i) for i in range(1, 10)}, cycle
        assert counters["1"] <= sent, cycle
        if mode:
            assert counters["1"] >= acknowledged, f"cycle {cycle}: acknowledged increments were lost"
    assert acknowledged > CYCLES * CLIENTS
