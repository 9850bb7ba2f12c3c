"""What the tests share: the data they start from, servers they run, and helpers to talk to them."""

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # aiohttp installs async-timeout on Python 3.10, where asyncio has no timeout()
    from async_timeout import timeout

__all__ = ["timeout"]
