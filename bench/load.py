"""A paced load for the benchmarks (not for tests): POSTs at a steady rate to random counters, and
/healthz probed at a steady interval, for a while; what each took, as JSON on stdout.

    python bench/load.py PORT SECONDS RATE CLIENTS COUNTERS [PREFIX] [PROBE_SECONDS]

RATE POSTs a second in all, spread over CLIENTS connections (each its own keep-alive connection,
sending its next POST when it is due or, if the last one is still unanswered, when it is answered),
to /counters/PREFIX<n>/ with n drawn from 0..COUNTERS-1; meanwhile GET /healthz every PROBE_SECONDS
(default 0.02) on a connection of its own: how long the event loop took to answer is the longest it
stalled. Prints {"posts": [ms...], "answered": N, "failed": N, "probes": [ms...]}.
"""

import asyncio
import json
import random
import sys
import time

import aiohttp

try:
    import uvloop
except ImportError:
    uvloop = None


async def main(port: int, seconds: float, rate: float, clients: int, counters: int, prefix: str,
               probe_every: float) -> None:
    base = f"http://127.0.0.1:{port}"
    posts: list[float] = []
    probes: list[float] = []
    failed = 0
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, number: int) -> None:
        nonlocal failed
        interval = clients / rate
        due = time.monotonic() + interval * number / clients  # staggered: the rate is even, not in bursts
        while (now := time.monotonic()) < deadline:
            if due > now:
                await asyncio.sleep(due - now)
            due += interval
            started = time.monotonic()
            try:
                async with session.post(f"{base}/counters/{prefix}{random.randrange(counters)}/") as response:
                    await response.read()
                    if response.status != 200:
                        failed += 1
                        continue
            except aiohttp.ClientError:
                failed += 1
                continue
            posts.append(1000 * (time.monotonic() - started))

    async def probe(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            async with session.get(f"{base}/healthz?local") as response:
                await response.read()
            probes.append(1000 * (time.monotonic() - started))
            await asyncio.sleep(max(0.0, probe_every - (time.monotonic() - started)))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as posting, \
            aiohttp.ClientSession(timeout=timeout) as probing:
        await asyncio.gather(probe(probing), *(client(posting, number) for number in range(clients)))
    print(json.dumps({"posts": posts, "answered": len(posts), "failed": failed, "probes": probes}))


if __name__ == "__main__":
    port, seconds, rate, clients, counters = (int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]),
                                              int(sys.argv[4]), int(sys.argv[5]))
    prefix = sys.argv[6] if len(sys.argv) > 6 else "c"
    probe_every = float(sys.argv[7]) if len(sys.argv) > 7 else 0.02
    (uvloop.run if uvloop else asyncio.run)(main(port, seconds, rate, clients, counters, prefix, probe_every))
