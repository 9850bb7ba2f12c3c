"""`pip install .` in a fresh virtual environment gives a `livecounter` command that serves from
any directory. Needs the package registry (pip fetches the dependencies and setuptools)."""

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

import livecounter
from tests.helpers import ZEROS, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The livecounter command of a fresh venv that installed this checkout with pip."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
                   check=True, timeout=300)
    return venv / "bin" / "livecounter"


def test_the_command_shows_its_version(installed):
    result = subprocess.run([str(installed), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout == f"livecounter {livecounter.__version__}\n"


async def serve_and_count(command, cwd, *args):
    """Start the command in cwd, POST to counter 1 twice, stop it; its first line of output."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(command), "--port", str(port), *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        async with aiohttp.ClientSession() as session:
            for expected in (b"1\n", b"2\n"):
                assert await (await session.post(f"http://127.0.0.1:{port}/counters/1/")).read() == expected
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    return line


async def test_the_command_serves_from_any_directory(installed, tmp_path):
    data = tmp_path / "elsewhere" / "my-counters.json"
    data.parent.mkdir()
    data.write_text(json.dumps(ZEROS))
    line = await serve_and_count(installed, tmp_path, "--data", str(data))
    assert "livecounter serving http://127.0.0.1:" in line
    assert json.loads(data.read_text())["1"] == 2


async def test_the_default_data_file_is_in_the_working_directory(installed, tmp_path):
    (tmp_path / "counters.json").write_text(json.dumps(ZEROS))
    await serve_and_count(installed, tmp_path)
    assert json.loads((tmp_path / "counters.json").read_text())["1"] == 2


def test_requirements_txt_and_pyproject_name_the_same_dependencies():
    requirements = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    declared = {re.sub(r"\s*;\s*", "; ", item.replace("'", '"')) for item in re.findall(r'"(.*)",', dependencies)}
    assert declared == {re.sub(r"\s*;\s*", "; ", line) for line in requirements if line}
