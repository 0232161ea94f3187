"""Requests per cycle: the exporter's batches against a naive one-request-per-counter client.

    .venv/bin/python bench/requests_per_cycle.py [--quick] [--users N]

One fake portal without a rate limit, 2,000 users (`--quick`: 500) in all 5 roles. The
exporter (`PortalPoller`, `users: all`) runs a first cycle (profile and user list included)
and a second one; the naive client, written here, sends one POST to
`tasks.task.counters.get` per (user, role) plus one `im.counters.get`, four at a time (the
exporter's concurrency), and is given the user list for free. Both read the same counters;
the sums of their values are compared to show they fetched the same thing. The table also
shows what each needs at the standard limit (2 requests/s after a burst of 50).
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
    ROLES,
    SECRET,
    FakeFleet,
    FakeSpec,
    config_of,
    limit_minimum,
    parsed,
    portal_entry,
    print_machine,
    table,
)

from exporter.bitrix import new_session
from exporter.metrics import TASKS
from exporter.poller import PortalPoller

CONCURRENCY = 4


async def exporter_cycles(fleet: FakeFleet) -> list[dict[str, Any]]:
    entry = portal_entry("bench", fleet.urls[0], rate_limit=NO_LIMIT)
    config = parsed(config_of([entry]))
    results = []
    async with new_session() as session:
        poller = PortalPoller(config.portals[0], config, session, lambda s: None)
        for name in ("exporter: first cycle (with user list)", "exporter: next cycle"):
            before = await fleet.stats()
            started = time.monotonic()
            snapshot = await poller.cycle()
            seconds = time.monotonic() - started
            after = await fleet.stats(since=before["total"])
            total = sum(s.value for s in snapshot.samples if s.family is TASKS)
            results.append(
                {"case": name, "requests": after["requests"], "seconds": seconds, "sum": total}
            )
    return results


async def naive_cycle(fleet: FakeFleet, users: int) -> dict[str, Any]:
    base = f"{fleet.urls[0]}/rest/1/{SECRET}/"
    gate = asyncio.Semaphore(CONCURRENCY)
    total = 0.0

    async def one(session: aiohttp.ClientSession, method: str, params: dict[str, Any]) -> None:
        nonlocal total
        async with gate, session.post(base + method, json=params) as response:
            body = await response.json()
        result = body["result"]
        if method == "tasks.task.counters.get":
            total += sum(float(c["counter"]) for c in result.values())

    before = await fleet.stats()
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        calls = [
            one(session, "tasks.task.counters.get", {"userId": u, "groupId": 0, "type": role})
            for u in range(1, users + 1)
            for role in ROLES
        ]
        calls.append(one(session, "im.counters.get", {}))
        await asyncio.gather(*calls)
    seconds = time.monotonic() - started
    after = await fleet.stats(since=before["total"])
    return {
        "case": "naive: one request per counter",
        "requests": after["requests"],
        "seconds": seconds,
        "sum": total,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 users instead of 2,000")
    parser.add_argument("--users", type=int, help="users (default 2000, quick 500)")
    args = parser.parse_args()
    users = args.users or (500 if args.quick else 2000)
    print_machine()
    print(f"load: {users} users x 5 roles; the fake portal has no rate limit\n")
    async with FakeFleet([FakeSpec(users, requests_per_second=None)]) as fleet:
        results = await exporter_cycles(fleet)
        results.append(await naive_cycle(fleet, users))
    rate, burst = PLANS["standard"]
    steady, naive = results[1], results[2]
    rows = [
        [
            r["case"],
            r["requests"],
            f"{r['seconds']:.2f}",
            f"{limit_minimum(r['requests'], rate, burst):,.1f}",
            f"{r['requests'] / rate:,.1f}",
            f"{r['sum']:,.0f}",
        ]
        for r in results
    ]
    print(
        table(
            [
                "client",
                "requests",
                "measured s (no limit)",
                "s at standard limit, idle bucket",
                "s at standard limit, sustained",
                "sum of task counters",
            ],
            rows,
        )
    )
    print(
        f"\nnaive / exporter (next cycle): {naive['requests'] / steady['requests']:.1f}x requests,"
        f" {naive['seconds'] / steady['seconds']:.1f}x time without a limit;"
        f" same counters: {naive['sum'] == steady['sum']}"
    )


if __name__ == "__main__":
    asyncio.run(main())
