"""Where a POST's CPU goes: livecounter and its floor under the same wrk load, sampled with py-spy.

    python bench/profile_post.py            # 10 s of samples from each server (uvloop)

The POST-rate ratio of bench/run.py swings ±20% pair to pair on a shared machine; the share of a
server's own samples spent in each part of a request does not, so this says what livecounter adds
to the floor and what it would take to remove it. Needs py-spy (pip install py-spy) and wrk.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import run  # bench/run.py: the same servers and wrk as the benchmarks

# What each sampled stack of the server's main thread is counted as: the first part with a frame
# (a function name, or a file for livecounter's own code) above run_app, checked in this order.
PARTS = (
    ("the handler: livecounter.py (its checks, count, save and fan-out bookkeeping, CORS, and the "
     "web.Response it makes)", ("livecounter.py",)),
    ("the handler: the floor's constant answer", ("constant (",)),
    ("sending the answer (transport.write: the kernel's TCP send)", ("StreamWriter._writelines",)),
    ("the rest of aiohttp's request cycle (parse, route, headers)", ("RequestHandler.",)),
)
OTHER = "the event loop itself (uvloop: reading sockets, scheduling)"


def profile(server: run.Server, seconds: int) -> collections.Counter[str]:
    """The server's main-thread samples by part, while wrk POSTs to it for the whole sampling."""
    run.wrk(server.url(server.post_path), 1)  # warm-up
    load = threading.Thread(target=run.wrk, args=(server.url(server.post_path), seconds + 2))
    load.start()
    with tempfile.NamedTemporaryFile(suffix=".txt") as samples:
        subprocess.run(["py-spy", "record", "--pid", str(server.cpu_pid), "--duration", str(seconds),
                        "--rate", "500", "--format", "raw", "--output", samples.name],
                       check=True, capture_output=True)
        load.join()
        parts: collections.Counter[str] = collections.Counter()
        for line in Path(samples.name).read_text().splitlines():
            stack, count = line.rsplit(" ", 1)
            if "run_app" not in stack:
                continue  # another thread: the write-behind saves
            stack = stack.split("run_app", 1)[1]  # what the event loop runs (main() is in livecounter.py)
            part = next((name for name, marks in PARTS if any(mark in stack for mark in marks)), OTHER)
            parts[part] += int(count)
        return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="seconds of samples from each server")
    args = parser.parse_args()
    missing = [tool for tool in ("py-spy", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"bench/profile_post.py needs, and does not install: {', '.join(missing)} "
              "(pip install py-spy; apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="livecounter-profile-") as directory:
        workdir = Path(directory)
        shares = {}
        for name, start in (("floor", lambda: run.floor("uvloop", workdir)),
                            ("livecounter", lambda: run.livecounter("uvloop", workdir))):
            server = start()
            try:
                parts = profile(server, args.seconds)
            finally:
                server.stop()
            total = sum(parts.values())
            shares[name] = {part: 100 * count / total for part, count in parts.items()}
    print(f"Share of the server's main-thread samples, wrk POSTing to one counter; {run.machine()}\n")
    print("| part of a POST | floor | livecounter |\n|---|---|---|")
    for part in [name for name, _ in PARTS] + [OTHER]:
        print(f"| {part} | {shares['floor'].get(part, 0):.1f}% | {shares['livecounter'].get(part, 0):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
