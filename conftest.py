"""The fixtures every test may ask for: the data a test starts from, and the app behind a real socket.

Helpers (servers as processes, reading streams, waiting) are in tests/helpers.py, which tests import
by name: `from tests.helpers import Server, read_frame, ...`.
"""

import json

import pytest

from livecounter import create_app
from tests.helpers import ZEROS, Server


@pytest.fixture
def data_file(tmp_path):
    """A data file of the test's own (the shipped counters.json changes when the server runs)."""
    path = tmp_path / "counters.json"
    path.write_text(json.dumps(ZEROS))
    return path


@pytest.fixture
def make_client(aiohttp_client, data_file):
    async def make(**options):
        return await aiohttp_client(create_app(options.pop("data_path", data_file), **options))
    return make


@pytest.fixture
async def client(make_client):
    return await make_client()


@pytest.fixture(autouse=True)
def no_server_outlives_its_test():
    """A test that fails before it stops its server must not leave the process running."""
    yield
    for process in Server.started:
        if process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass
    Server.started.clear()
