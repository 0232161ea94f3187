"""Discovery at scale: `users: all` on a 10,000-user portal.

    .venv/bin/python bench/discovery.py [--quick] [--users N]

The exporter lists a portal's active employees with one `user.get` call (which tells the
total) and then the remaining pages of 50 inside `batch` requests of 50 pages: for 10,000
users that is 1 call + 4 batches carrying 200 `user.get` calls. This times the exporter's
user listing (`UserDirectory.discover`, the step a cycle runs before fetching
counters) against a portal with the standard limit and against one without a limit, and, on
the latter, a naive pager that follows `next` one request at a time. CPU is the benchmark
process's own (the fake portals run in a child process).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import time
from typing import Any

import aiohttp
from _common import (
    NO_LIMIT,
    PLANS,
    SECRET,
    FakeFleet,
    FakeSpec,
    config_of,
    limit_minimum,
    parsed,
    portal_entry,
    print_machine,
    table,
    verdict,
)

from exporter.bitrix import new_session
from exporter.directory import USERS_FILTER
from exporter.oncelog import OnceLog
from exporter.poller import PortalPoller


async def exporter_listing(fleet: FakeFleet, index: int, rate_limit: object) -> dict[str, Any]:
    config = parsed(config_of([portal_entry("bench", fleet.urls[index], rate_limit=rate_limit)]))
    async with new_session() as session:
        poller = PortalPoller(config.portals[0], config, session, lambda s: None)
        before = await fleet.stats(index)
        cpu, started = time.process_time(), time.monotonic()
        await poller.directory.discover(poller.main, OnceLog(logging.getLogger(__name__)))
        seconds, cpu = time.monotonic() - started, time.process_time() - cpu
        after = await fleet.stats(index, since=before["total"])
    return {
        "requests": after["requests"],
        "calls": after["methods"].get("user.get", 0) + after["batch_commands"].get("user.get", 0),
        "status_503": after["status"].get("503", 0),
        "seconds": seconds,
        "cpu": cpu,
        "found": len(poller.directory.discovered or []),
    }


async def naive_listing(fleet: FakeFleet, index: int) -> dict[str, Any]:
    url = f"{fleet.urls[index]}/rest/1/{SECRET}/user.get"
    before = await fleet.stats(index)
    found: set[str] = set()
    cpu, started = time.process_time(), time.monotonic()
    async with aiohttp.ClientSession() as session:
        start: int | None = 0
        while start is not None:
            async with session.post(url, json={"FILTER": USERS_FILTER, "start": start}) as r:
                body = await r.json()
            found.update(u["ID"] for u in body["result"])
            start = body.get("next")
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    after = await fleet.stats(index, since=before["total"])
    return {
        "requests": after["requests"],
        "calls": after["methods"].get("user.get", 0),
        "status_503": after["status"].get("503", 0),
        "seconds": seconds,
        "cpu": cpu,
        "found": len(found),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,500 users instead of 10,000")
    parser.add_argument("--users", type=int, help="users (default 10000, quick 2500)")
    args = parser.parse_args()
    users = args.users or (2500 if args.quick else 10000)
    rate, burst = PLANS["standard"]
    print_machine()
    print(f"portal: {users} active users, pages of 50\n")
    specs = [FakeSpec(users, requests_per_second=rate, burst=burst), FakeSpec(users)]
    async with FakeFleet(specs) as fleet:
        limited = await exporter_listing(fleet, 0, "standard")
        free = await exporter_listing(fleet, 1, NO_LIMIT)
        naive = await naive_listing(fleet, 1)
    pages = math.ceil(users / 50)
    expected = 1 + math.ceil((pages - 1) / 50)
    rows = []
    for name, r in (
        ("exporter, standard limit", limited),
        ("exporter, no limit", free),
        ("naive pager (follows next), no limit", naive),
    ):
        rows.append(
            [
                name,
                r["requests"],
                r["calls"],
                r["status_503"],
                r["found"],
                f"{r['seconds']:.2f}",
                f"{r['cpu']:.2f}",
                f"{limit_minimum(r['requests'], rate, burst):.1f}",
            ]
        )
    print(
        table(
            [
                "client",
                "requests",
                "user.get calls",
                "503s",
                "users found",
                "measured s",
                "client CPU s",
                "s at standard limit, idle bucket",
            ],
            rows,
        )
    )
    ok = limited["requests"] == expected and limited["calls"] == pages
    ok = ok and limited["status_503"] == 0 and limited["found"] == users
    print(
        f"\ngoal: {expected} requests (1 call + {expected - 1} batches) carrying {pages} pages,"
        f" no 503, every user found: {verdict(ok)}"
    )
    print(
        f"naive / exporter (no limit): {naive['requests'] / free['requests']:.0f}x requests,"
        f" {naive['seconds'] / free['seconds']:.1f}x time"
    )


if __name__ == "__main__":
    asyncio.run(main())
