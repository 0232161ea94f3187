"""Whether a 401's timing names users: the speed goal of tests/test_webconfig.py.

    .venv/bin/python bench/basic_auth.py [--quick] [--cost 10] [--tries N]

A small app behind the exporter's basic-auth middleware (`WebSecurity` from a web config with
one user, bcrypt cost 10) serves on 127.0.0.1. N times (20; `--quick`: 5) each, in turn, a
known user with a wrong password and an unknown user ask `/`, each with a password not tried
before (a cached answer would time the cache). Reported: median and slowest 401 of each, and
the ratio of the medians.

Goal: the ratio between 0.5 and 2.0 (an unknown user costs one bcrypt check of the same cost
as a known one, so the answers do not tell user names apart); each check takes milliseconds,
so bcrypt really runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import bcrypt
import yaml
from _common import free_port, print_machine, table, verdict
from aiohttp import web

from exporter.webconfig import WebSecurity


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def run(tries: int, cost: int) -> None:
    print_machine()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        web_yml = Path(tmp) / "web.yml"
        hashed = bcrypt.hashpw(b"the-right-password", bcrypt.gensalt(cost)).decode()
        web_yml.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": hashed}}))
        security = WebSecurity(web_yml)
        app = web.Application(middlewares=[security.middleware])
        app.router.add_get("/", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}/"
        timings: dict[str, list[float]] = {"prometheus": [], "mallory": []}
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(url) as response:  # warm up the connection
                    await response.read()
                for attempt in range(tries):
                    for user, seconds in timings.items():
                        header = aiohttp.encode_basic_auth(user, f"wrong-{attempt}")
                        started = time.perf_counter()
                        async with session.get(url, headers={"Authorization": header}) as response:
                            await response.read()
                            assert response.status == 401, response.status
                        seconds.append(time.perf_counter() - started)
        finally:
            await runner.cleanup()
    known, unknown = timings["prometheus"], timings["mallory"]
    ratio = statistics.median(unknown) / statistics.median(known)
    rows = [
        (label, len(values), statistics.median(values) * 1000, max(values) * 1000)
        for label, values in (("known user, wrong password", known), ("unknown user", unknown))
    ]
    print()
    print(table(("401 for", "tries", "median ms", "slowest ms"), rows))
    print()
    print(
        f"unknown / known median: {ratio:.2f} (goal 0.5 to 2.0: {verdict(0.5 <= ratio <= 2.0)});"
        f" fastest check {min(known + unknown) * 1000:.1f} ms"
        f" (bcrypt ran: {verdict(min(known + unknown) > 0.001)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 tries each")
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--cost", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(run(5 if args.quick else args.tries, args.cost))


if __name__ == "__main__":
    main()
