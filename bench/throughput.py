"""Throughput against the portal's rate limit.

    .venv/bin/python bench/throughput.py [--quick] [--users N] [--part cycles|start|all]

A fake portal with the standard limit (2 requests/s, bucket 50), then one with the
enterprise limit (5/s, 250), each with 2,000 users (`--quick`: 500) watched in all 5 roles by
`users: all`. For each, two poll cycles (`PortalPoller.cycle()`) run back to back: the first
from an idle bucket (it also learns the profile and lists the users), the second right after
it. Each is compared with the least time the limit allows: the last of R requests cannot be
admitted before (level + R - burst) / rate, where `level` is the portal's bucket when the
cycle starts (0 when idle), rebuilt from the arrival times the fake recorded. Efficiency is
that least time over the time measured. Also: the same first cycle against a portal without
a limit (the processing floor, which is what is left when the limit allows 0 s).

Then from process start to `/readyz` 200: `python -m exporter` is started against an idle
portal, 1,871 users on the standard limit and 4,000 and 6,000 on the enterprise one (so that
the limit binds from an idle bucket there too, 6,000 for as long as on the standard row;
`--quick`: 500, 1,500 and 2,000), and the time until every
counter is on /metrics is compared with the limit's minimum from the moment the process
started. Where the other seconds go: start-up (until the first request reaches the portal),
the client bucket (how much later than the limit allows the last request arrived, counted
from the first), and the end (the last answer, mapping and the first render).

Goal: efficiency at least 0.97, zero 503s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from _common import (
    NO_LIMIT,
    PLANS,
    ROOT,
    FakeFleet,
    FakeSpec,
    bucket_level,
    config_of,
    free_port,
    limit_minimum,
    parsed,
    portal_entry,
    print_machine,
    stop,
    table,
    verdict,
)

from exporter.bitrix import new_session
from exporter.poller import PortalPoller

GOAL = 0.97  # efficiency: the limit's minimum over the time measured


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


async def start_to_ready(plan: str, users: int) -> dict[str, Any]:
    """`python -m exporter` from process start to /readyz 200 against an idle portal."""
    rate, burst = PLANS[plan]
    async with FakeFleet([FakeSpec(users, requests_per_second=rate, burst=burst)]) as fleet:
        # A long interval, so that no second cycle adds requests before the process stops.
        raw = config_of([portal_entry("bench", fleet.urls[0], rate_limit=plan)], poll_interval="1h")
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="bench-") as folder:
            path = Path(folder) / "config.yaml"
            path.write_text(yaml.safe_dump(raw))
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "exporter",
                "--config",
                str(path),
                "--listen-address",
                f"127.0.0.1:{port}",
                "--log-level",
                "error",
                cwd=ROOT,
            )
            try:
                async with aiohttp.ClientSession() as client:
                    while True:
                        with contextlib.suppress(aiohttp.ClientError):
                            async with client.get(f"http://127.0.0.1:{port}/readyz") as response:
                                if response.status == 200:
                                    break
                        await asyncio.sleep(0.005)
                seconds = time.monotonic() - started
            finally:
                await stop(proc)
        stats = await fleet.stats(times=True)
    arrivals = [t - started for t, s in zip(stats["at"], stats["statuses"], strict=True)]
    requests = stats["requests"]
    minimum = limit_minimum(requests, rate, burst)
    first, last = arrivals[0], arrivals[-1]
    return {
        "case": f"{plan}: process start to /readyz 200, {users:,} users",
        "requests": requests,
        "status_503": stats["status"].get("503", 0),
        "seconds": seconds,
        "level": 0.0,
        "minimum": minimum,
        "fetched": "",
        # Where the seconds over the minimum went.
        "start-up": first,
        "client bucket": (last - first) - minimum,
        "end": seconds - last,
    }


def row(result: dict[str, Any]) -> list[object]:
    minimum, seconds = result["minimum"], result["seconds"]
    if minimum > 0:
        efficiency = f"{minimum / seconds:.3f}"
        goal = verdict(minimum / seconds >= GOAL and result["status_503"] == 0)
    else:
        efficiency, goal = "limit allows 0 s", "n/a (compute-bound)"
    return [
        result["case"],
        result["requests"],
        result["status_503"],
        f"{result['level']:.1f}",
        f"{minimum:.2f}",
        f"{seconds:.2f}",
        efficiency,
        result["fetched"],
        goal,
    ]


def breakdown(result: dict[str, Any]) -> list[object]:
    over = result["seconds"] - result["minimum"]
    return [
        result["case"],
        f"{over:.2f}",
        f"{result['start-up']:.2f}",
        f"{result['client bucket']:.2f}",
        f"{result['end']:.2f}",
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 users instead of 2,000")
    parser.add_argument("--users", type=int, help="users per portal (default 2000, quick 500)")
    parser.add_argument(
        "--part", choices=["cycles", "start", "all"], default="all", help="what to measure"
    )
    args = parser.parse_args()
    users = args.users or (500 if args.quick else 2000)
    print_machine()
    print(f"load: {users} users x 5 roles, users: all, 50 commands per batch, concurrency 4\n")
    results = []
    if args.part in ("cycles", "all"):
        for plan in ("standard", "enterprise"):
            results += await cycles(plan, users)
        results.append(await floor(users))
    ready = []
    if args.part in ("start", "all"):
        ready = [
            await start_to_ready("standard", 500 if args.quick else 1871),
            await start_to_ready("enterprise", 1500 if args.quick else 4000),
            # As long a minimum as the standard row's: 605 requests, 71 s.
            await start_to_ready("enterprise", 2000 if args.quick else 6000),
        ]
    print(
        table(
            [
                "case",
                "requests",
                "503s",
                "bucket at start",
                "limit minimum s",
                "measured s",
                "efficiency",
                "fetched",
                f"goal (>= {GOAL}, 0 x 503)",
            ],
            [row(r) for r in results + ready],
        )
    )
    print()
    print(
        table(
            ["from process start", "s over the minimum", "start-up", "client bucket", "end"],
            [breakdown(r) for r in ready],
        )
    )
    print("load average at end: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    asyncio.run(main())
