"""The floor for the benchmarks: bare aiohttp handlers, nothing else.

    python bench/floor.py PORT asyncio|uvloop

POST /counters/ID/ answers a constant; GET /counters/ID/ holds an event stream that sends one
frame and then waits forever on a future shared by all streams (the least an aiohttp stream costs).
"""

import asyncio
import sys

from aiohttp import web


async def constant(request: web.Request) -> web.Response:
    return web.Response(text="27\n")


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"event: message\ndata: 0\n\n")
    await forever
    return response


app = web.Application()
app.router.add_post("/counters/{counter_id}/", constant)
app.router.add_get("/counters/{counter_id}/", stream)

if __name__ == "__main__":
    port, loop_name = int(sys.argv[1]), sys.argv[2]
    if loop_name == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    forever = loop.create_future()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, loop=loop, backlog=4096,
                print=lambda _: print("serving", flush=True))
