"""The floor for the benchmarks: a bare aiohttp handler answering a constant, nothing else.

    python bench/floor.py PORT asyncio|uvloop
"""

import asyncio
import sys

from aiohttp import web


async def constant(request: web.Request) -> web.Response:
    return web.Response(text="27\n")


app = web.Application()
app.router.add_route("*", "/counters/{counter_id}/", constant)

if __name__ == "__main__":
    port, loop_name = int(sys.argv[1]), sys.argv[2]
    if loop_name == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, loop=loop,
                print=lambda _: print("serving", flush=True))
