"""A real full disk: the data file on a 64 KiB tmpfs that a filler file fills up.

Mounting needs root (CI runs as root); elsewhere these tests are skipped, and under CI=true they fail.
"""

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from pathlib import Path

import aiohttp
import pytest

import livecounter
from livecounter import create_app
from tests.helpers import ZEROS, Server, read_frame, saved_values, wait_until

ROOT = Path(__file__).resolve().parent.parent


class SmallDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        with open(self.filler, "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass  # full

    def free(self) -> None:
        self.filler.unlink()


@contextlib.contextmanager
def tmpfs(tmp_path, size):
    """A tmpfs of `size` (mount's size=, "64k") at tmp_path/disk, for the test's duration (root only)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a tmpfs needs root; CI runs as root")
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path, "64k") as mount_point:
        (mount_point / "counters.json").write_text(json.dumps(ZEROS))
        yield SmallDisk(mount_point)


async def test_durable_refuses_increments_while_the_disk_is_full_then_catches_up(aiohttp_client, small_disk):
    data_file = small_disk.path / "counters.json"
    client = await aiohttp_client(create_app(data_file, durable=True))
    for _ in range(3):
        assert (await client.post("/counters/1/")).status == 200

    small_disk.fill()
    # The journal's last block has room left: appends go on into it (on disk, acknowledged) until
    # it is full, a few hundred at most. Then the first refusal.
    acknowledged = 3
    while (refused := await client.post("/counters/1/")).status == 200:
        acknowledged += 1
        assert acknowledged < 3 + 4096, "a full disk never refused an append"
    assert refused.status == 503
    assert refused.headers["Retry-After"].isdigit()
    assert await refused.text() == f"saving {data_file} failed: No space left on device\n"
    for _ in range(5):  # while saves fail, increments are refused at once
        assert (await client.post("/counters/2/")).status == 503
    assert (await client.get("/healthz")).status == 503
    assert await (await client.get("/counters/2/")).text() == "0\n"  # reads keep working
    assert json.loads(data_file.read_text())["1"] == 0  # the data file was never torn (nor rewritten)
    assert saved_values(data_file)["1"] == acknowledged  # the journal holds every acknowledged one

    small_disk.free()

    async def healthy():
        return (await client.get("/healthz")).status == 200
    await wait_until(healthy, timeout=10)
    # The refused one was taken, not acknowledged: made durable by the next save
    assert await (await client.post("/counters/1/")).text() == f"{acknowledged + 2}\n"
    assert saved_values(data_file)["1"] == acknowledged + 2


async def test_default_mode_keeps_every_increment_through_a_full_disk(aiohttp_client, small_disk, caplog):
    data_file = small_disk.path / "counters.json"
    client = await aiohttp_client(create_app(data_file, save_interval=0.05))
    small_disk.fill()
    for _ in range(10):
        assert (await client.post("/counters/4/")).status == 200  # acknowledged from memory
        await asyncio.sleep(0.05)

    async def unhealthy():
        return (await client.get("/healthz")).status == 503
    await wait_until(unhealthy, timeout=10)
    assert "No space left on device" in await (await client.get("/healthz")).text()
    await asyncio.sleep(1)  # several retries fail meanwhile
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "saving" in r.message]
    assert len(failures) == 1, "logged once per outage"
    assert saved_values(data_file)["4"] == 0

    small_disk.free()

    async def healthy():
        return (await client.get("/healthz")).status == 200
    await wait_until(healthy, timeout=10)
    assert saved_values(data_file)["4"] == 10
    assert not (small_disk.path / "counters.json.tmp").exists()


async def test_durable_announces_refused_changes_once_a_save_holds_them(aiohttp_client, small_disk):
    # A change that got a 503 is in memory and reaches the file with the next save that works: that
    # save announces it, a PUT's and a DELETE's too, so streams don't stay on the old value.
    client = await aiohttp_client(create_app(small_disk.path / "counters.json", durable=True, admin_token="s3cret"))
    admin = {"Authorization": "Bearer s3cret"}
    sse = {"Accept": "text/event-stream"}
    incremented, set_, deleted = [await client.get(f"/counters/{i}/", headers=sse) for i in (1, 2, 3)]
    for stream in (incremented, set_, deleted):
        assert (await read_frame(stream)).endswith(b"data: 0\n\n")  # after its retry field

    small_disk.fill()
    refused = await asyncio.gather(  # made in memory together, then the save that would hold them fails
        client.post("/counters/1/"), client.put("/counters/2/", json={"value": 7}, headers=admin),
        client.delete("/counters/3/", headers=admin))
    assert [response.status for response in refused] == [503, 503, 503]
    with pytest.raises(asyncio.TimeoutError):  # not on disk: not announced
        await asyncio.wait_for(incremented.content.readuntil(b"\n\n"), 0.5)
    small_disk.free()

    assert await asyncio.wait_for(incremented.content.readuntil(b"\n\n"), 10) == b"event: message\ndata: 1\n\n"
    assert await asyncio.wait_for(set_.content.readuntil(b"\n\n"), 10) == b"event: message\ndata: 7\n\n"
    assert await asyncio.wait_for(deleted.content.read(), 10) == b""  # its stream ended
    expected = {**ZEROS, "1": 1, "2": 7}
    del expected["3"]
    assert saved_values(small_disk.path / "counters.json") == expected


async def test_a_stop_whose_final_save_fails_says_what_is_lost_and_exits_non_zero(small_disk, tmp_path):
    # A read-only file system under the data file: the POST is answered (write-behind), and the stop
    # can't save it. The operator and systemd must see that.
    data_file = small_disk.path / "counters.json"
    server = Server(data_file, "--save-interval", "60")
    server.log = tmp_path / "server.log"  # not on the disk that goes read-only
    await server.start()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk.path)], check=True)
    async with aiohttp.ClientSession() as session:
        for counter in ("1", "2", "2"):
            assert (await session.post(f"{server.url}/counters/{counter}/")).status == 200
    assert await server.stop() == 1
    log = server.log.read_text()
    assert "stopping with the values of 2 counters not saved" in log
    assert "Read-only file system" in log
    assert json.loads(data_file.read_text()) == ZEROS


@pytest.fixture
def two_megabytes(tmp_path):
    """A 2 MiB tmpfs: room for a journal just past the size that makes a compaction due."""
    with tmpfs(tmp_path, "2m") as mount_point:
        yield mount_point


def fill(path):
    with open(path / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.parametrize("mode", [["--durable"], []], ids=["durable", "write-behind"])
async def test_a_compaction_that_fails_refuses_nothing_and_is_retried_once_there_is_room(two_megabytes, tmp_path, mode):
    """Found by an attack on the journal: a compaction that failed for a full disk left durable mode
    refusing every change for good (and write-behind failing until the next change), although the
    journal held them all. A compaction's failure refuses nothing; it is retried."""
    disk = two_megabytes
    data_file = disk / "counters.json"
    data_file.write_text(json.dumps(ZEROS))
    record = b'{"1": 0}\n'
    (disk / "counters.json.journal").write_bytes(record * (livecounter.COMPACT_AT_LEAST // len(record) + 1))
    server = Server(data_file, "--save-interval", "0.05", *mode)
    server.log = tmp_path / "server.log"
    await server.start()
    async with aiohttp.ClientSession() as session:
        fill(disk)
        # the append goes into the journal's last block (room left); the compaction it makes due
        # needs a new file and fails
        first = await session.post(f"{server.url}/counters/1/")
        assert first.status == 200, await first.text()
        await wait_until(lambda: "compact" in server.log.read_text() or "failed" in server.log.read_text(), 5)
        await asyncio.sleep(0.5)
        (disk / "filler").unlink()  # room again

        async def healthy():
            return (await session.get(f"{server.url}/healthz")).status == 200
        await wait_until(healthy, timeout=15, message="/healthz never came back to 200 after the disk had room")
        post = await session.post(f"{server.url}/counters/2/")
        assert post.status == 200
    assert await server.stop() == 0
    assert saved_values(data_file)["2"] == 1 and saved_values(data_file)["1"] == 1
    assert (disk / "counters.json.journal").read_bytes() == b""  # folded into the data file at the stop
