"""Throughput against the portal's rate limit.

    .venv/bin/python bench/throughput.py [--quick] [--users N]

A fake portal with the standard limit (2 requests/s, bucket 50), then one with the
enterprise limit (5/s, 250), each with 2,000 users (`--quick`: 500) watched in all 5 roles by
`users: all`. For each, two poll cycles (`PortalPoller.cycle()`) run back to back: the first
from an idle bucket (it also learns the profile and lists the users), the second right after
it. Each is compared with the least time the limit allows: the last of R requests cannot be
admitted before (level + R - burst) / rate, where `level` is the portal's bucket when the
cycle starts (0 when idle), rebuilt from the arrival times the fake recorded. Goal: within
5 % of that with no 503. Also: the same first cycle against a portal without a limit (the
processing floor, which is what is left when the limit allows 0 s), and the time from start
to /readyz 200 of the real app (`build_app` on an `AppRunner`) for 500 users on the
standard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
from _common import (
    NO_LIMIT,
    PLANS,
    FakeFleet,
    FakeSpec,
    bucket_level,
    config_of,
    free_port,
    limit_minimum,
    parsed,
    portal_entry,
    print_machine,
    table,
    verdict,
)
from aiohttp import web

from exporter.bitrix import new_session
from exporter.poller import PortalPoller
from exporter.server import build_app

TOLERANCE = 0.05


async def timed_cycle(
    fleet: FakeFleet, poller: PortalPoller, rate: float | None, burst: int
) -> dict[str, Any]:
    before = await fleet.stats(times=True)
    start = before["now"]
    level = 0.0
    if rate is not None:
        admitted = [t for t, s in zip(before["at"], before["statuses"], strict=True) if s != 503]
        level = bucket_level(admitted, rate, start)
    started = time.monotonic()
    snapshot = await poller.cycle()
    seconds = time.monotonic() - started
    after = await fleet.stats(since=before["total"])
    requests = after["requests"]
    minimum = limit_minimum(requests, rate, burst, level) if rate is not None else 0.0
    ok = sum(1 for s in snapshot.statuses if s.success)
    return {
        "requests": requests,
        "status_503": after["status"].get("503", 0),
        "seconds": seconds,
        "level": level,
        "minimum": minimum,
        "fetched": f"{ok}/{len(snapshot.statuses)}",
    }


async def cycles(plan: str, users: int) -> list[dict[str, Any]]:
    rate, burst = PLANS[plan]
    async with FakeFleet([FakeSpec(users, requests_per_second=rate, burst=burst)]) as fleet:
        config = parsed(config_of([portal_entry("bench", fleet.urls[0], rate_limit=plan)]))
        async with new_session() as session:
            poller = PortalPoller(config.portals[0], config, session, lambda s: None)
            cold = await timed_cycle(fleet, poller, rate, burst)
            warm = await timed_cycle(fleet, poller, rate, burst)
    return [
        {"case": f"{plan}: first cycle, idle bucket", **cold},
        {"case": f"{plan}: next cycle, back to back", **warm},
    ]


async def floor(users: int) -> dict[str, Any]:
    async with FakeFleet([FakeSpec(users, requests_per_second=None)]) as fleet:
        entry = portal_entry("bench", fleet.urls[0], rate_limit=NO_LIMIT)
        config = parsed(config_of([entry]))
        async with new_session() as session:
            poller = PortalPoller(config.portals[0], config, session, lambda s: None)
            result = await timed_cycle(fleet, poller, None, 0)
    return {"case": "no limit: first cycle (processing floor)", **result}


async def time_to_ready(users: int) -> dict[str, Any]:
    rate, burst = PLANS["standard"]
    async with FakeFleet([FakeSpec(users, requests_per_second=rate, burst=burst)]) as fleet:
        config = parsed(config_of([portal_entry("bench", fleet.urls[0])]))
        app = build_app(config)
        port = free_port()
        runner = web.AppRunner(app, access_log=None)
        started = time.monotonic()
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with aiohttp.ClientSession() as client:
            while True:
                async with client.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.01)
        seconds = time.monotonic() - started
        await runner.cleanup()
        stats = await fleet.stats()
    return {
        "case": f"standard: start to /readyz 200, {users} users",
        "requests": stats["requests"],
        "status_503": stats["status"].get("503", 0),
        "seconds": seconds,
        "level": 0.0,
        "minimum": limit_minimum(stats["requests"], rate, burst),
        "fetched": "",
    }


def row(result: dict[str, Any]) -> list[object]:
    minimum, seconds = result["minimum"], result["seconds"]
    if result["case"].startswith("standard: start"):
        over = f"{(seconds / minimum - 1) * 100:+.1f} %"
        goal = "report (the client bucket keeps headroom)"
    elif minimum > 0:
        over = f"{(seconds / minimum - 1) * 100:+.1f} %"
        goal = verdict(seconds <= minimum * (1 + TOLERANCE) and result["status_503"] == 0)
    else:
        over, goal = "limit allows 0 s", "n/a (compute-bound)"
    return [
        result["case"],
        result["requests"],
        result["status_503"],
        f"{result['level']:.1f}",
        f"{minimum:.2f}",
        f"{seconds:.2f}",
        over,
        result["fetched"],
        goal,
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 users instead of 2,000")
    parser.add_argument("--users", type=int, help="users per portal (default 2000, quick 500)")
    args = parser.parse_args()
    users = args.users or (500 if args.quick else 2000)
    print_machine()
    print(f"load: {users} users x 5 roles, users: all, 50 commands per batch, concurrency 4\n")
    results = []
    for plan in ("standard", "enterprise"):
        results += await cycles(plan, users)
    results.append(await floor(users))
    results.append(await time_to_ready(500))
    print(
        table(
            [
                "case",
                "requests",
                "503s",
                "bucket at start",
                "limit minimum s",
                "measured s",
                "over minimum",
                "fetched",
                "goal (<=5 %, 0 x 503)",
            ],
            [row(r) for r in results],
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
